#!/usr/bin/env bash
# Install an ssh server and pdsh for the two-node DeepSpeed launch test (tests/ssh_nodes.py): the
# DeepSpeed launcher reaches the hosts of a hostfile with pdsh over ssh. Idempotent.
# Needs root (CI containers run as root) or passwordless sudo.
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

bash "$(dirname "$0")/apt_install.sh" openssh-server openssh-client pdsh
# sshd wants its privilege-separation directory; a tmpfs /run may not have it
$SUDO install -d -m 0755 /run/sshd
echo "install_ssh: $(ssh -V 2>&1), pdsh $(pdsh -V 2>&1 | head -n1) ready"
