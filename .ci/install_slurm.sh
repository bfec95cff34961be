#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client) and munge for the one-node test cluster
# (tests/slurm_cluster.py). Idempotent: does nothing when everything is already there.
# Needs root (CI containers run as root) or passwordless sudo.
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

bash "$(dirname "$0")/apt_install.sh" slurmctld slurmd slurm-client munge

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
