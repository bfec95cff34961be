#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client) and munge for the one-node test cluster
# (tests/slurm_cluster.py). Idempotent: does nothing when everything is already there.
# Needs root (CI containers run as root) or passwordless sudo.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

missing=()
for p in "${packages[@]}"; do
    # dpkg-query prints "install ok installed" only for a fully installed package.
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "install_slurm: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # --no-install-recommends keeps out mailutils, openmpi and friends (hundreds of MB).
    $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
else
    echo "install_slurm: ${packages[*]} already installed"
fi

# munged refuses to start without a key. The package's postinst normally creates one, but not in
# every container (it can be skipped when /etc/munge is a fresh volume), so make sure.
key=/etc/munge/munge.key
if [[ ! -s $key ]]; then
    echo "install_slurm: creating $key"
    if command -v mungekey >/dev/null; then
        $SUDO mungekey --create --keyfile="$key" --force
    else
        $SUDO dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
fi
$SUDO chown munge:munge "$key"
$SUDO chmod 0400 "$key"

# munged also wants its socket and log directories owned by munge; a package upgrade or a tmpfs
# /run can leave them missing.
$SUDO install -d -o munge -g munge -m 0755 /run/munge
$SUDO install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge

echo "install_slurm: $(slurmd -V) ready"
