"""Two "nodes" on this machine for the DeepSpeed launcher's multi-node path: a real sshd on a free
loopback port, reachable as `localhost` and as `127.0.0.1` (two host names, so the launcher sees two
hosts and starts its ranks on each with pdsh over ssh, as on a cluster).

    from tests.ssh_nodes import ssh_nodes

    with ssh_nodes(tmp_path) as nodes:
        env = {**os.environ, **nodes.env}   # PDSH_SSH_ARGS_APPEND: port, key, no host-key prompt
        hostfile = nodes.hostfile(tmp_path / "hostfile", slots=1)

Everything (host key, client key, authorized_keys, sshd_config, pid file, log) lives in one
temporary folder: nothing under ~/.ssh is touched. The launcher's own `ssh HOST hostname` check
cannot be given these options, so tests pass `--no_ssh_check` and `--master_addr`. sshd is stopped
by the PID in its pid file, also when a test fails. Without sshd or pdsh the tests are skipped
locally and fail in CI (CI=true): CI must have run .ci/install_ssh.sh.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.slurm_cluster import free_port, in_ci

SSHD = "/usr/sbin/sshd"
HOSTS = ("localhost", "127.0.0.1")


def require_ssh_nodes() -> None:
    reason = None
    if not os.access(SSHD, os.X_OK) or shutil.which("pdsh") is None or shutil.which("ssh-keygen") is None:
        reason = "sshd, ssh-keygen or pdsh not installed: run .ci/install_ssh.sh"
    elif os.geteuid() != 0:
        reason = "the test sshd runs as root (privilege separation)"
    if reason:
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Nodes:
    port: int
    key: Path

    @property
    def env(self) -> dict[str, str]:
        """What pdsh's ssh needs to reach the nodes without prompts (DeepSpeed passes it on)."""
        return {"PDSH_SSH_ARGS_APPEND": f"-p {self.port} -i {self.key} -o BatchMode=yes -o LogLevel=ERROR "
                                        f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        path.write_text("".join(f"{host} slots={slots}\n" for host in HOSTS))
        return path


@contextlib.contextmanager
def ssh_nodes(tmp: Path | None = None) -> Iterator[Nodes]:
    require_ssh_nodes()
    root = Path(tempfile.mkdtemp(prefix="sshd-", dir=tmp))
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\n"
        f"AuthorizedKeysFile {root}/authorized_keys\nPidFile {root}/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n")  # StrictModes: the keys live in a temporary folder
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    subprocess.run([SSHD, "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")], check=True)
    pid = None
    try:
        nodes = Nodes(port, root / "client_key")
        deadline = time.monotonic() + 20
        while True:  # ready when both host names answer
            probe = subprocess.run(["pdsh", "-S", "-w", ",".join(HOSTS), "true"], capture_output=True, text=True,
                                   env={**os.environ, "PDSH_RCMD_TYPE": "ssh", **nodes.env})
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                log = (root / "sshd.log").read_text() if (root / "sshd.log").exists() else ""
                raise RuntimeError(f"test sshd on port {port} not reachable: {probe.stderr[-1000:]}\n{log[-2000:]}")
            time.sleep(0.2)
        pid = int((root / "sshd.pid").read_text())
        yield nodes
    finally:
        if pid is None and (root / "sshd.pid").exists():
            pid = int((root / "sshd.pid").read_text())
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
