"""Plain helpers the test modules share (fixtures live in conftest.py): the environment and command of a
training process (run to its end, or in the background), a Python snippet in a subprocess, free ports, a
test's MLflow store, its runs by name and their metric histories, tar members rewritten."""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "shards" / "sample" / "lspet"
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data, present on the team's machines and in CI
STAGES = [f"loss/stage_{i}" for i in range(1, 9)]
LSP_JOINTS = ["right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "right_wrist",
              "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist", "neck", "head_top"]
LSP_PAIRS = [[0, 5], [1, 4], [2, 3], [6, 11], [7, 10], [8, 9]]


def lsp_record(cfg):
    """The model record of a model of `cfg` that predicts the LSP joints (what a run on LSP shards writes)."""
    from pipeline.model_record import ModelRecord
    from shards.datasets import skeleton_for

    return ModelRecord(cfg, LSP_JOINTS, LSP_PAIRS, [list(p) for p in skeleton_for(14)])


def free_port() -> int:
    """A port the kernel just handed out (fixed ports collide when two test runs share a machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def no_rank_started(monkeypatch):
    """A `mshg train --ranks N` inside must stop before the DeepSpeed launcher starts a rank: the launcher's
    subprocess.call is replaced by one that records the command and fails, and the block must not reach it.
    An ordering, not a wall-clock bound (on 2 loaded cores that measures the imports, not the check)."""
    import pipeline.cli

    started = []
    with monkeypatch.context() as m:
        m.setattr(pipeline.cli.subprocess, "call", lambda cmd, *a, **k: started.append(cmd) or 1)
        yield started
    assert not started, f"the launcher was started: {' '.join(map(str, started[0]))}"


def run_env(tmp: Path | None = None, tracking_uri: str | None = None, **extra: str) -> dict:
    """A training process's environment: the CPU accelerator, this repo importable, this venv's launchers
    on PATH, and MLflow in `tmp`/mlflow.db (or `tracking_uri`)."""
    uri = tracking_uri or f"sqlite:///{tmp}/mlflow.db"
    return dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO),
                PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra)


def server_env(uri: str) -> dict:
    """A training process's environment against the MLflow server `uri`, system metrics every second."""
    return run_env(tracking_uri=uri, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1", OMP_NUM_THREADS="1")


def train_cmd(cfg: Path, *overrides: str, ranks: int = 1) -> list[str]:
    """One process runs pipeline.train itself; more go through `mshg train --ranks N` (the launcher)."""
    if ranks == 1:
        return [sys.executable, "-m", "pipeline.train", "--config", str(cfg), *overrides]
    return [sys.executable, "-m", "pipeline.cli", "train", "--ranks", str(ranks), "--master-port", str(free_port()),
            "--config", str(cfg), *overrides]


def train(tmp: Path, cfg: Path, *overrides: str, ranks: int = 1, timeout: int = 600, check: bool = True,
          merged: bool = False) -> subprocess.CompletedProcess:
    """A training to its end, in `tmp`; with `check`, it must succeed (its output's tail says why not). With
    `merged`, stderr goes into `stdout` in the order it was written (`stderr` is then None)."""
    proc = subprocess.run(train_cmd(cfg, *overrides, ranks=ranks), cwd=tmp, env=run_env(tmp), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + (proc.stderr or "")[-4000:]
    return proc


def run_python(cwd: Path, code: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -c code args...` in `cwd`, in `env` (default: run_env(cwd), MLflow in `cwd`/mlflow.db), its
    output captured as text; the caller checks its exit status."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=run_env(cwd) if env is None else env,
                          capture_output=True, text=True, timeout=timeout)


class Training:
    """A training started in the background in `tmp` (stdout and stderr merged into `lines`, read by a
    thread as they come), for the tests that act on it while it runs: `wait_for` a line, then signal it."""

    def __init__(self, tmp: Path, cfg: Path, *overrides: str, env: dict | None = None):
        import threading

        self.proc = subprocess.Popen(train_cmd(cfg, *overrides), cwd=tmp, env=env or run_env(tmp),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str = r"step +1 epoch", timeout: float = 300) -> str:
        """The first line matching `pattern` (default: step 1's log line), once it is out; fails, with the
        output's tail, if the training ends or `timeout` s pass first."""
        import re
        import time

        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if re.search(pattern, line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                assert not self._ended and left > 0, (
                    f"no line matching {pattern!r} ({'the training ended' if self._ended else 'timed out'}):\n"
                    + self.output[-3000:])
                self._changed.wait(left)

    def wait(self, timeout: float = 120) -> int:
        """The exit status, once the process has ended and its output is all in `lines`."""
        import time

        deadline = time.monotonic() + timeout
        code = self.proc.wait(timeout)
        with self._changed:
            self._changed.wait_for(lambda: self._ended, max(deadline - time.monotonic(), 10))
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(60)


def tar_members(path: Path) -> list:
    """[(TarInfo, bytes)] of the files of tar `path`, in order."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]


def rewrite_tar(path: Path, change) -> None:
    """Rewrite tar `path` with each member's bytes replaced by `change(name, data)` (same names, order
    and metadata; sizes follow the new bytes). The DALI index and manifest are the caller's to fix, or to
    leave stale on purpose (see `reseal`)."""
    import io
    import tarfile

    members = tar_members(path)
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            data = change(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def reseal(shard_dir: Path, *tars: str) -> None:
    """The manifest's sha256 and byte count of the tars named (default: all) made to match the files again:
    a damaged set that passes the checksum check, so that a content check must find the damage."""
    import hashlib
    import json

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for shard in (s for s in manifest["shards"] if not tars or s["tar"] in tars):
        tar = shard_dir / shard["tar"]
        shard.update(sha256=hashlib.sha256(tar.read_bytes()).hexdigest(), bytes=tar.stat().st_size)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


@functools.cache
def mlflow_store_template() -> Path:
    """An empty MLflow SQLite store, migrated once per session: each test's store starts as a copy instead of
    running MLflow's schema migrations (seconds per store, ~30 stores) itself."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mshg-mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    mlflow_client(folder).search_experiments()
    return folder / "mlflow.db"


def mlflow_store(tmp: Path) -> str:
    """The test's store `tmp`/mlflow.db (what run_env points MLflow at), a copy of the migrated template
    unless it is there already; returns its tracking URI."""
    import shutil

    if not (tmp / "mlflow.db").exists():
        shutil.copy(mlflow_store_template(), tmp / "mlflow.db")
    return f"sqlite:///{tmp}/mlflow.db"


def mlflow_client(where: Path | str):
    """An MlflowClient of the store `where`/mlflow.db (a test's folder) or of the tracking URI `where`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=str(where) if "://" in str(where) else f"sqlite:///{where}/mlflow.db")


def find_run(where: Path | str, name: str, why: str = "a resume must continue the same run"):
    """(client, the one MLflow run named `name`) of experiment "mshg" in the store `where` (mlflow_client);
    another count fails, saying `why` one was expected."""
    client = mlflow_client(where)
    runs = client.search_runs([client.get_experiment_by_name("mshg").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}: {why}"
    return client, runs[0]


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of metric `key` of the run, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def checkpoint_meta(tmp: Path, name: str) -> dict:
    """The meta.json of run `name`'s latest checkpoint under `tmp`/runs."""
    import json

    ckpts = tmp / "runs" / name / "checkpoints"
    return json.loads((ckpts / (ckpts / "latest").read_text() / "meta.json").read_text())


def assert_accumulated_steps(tmp: Path, name: str, output: str, *, ranks: int, micro: int, accum: int, steps: int,
                             zero_stage: int) -> None:
    """A run of stop.max_steps=`steps`, `accum` micro-batches of `micro` a step: `steps` optimizer steps, the
    trainer's step equal to DeepSpeed's global_steps, the stop/log/checkpoint at the last step (not a
    micro-batch early or late), one logged value per step."""
    assert f"batch {micro * accum * ranks} = {micro} x {accum} accumulation x {ranks} rank(s)" in output
    meta = checkpoint_meta(tmp, name)
    assert meta["step"] == meta["engine_steps"] == steps and meta["micro_batches"] == steps * accum
    client, run = find_run(tmp, name)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == list(range(1, steps + 1))
    assert run.data.tags["stopped_at_step"] == str(steps) and run.data.tags["zero_stage"] == str(zero_stage)
