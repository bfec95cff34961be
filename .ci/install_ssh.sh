#!/usr/bin/env bash
# Install an ssh server and pdsh for the two-node DeepSpeed launch test (tests/ssh_nodes.py): the
# DeepSpeed launcher reaches the hosts of a hostfile with pdsh over ssh. Idempotent.
# Needs root (CI containers run as root) or passwordless sudo.
set -euo pipefail

packages=(openssh-server openssh-client pdsh)

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

missing=()
for p in "${packages[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "install_ssh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
else
    echo "install_ssh: ${packages[*]} already installed"
fi
# sshd wants its privilege-separation directory; a tmpfs /run may not have it
$SUDO install -d -m 0755 /run/sshd
echo "install_ssh: $(ssh -V 2>&1), pdsh $(pdsh -V 2>&1 | head -n1) ready"
