#!/usr/bin/env bash
# apt_install.sh PACKAGE...: install the Debian packages that are not installed yet (no recommends).
# Idempotent; needs root (CI containers run as root) or passwordless sudo.
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

missing=()
for p in "$@"; do
    # dpkg-query prints "install ok installed" only for a fully installed package.
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "apt_install: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # --no-install-recommends keeps out mailutils, openmpi and friends (hundreds of MB).
    $SUDO apt-get install -y -qq --no-install-recommends "$@"
else
    echo "apt_install: $* already installed"
fi
