"""A real one-node SLURM cluster on localhost, for tests.

    from tests.slurm_cluster import slurm_cluster

    with slurm_cluster(tmp_path) as cluster:
        job = cluster.sbatch("job.sh", "--ntasks=2")
        info = cluster.wait(job, {"COMPLETED"}, timeout=60)

or, in a test module, the module-scoped fixture (one cluster for all the module's tests):

    from tests.slurm_cluster import slurm  # noqa: F401  (pytest finds the fixture by name)

    def test_x(slurm): ...

It runs the real daemons from Debian's slurm-wlm: its own munged (as user munge, own socket),
slurmctld and slurmd (as root), all configured under one temporary folder with ports picked at
run time, so two clusters (two pytest runs) on one machine do not meet. The settings are the ones
that work without systemd or cgroups (see ../shared/notes/platform-facts.md). The daemons are
stopped by the PIDs in their pid files, never by name, also when a test fails.

Without the SLURM binaries the tests are skipped locally and fail in CI (CI=true): CI must have
run .ci/install_slurm.sh.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import pytest
from tests.helpers import free_port  # noqa: F401  (also imported from here)

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
NOT_INSTALLED = "SLURM not installed: run .ci/install_slurm.sh"

# A job in one of these states will not change any more (unless something requeues it).
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_slurm() -> None:
    """Skip (locally) or fail (in CI) when the cluster cannot run here."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    reason = None
    if missing:
        reason = f"{NOT_INSTALLED} (missing: {', '.join(missing)})"
    elif os.geteuid() != 0:
        # slurmd launches jobs as their owner and munged must start as user munge: both need root.
        reason = "the SLURM test cluster needs root (slurmd, munged as user munge)"
    elif not Path("/etc/munge/munge.key").exists():
        reason = f"{NOT_INSTALLED} (no /etc/munge/munge.key)"
    if reason:
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)




def parse_scontrol_line(line: str) -> dict[str, str]:
    """'JobId=5 JobName=x Reason=None TRES=cpu=2,node=1' -> {'JobId': '5', ...}.

    Values can hold '=' (TRES) and, rarely, spaces (Command with arguments): a value runs until
    the next ' Key=' token."""
    return dict(re.findall(r"(\w[\w:/.-]*)=(.*?)(?=\s+\w[\w:/.-]*=|\s*$)", line.strip()))


class SlurmError(RuntimeError):
    pass


class Cluster:
    """Handle on a running test cluster; made by `slurm_cluster`."""

    def __init__(self, root: Path, node: str, env: dict[str, str]):
        self.root = root          # everything of this cluster lives under here
        self.node = node          # the node's name (the host name), e.g. for MASTER_ADDR checks
        self.env = env            # os.environ + SLURM_CONF: use it for any SLURM command you run
        self.conf = Path(env["SLURM_CONF"])
        self.start_seconds = 0.0  # daemons started to node idle (set by slurm_cluster)

    # --- commands ---------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a command against this cluster (SLURM_CONF set); output captured as text."""
        env = {**self.env, **kw.pop("env", {})}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def sbatch(self, script: str | Path, *args: str, env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> str:
        """Submit a batch script; returns the job id.

        `script` is a path, or the script's text when it starts with '#!' (written to a file).
        `args` go to sbatch: options before the script, so pass script arguments after '--'
        (e.g. sbatch(s, "--ntasks=2", "--", "arg")). `env` is added to the submitting environment,
        which the job inherits (sbatch's default --export=ALL). `cwd` is the job's working
        directory (default: the cluster root)."""
        script = str(script)
        if script.startswith("#!"):
            fd, path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.root)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            script = path
        args = list(args)
        script_args: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, script_args = args[:i], args[i + 1:]
        p = self.run("sbatch", "--parsable", *args, script, *script_args,
                     env=env or {}, cwd=str(cwd or self.root))
        return p.stdout.strip().split(";")[0]  # "ID" or "ID;cluster"

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run("scontrol", *args, check=check).stdout

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, StdOut, ...).
        Jobs stay visible for MinJobAge (300 s) after they end."""
        out = self.scontrol("show", "job", "-o", str(job_id)).strip()
        if not out:
            raise SlurmError(f"job {job_id} unknown")
        return parse_scontrol_line(out.splitlines()[0])

    def wait(self, job_id: str, states: str | Iterable[str] = ("COMPLETED",), timeout: float = 60,
             poll: float = 0.2) -> dict[str, str]:
        """Poll scontrol until the job is in one of `states`; returns its state dict.

        Raises at once if the job ends in another terminal state, and at `timeout`; the error
        message holds the job's state, its log and the daemons' logs (what you need to debug)."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while True:
            info = self.job_state(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in TERMINAL_STATES:
                raise SlurmError(f"job {job_id} ended {state}, expected {sorted(states)}\n"
                                 + self.describe(job_id, info))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s, expected "
                                   f"{sorted(states)}\n" + self.describe(job_id, info))
            time.sleep(poll)

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """Send `sig` to the batch shell only (`scancel --batch --signal=SIG`): it arrives at once."""
        self.run("scancel", "--batch", f"--signal={sig}", str(job_id))

    def cancel(self, job_id: str) -> None:
        self.run("scancel", str(job_id), check=False)

    # --- debugging --------------------------------------------------------------------------
    def log_tail(self, path: str | Path, lines: int = 40) -> str:
        try:
            return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"({e})"

    def describe(self, job_id: str, info: dict[str, str] | None = None) -> str:
        info = info or self.job_state(job_id)
        parts = [f"--- scontrol show job {job_id}: " + " ".join(f"{k}={v}" for k, v in info.items())]
        if info.get("StdOut"):
            parts.append(f"--- job log {info['StdOut']}:\n" + self.log_tail(info["StdOut"]))
        for name in ("slurmctld", "slurmd"):
            parts.append(f"--- {name}.log:\n" + self.log_tail(self.root / "log" / f"{name}.log", 15))
        return "\n".join(parts)


def _node_line(node_addr: str) -> tuple[str, str]:
    """The NodeName line for this machine, from `slurmd -C` (what slurmd will register)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    name = line.split()[0].split("=", 1)[1]
    return name, f"{line} NodeAddr={node_addr} State=UNKNOWN"


def write_conf(root: Path, extra: str = "") -> tuple[Path, str]:
    node, node_line = _node_line("127.0.0.1")
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# Written by tests/slurm_cluster.py for a throw-away one-node cluster.
ClusterName=mshg-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
# Daemons and jobs as root: the test machine is a container where we are root anyway.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged (see munge_dir); the system socket may belong to another cluster or none.
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again:
# 10 s keeps requeue tests short and is still ample for a step launch on localhost.
AuthInfo=socket={root / "munge" / "munge.socket"},cred_expire=10
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
# No systemd/cgroups here: track processes by parent pid; no task binding; no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
# Allocate CPUs only (no memory), so several small jobs can share the node.
SelectTypeParameters=CR_CPU
# FIFO scheduling starts a job as soon as it is submitted; backfill adds a periodic pass we
# do not need. A requeued job becomes eligible later (see cred_expire) and only the periodic
# main loop starts it then: run that loop every second, not every 60.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
# Batch jobs may be requeued (`sbatch --requeue`, `scontrol requeue`). This is the default,
# written out because the launch scripts rely on it. RequeueExit (slurm requeues a job that
# exits with a given code) is deliberately NOT set: the launch scripts requeue themselves with
# `scontrol requeue`, which works on clusters whose admins did not set RequeueExit, and a
# RequeueExit here would hide a broken self-requeue. Pass extra_conf="RequeueExit=75" to test it.
JobRequeue=1
# Short grace between SIGTERM and SIGKILL when a job is cancelled or requeued: tests wait for it.
KillWait=5
MinJobAge=300
ReturnToService=2
MailProg=/bin/true
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
{node_line}
{extra}
""")
    return conf, node


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers kill(0) but is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int | None, timeout: float = 10) -> None:
    if pid is None or not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds key=value: everything this cluster started (daemons,
    slurmstepd, job scripts and their tasks inherit our SLURM_CONF), found without matching names."""
    needle = f"{key}={value}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


@contextlib.contextmanager
def slurm_cluster(tmp_path: str | Path, extra_conf: str = "", start_timeout: float = 30) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd configured under `tmp_path`; yield a `Cluster`;
    stop them (by pid file) on exit, whatever happened."""
    require_slurm()
    root = Path(tmp_path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # munged runs as user munge and insists on owning its socket directory; pytest's tmp folders
    # are 0700 root, so its directory lives in /tmp and the slurm.conf points there.
    munge_dir = Path(tempfile.mkdtemp(prefix="mshg-munge-"))
    shutil.chown(munge_dir, "munge", "munge")
    munge_dir.chmod(0o755)  # munged wants its socket reachable by all (clients run as any user)
    (root / "munge").symlink_to(munge_dir)
    conf, node = write_conf(root, extra_conf)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # Jobs must not think they run inside another job (e.g. pytest started under srun).
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]
    pidfiles = {  # stop order: slurmd first, so jobs end before their controller
        "slurmd": root / "run" / "slurmd.pid",
        "slurmctld": root / "run" / "slurmctld.pid",
        "munged": munge_dir / "munged.pid",
    }
    cluster = Cluster(root, node, env)
    try:
        t0 = time.monotonic()
        subprocess.run(
            ["runuser", "-u", "munge", "--", "munged",
             f"--socket={munge_dir / 'munge.socket'}", f"--pid-file={pidfiles['munged']}",
             f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
            env=env, check=True, capture_output=True, text=True, timeout=30)
        # -i: ignore any saved state (fresh folder anyway); both daemonize and write pid files.
        subprocess.run(["slurmctld", "-i"], env=env, check=True, capture_output=True, text=True, timeout=30)
        subprocess.run(["slurmd", "-N", node], env=env, check=True, capture_output=True, text=True, timeout=30)
        _wait_node_idle(cluster, start_timeout)
        cluster.start_seconds = time.monotonic() - t0
        yield cluster
    except subprocess.CalledProcessError as e:
        raise SlurmError(f"{' '.join(e.cmd)} failed ({e.returncode}): {e.stdout}{e.stderr}\n"
                         + cluster.log_tail(root / "log" / "slurmctld.log") + "\n"
                         + cluster.log_tail(root / "log" / "slurmd.log")) from None
    finally:
        # Cancel jobs first so slurmd can end their steps cleanly, then stop the daemons by pid.
        with contextlib.suppress(Exception):
            cluster.run("scancel", f"--user={os.getuid()}", check=False, timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and cluster.run(
                    "squeue", "-h", "-t", "RUNNING,COMPLETING", check=False, timeout=10).stdout.strip():
                time.sleep(0.2)
        for pidfile in pidfiles.values():
            _stop_pid(_read_pid(pidfile))
        # proctrack/linuxproc does not end orphans: whatever still carries our SLURM_CONF
        # (a stray slurmstepd, a task a test script left behind) is ours to kill.
        for pid in _pids_with_env("SLURM_CONF", str(conf)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(munge_dir, ignore_errors=True)


def _wait_node_idle(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        p = cluster.run("sinfo", "-h", "-n", cluster.node, "-o", "%T", check=False, timeout=10)
        state = p.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.2)
    raise SlurmError(f"node {cluster.node} not idle after {timeout} s (state {state!r})\n"
                     + cluster.log_tail(cluster.root / "log" / "slurmctld.log")
                     + "\n" + cluster.log_tail(cluster.root / "log" / "slurmd.log"))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[Cluster]:
    """One cluster for all tests of a module (starting one takes a few seconds)."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
