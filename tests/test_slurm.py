"""Real SLURM (munged, slurmctld, slurmd on localhost; see tests/slurm_cluster.py).

Two kinds of tests, both on launch/slurm/train_cpu.sbatch unchanged:
- launch-script tests with MSHG_ENTRY pointing at a stand-in for pipeline.train (FAKE_TRAINER
  below) that keeps the trainer's contract (rank variables; on USR1/TERM write `latest`, exit 75;
  resume when `latest` exists): seconds each, and they pin down the script's own behaviour;
- end-to-end tests with the real trainer (2 DeepSpeed ranks over gloo, DALI, real shards, MLflow
  in SQLite): a job whose rank is SIGKILLed mid-run fails; a new job continues its run, is signalled,
  checkpoints, requeues itself and resumes: one continuous MLflow history across the three starts.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import _pids_with_env, slurm  # noqa: F401  (the module-scoped cluster fixture)

REPO = Path(__file__).resolve().parents[1]
CPU_SBATCH = REPO / "launch" / "slurm" / "train_cpu.sbatch"
CONFIG = str(REPO / "configs" / "lspet_cpu.yaml")  # a real config: the stand-in loads it as the trainer would

FAKE_TRAINER = r'''
"""Stand-in for pipeline.train, for the faults the real trainer cannot produce on cue (a rank SIGKILLed
while its peer hangs; a signal at a known moment, seconds after the start). It keeps the real contract:
the trainer's arguments (--config FILE, --local_rank, key=value overrides) read by the real config loader,
so a missing file or a wrong key fails as in pipeline.train (one line, exit 2); the run folder
train.out_dir/train.run_name; on USR1/TERM `latest` written and exit 75; a resume when `latest` exists.
What it does is chosen by MSHG_FAKE_MODE (print, preempt, die), an environment variable and not a config
key, since the real loader refuses keys it does not know."""
import argparse, os, signal, sys, time
from pathlib import Path

from pipeline.config import ConfigError, load_config

parser = argparse.ArgumentParser(prog="python -m pipeline.train")  # pipeline.train.parse_args's arguments
parser.add_argument("--config", required=True)
parser.add_argument("--local_rank", type=int, default=None)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
env = {k: os.environ.get(k, "") for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "RANK",
       "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR",
       "OMP_NUM_THREADS", "SLURM_RESTART_COUNT")}
print("FAKE " + " ".join(f"{k}={v}" for k, v in env.items()) + " ARGV=" + "|".join(sys.argv[1:]), flush=True)
try:
    cfg = load_config(args.config, args.overrides)
except ConfigError as e:  # as pipeline.train.main
    print(f"python -m pipeline.train: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
rank = int(os.environ["RANK"])
run = Path(cfg.train.out_dir) / cfg.train.run_name
latest = run / "checkpoints" / "latest"
mode = os.environ.get("MSHG_FAKE_MODE", "print")

def ready():  # tells the test this rank is up and its handlers are installed
    run.mkdir(parents=True, exist_ok=True)
    (run / f"ready.{rank}").write_text(str(os.getpid()))

if mode == "print":
    sys.exit(0)
if mode == "preempt":
    if latest.exists():
        print(f"FAKE rank {rank} resumed from {latest.read_text()}", flush=True)
        sys.exit(0)
    def on_signal(sig, frame):
        print(f"FAKE rank {rank} got {signal.Signals(sig).name}: checkpoint, exit 75", flush=True)
        if rank == 0:
            latest.parent.mkdir(parents=True, exist_ok=True)
            latest.write_text("step-7")
        sys.exit(75)
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ready()
    time.sleep(60)
    sys.exit(1)  # no signal came
if mode == "die":
    # Rank 1 dies hard; rank 0 "hangs in a collective" (ignores TERM, as a blocked rank may).
    ready()
    if rank == 1:
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)
    sys.exit(0)
sys.exit(f"fake trainer: unknown MSHG_FAKE_MODE={mode}")
'''


@pytest.fixture
def workdir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A submit directory (logs/ made, as users must) and the env that runs the stand-in."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    # the job's PYTHONPATH is MSHG_ROOT's (common.sh) followed by this one: the stand-in imports pipeline.config
    env = {"MSHG_ROOT": str(REPO), "MSHG_ENTRY": "fake_train", "PYTHONPATH": str(tmp_path)}
    return tmp_path, env


def test_the_stand_in_reads_its_arguments_as_the_trainer_does(tmp_path, capsys):
    """No SLURM needed: the stand-in and pipeline.train refuse a key the config does not have (the old
    `train.max_steps`) with the same line and exit 2, and both accept the real config with a real key."""
    import subprocess
    import sys

    from pipeline.train import main as real_trainer

    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}", "RANK": "0"}  # common.sh: MSHG_ROOT first

    def fake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fake_train", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    wrong = fake("--config", CONFIG, "train.max_steps=3")
    assert real_trainer(["--config", CONFIG, "train.max_steps=3"]) == 2
    real_line = capsys.readouterr().err.splitlines()[0]
    assert wrong.returncode == 2 and "Key 'max_steps' not in 'TrainConfig'" in real_line, wrong.stderr
    assert wrong.stderr.splitlines()[0] == real_line
    missing = fake("--config", "configs/tiny.yaml")  # no such config: refused, as by the trainer
    assert missing.returncode == 2 and "configs/tiny.yaml" in missing.stderr, missing.stderr
    ok = fake("--config", CONFIG, "train.run_name=r", "stop.max_steps=3")
    assert ok.returncode == 0 and "ARGV=--config|" in ok.stdout, ok.stderr


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def fake_lines(log: str) -> list[dict[str, str]]:
    rows = []
    for line in log.splitlines():
        if line.startswith("FAKE SLURM_PROCID="):
            rows.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return sorted(rows, key=lambda r: r["RANK"])


def test_two_task_job_gets_rank_variables(slurm, workdir):
    cwd, env = workdir
    t0 = time.monotonic()
    job = slurm.sbatch(CPU_SBATCH, "--", CONFIG, "stop.max_steps=3", env=env, cwd=cwd)
    info = slurm.wait(job, "COMPLETED", timeout=60)
    elapsed = time.monotonic() - t0
    assert info["ExitCode"] == "0:0"
    # logs/%x-%j.out relative to the submit directory
    log_path = cwd / "logs" / f"mshg-cpu-{job}.out"
    assert info["StdOut"] == str(log_path)
    log = log_path.read_text()
    rows = fake_lines(log)
    assert len(rows) == 2, log
    from pipeline.distributed import slurm_master_port

    port = str(slurm_master_port(int(job)))  # the script's rule and the trainer's fallback are one rule
    for local, row in enumerate(rows):
        assert row["RANK"] == row["SLURM_PROCID"] == str(local), row
        assert row["LOCAL_RANK"] == row["SLURM_LOCALID"] == str(local), row  # one node
        assert row["WORLD_SIZE"] == row["SLURM_NTASKS"] == "2", row
        assert row["MASTER_ADDR"] == slurm.node, row
        assert row["MASTER_PORT"] == port, row
        assert row["DS_ACCELERATOR"] == "cpu", row
        assert row["OMP_NUM_THREADS"] == "1", row  # --cpus-per-task=1
        # config first, our run name, then the user's overrides (which may override it)
        assert row["ARGV"] == f"--config|{CONFIG}|train.run_name=slurm-{job}|stop.max_steps=3", row
    assert "ranks finished with exit code 0" in log
    print(f"2-task job: submit to COMPLETED {elapsed:.1f} s")


def test_batch_shell_runs_its_usr1_trap(slurm, tmp_path):
    script = """#!/bin/bash
trap 'echo "trap: got USR1"; exit 0' USR1
echo started
# sleep in the background and wait: bash runs a trap only between commands
sleep 60 & wait
echo "no signal came"
exit 1
"""
    job = slurm.sbatch(script, "--ntasks=1", f"--output={tmp_path}/trap-%j.out", cwd=tmp_path)
    slurm.wait(job, "RUNNING", timeout=30)
    out = tmp_path / f"trap-{job}.out"
    wait_for(lambda: out.exists() and "started" in out.read_text(), 30, "job script did not start")
    slurm.signal_batch(job, "USR1")
    info = slurm.wait(job, "COMPLETED", timeout=30)
    assert info["ExitCode"] == "0:0"
    assert "trap: got USR1" in out.read_text()


def test_usr1_checkpoints_requeues_and_resumes(slurm, workdir):
    """The launch script forwards USR1 to the ranks; they exit 75; the script requeues the job;
    the job starts again (SLURM_RESTART_COUNT=1), same run name, and resumes from `latest`."""
    cwd, env = workdir
    t0 = time.monotonic()
    job = slurm.sbatch(CPU_SBATCH, "--", CONFIG, env={**env, "MSHG_FAKE_MODE": "preempt"}, cwd=cwd)
    run = cwd / "runs" / f"slurm-{job}"
    wait_for(lambda: all((run / f"ready.{r}").exists() for r in (0, 1)), 30, "ranks did not start")
    slurm.signal_batch(job, "USR1")
    slurm.wait(job, {"PENDING", "REQUEUED"}, timeout=30)  # requeued, waiting for its BeginTime
    info = slurm.wait(job, "COMPLETED", timeout=45)
    elapsed = time.monotonic() - t0
    assert info["Restarts"] == "1"
    assert info["ExitCode"] == "0:0"
    assert (run / "checkpoints" / "latest").read_text() == "step-7"
    log = (cwd / "logs" / f"mshg-cpu-{job}.out").read_text()  # both runs, appended
    assert "got SIGUSR1: forwarding it to the ranks" in log
    assert log.count("got SIGUSR1: checkpoint, exit 75") == 2, log  # both ranks
    assert "ranks finished with exit code 75" in log
    assert f"requeueing job {job}" in log
    assert f"job {job} (mshg-cpu) restart 1" in log
    rows = [r for r in fake_lines(log) if r["SLURM_RESTART_COUNT"] == "1"]
    assert len(rows) == 2 and all(f"train.run_name=slurm-{job}" in r["ARGV"] for r in rows), log
    assert log.count("resumed from step-7") == 2, log
    print(f"signal -> requeue -> resumed -> COMPLETED: {elapsed:.1f} s")


def test_dead_rank_ends_job_and_all_its_processes(slurm, workdir):
    """One rank SIGKILLed while the other hangs: srun --wait ends the step in bounded time,
    the job FAILS, and no process of the job survives (proctrack/linuxproc kills nothing else)."""
    cwd, env = workdir
    env = {**env, "MSHG_SRUN_WAIT": "3", "MSHG_FAKE_MODE": "die"}
    t0 = time.monotonic()
    job = slurm.sbatch(CPU_SBATCH, "--", CONFIG, env=env, cwd=cwd)
    run = cwd / "runs" / f"slurm-{job}"
    wait_for(lambda: (run / "ready.0").exists(), 30, "rank 0 did not start")
    pid0 = int((run / "ready.0").read_text())
    info = slurm.wait(job, "FAILED", timeout=40)
    elapsed = time.monotonic() - t0
    assert info["ExitCode"] != "0:0"
    assert elapsed < 30, f"the job took {elapsed:.0f} s to fail"
    # rank 0 ignored SIGTERM: it must have been SIGKILLed by the step's end
    wait_for(lambda: not os.path.exists(f"/proc/{pid0}") or
             Path(f"/proc/{pid0}/stat").read_text().split(")")[-1].split()[0] == "Z", 10,
             f"rank 0 (pid {pid0}) survived its job")
    print(f"dead rank -> job FAILED in {elapsed:.1f} s")


# --- end to end, with the real trainer -------------------------------------------------------------

@pytest.fixture
def real_job(tmp_path: Path, lspet_shards) -> tuple[Path, dict[str, str]]:
    """A submit directory with a tiny config on real shards, and the env of a real training job."""
    from tests.conftest import tiny_config

    (tmp_path / "logs").mkdir()
    # 48 samples, 2 ranks x 4: 6 steps per epoch
    tiny_config(tmp_path, lspet_shards, train={"out_dir": "runs"})  # and the store, mlflow.db (migrated once)
    env = {"MSHG_ROOT": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PYTHONPATH": str(REPO)}
    return tmp_path, env


def mlflow_history(cwd: Path, run_name: str, key: str = "loss/total"):
    from tests.helpers import find_run, metric_history

    client, run = find_run(cwd, run_name)
    return run, [step for step, _ in metric_history(client, run.info.run_id, key)]


def job_log(cwd: Path, job: str) -> str:
    path = cwd / "logs" / f"mshg-cpu-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_real_jobs_killed_rank_then_signal_and_requeue_continue_one_run(slurm, real_job):
    """Real 2-rank training jobs under sbatch/srun, one MLflow run across three starts:
    1. a rank SIGKILLed mid-run fails the job within a minute, and its last checkpoint is whole;
    2. a new job continues that run (MSHG_RUN_NAME) from the checkpoint and, signalled as SLURM does
       before a time limit, checkpoints, exits 75 and the script requeues it;
    3. the requeued job resumes and completes: one continuous history, FINISHED."""
    cwd, env = real_job
    env = {**env, "MSHG_SRUN_WAIT": "10"}
    t0 = time.monotonic()
    job = slurm.sbatch(CPU_SBATCH, "--", "tiny.yaml", "stop.max_steps=500", "train.checkpoint_every=2",
                       env=env, cwd=cwd)
    name = f"slurm-{job}"
    ckpts = cwd / "runs" / name / "checkpoints"
    wait_for(lambda: (ckpts / "latest").exists(), 300, "no checkpoint written")

    def rank1() -> list[int]:
        pids = set(_pids_with_env("SLURM_JOB_ID", job)) & set(_pids_with_env("SLURM_PROCID", "1"))
        return [p for p in pids if b"pipeline.train" in Path(f"/proc/{p}/cmdline").read_bytes()]

    victims = rank1()
    assert len(victims) == 1, victims
    os.kill(victims[0], 9)
    t_kill = time.monotonic()
    info = slurm.wait(job, "FAILED", timeout=120)
    failed_after = time.monotonic() - t_kill
    assert failed_after < 60, f"the job took {failed_after:.0f} s to fail after a rank died"
    latest = (ckpts / "latest").read_text()
    assert (ckpts / latest / "meta.json").is_file(), latest
    k = int(latest[4:])

    # the log shows every 10th step: signal once the first of them after the resume is out, 40 steps before
    # the end (~5 s of tiny training here; the signal takes well under a second to reach the ranks)
    shown = (k // 10 + 1) * 10
    n = shown + 40
    again = slurm.sbatch(CPU_SBATCH, "--", "tiny.yaml", f"stop.max_steps={n}", env={**env, "MSHG_RUN_NAME": name},
                         cwd=cwd)
    wait_for(lambda: re.search(rf"step +{shown} epoch", job_log(cwd, again)), 300, "the new job did not train")
    slurm.signal_batch(again, "USR1")
    slurm.wait(again, {"PENDING", "REQUEUED"}, timeout=120)
    info = slurm.wait(again, "COMPLETED", timeout=300)
    log = job_log(cwd, again)  # both starts of the job, appended
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", log
    assert f"resumed at step {k}" in log, log
    assert "ranks finished with exit code 75" in log and f"requeueing job {again}" in log, log
    j = int(re.search(r"stopping at step (\d+): signal", log).group(1))
    assert shown <= j < n, log
    assert re.search(rf"checkpoint step{j:08d} written [\d.]+ s after SIGUSR1", log), log
    assert f"resumed at step {j}" in log, log
    run, steps = mlflow_history(cwd, name)  # the same MLflow run, continued twice
    assert run.info.status == "FINISHED"
    assert steps == list(range(1, n + 1)), steps  # one value per step across the three starts
    assert run.data.tags["world_size"] == "2" and run.data.tags["stop_reason"] == "max_steps"
    assert (ckpts / "latest").read_text() == f"step{n:08d}"
    assert (cwd / "runs" / name / "model.safetensors").is_file()
    print(f"killed rank: FAILED {failed_after:.1f} s after the kill; resumed at {k}, signalled at {j}, "
          f"requeued, COMPLETED {time.monotonic() - t0:.1f} s")
