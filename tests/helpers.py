"""Plain helpers the test modules share (fixtures live in conftest.py): the environment and command of a
training process, free ports, the MLflow run of a test's store."""
from __future__ import annotations

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


def free_port() -> int:
    """A port the kernel just handed out (fixed ports collide when two test runs share a machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def train(tmp: Path, cfg: Path, *overrides: str, ranks: int = 1, timeout: int = 600,
          check: bool = True) -> subprocess.CompletedProcess:
    """A training to its end, in `tmp`; with `check`, it must succeed (its output's tail says why not)."""
    proc = subprocess.run(train_cmd(cfg, *overrides, ranks=ranks), cwd=tmp, env=run_env(tmp), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def find_run(tmp: Path | str, name: str):
    """(client, the one MLflow run named `name`) of the store `tmp`/mlflow.db (or a tracking URI)."""
    from mlflow.tracking import MlflowClient

    uri = str(tmp) if "://" in str(tmp) else f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("mshg").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}: a resume must continue the same run"
    return client, runs[0]


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
