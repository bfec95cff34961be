"""Shared fixtures: real shards of the embedded LSPET sample (shards/sample/lspet) and of the MPII fixtures,
untrained weights, one two-rank run; and the tiny config the training tests run."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.cli import main as mshg
from tests.helpers import LSP_JOINTS, LSP_PAIRS, REPO, SAMPLE, SHARED_DATA  # noqa: F401  (imported from here too)


def shard_sample(out: Path, first: int, last: int) -> Path:
    assert mshg(["shard", "lspet", "--root", str(SAMPLE), "--out", str(out), "--range", f"{first}:{last}",
                 "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def lspet_shards(tmp_path_factory) -> dict[str, Path]:
    """Train: images 1-48 of the embedded sample; val: 161-176 (held apart, as in the demo)."""
    root = tmp_path_factory.mktemp("shards")
    return {"train": shard_sample(root / "train", 1, 48), "val": shard_sample(root / "val", 161, 176)}


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """An untrained tiny model's weights file (what a run writes): predict and export need weights, not skill."""
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.weights import save_weights

    torch.manual_seed(0)
    cfg = load_config(None, ["name=tiny", "model.channels=16", "data.input_size=64"])
    model = build_model(cfg.model, 14, 64)
    return save_weights(model.state_dict(), tmp_path_factory.mktemp("w") / "model.safetensors", cfg,
                        LSP_JOINTS, LSP_PAIRS)


@pytest.fixture(scope="session")
def mpii_shards(tmp_path_factory) -> Path:
    """The 5 MPII fixture photographs (16 joints), sharded."""
    out = tmp_path_factory.mktemp("mpii") / "mpii"
    fixtures = REPO / "tests" / "fixtures" / "mpii"
    assert mshg(["shard", "mpii", "--images", str(fixtures), "--annotations", str(fixtures / "test_mpii.json"),
                 "--out", str(out), "--quiet"]) == 0
    return out


def two_rank_config(tmp: Path, shards: dict[str, Path], mpii: Path, name: str) -> Path:
    """The shared two-rank run's config: ZeRO-3 (configs/deepspeed/zero3.yaml), RMSprop with warm-up and
    cosine, each micro-batch of 8 drawn 6 from LSPET and 2 from MPII (16 joints mapped onto LSP's 14:
    upper_neck as neck); LSPET's 24 samples a rank make an epoch of 4 steps."""
    return tiny_config(tmp, shards, stop={"max_steps": 6}, train={
        "run_name": name, "micro_batch": 8, "deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.yaml"),
        "optimizer": "rmsprop", "lr": 2.5e-4, "lr_schedule": "cosine", "warmup_steps": 2},
        data={"train_weight": 3.0, "extra_sets": [{"shards": str(mpii), "weight": 1.0, "joints": {"neck": "upper_neck"}}]})


@pytest.fixture(scope="session")
def two_rank_run(lspet_shards, mpii_shards, tmp_path_factory) -> tuple[Path, str]:
    """One 2-rank run of 6 steps (two_rank_config: ZeRO-3, a mix of two datasets) through
    launch/deepspeed.sh, as a user starts it on one node: (its folder, with runs/ddp and mlflow.db; its
    output). tests/test_train.py reads it; tests/test_resume.py resumes a twin against it. One run for
    all of these because each 2-rank launch costs ~30 s of start-up on 2 cores."""
    import subprocess

    from tests.helpers import free_port, run_env

    tmp = tmp_path_factory.mktemp("ddp")
    cfg = two_rank_config(tmp, lspet_shards, mpii_shards, "ddp")
    cmd = [str(REPO / "launch" / "deepspeed.sh"), "--num_gpus", "2", "--master_port", str(free_port()), str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp, env=run_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (tests/mlflow_server.py) for the session: tests/test_track.py
    reads the tracked run back from it, tests/test_ui.py compares that run with a second in the browser."""
    from tests.mlflow_server import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def tracked_run(mlflow_server, lspet_shards, tmp_path_factory):
    """6 steps, an evaluation every 3 (steps 3 and 6), the MLflow model at the end, logged over HTTP:
    (client, run, its folder, the finished process)."""
    import subprocess

    from mlflow.tracking import MlflowClient

    from tests.helpers import server_env, train_cmd

    tmp = tmp_path_factory.mktemp("tracked")
    cfg = tiny_config(tmp, lspet_shards, train={"run_name": "tracked-run", "eval_every": 3, "log_model": True},
                      stop={"max_steps": 6})
    proc = subprocess.run(train_cmd(cfg), cwd=tmp, env=server_env(mlflow_server.uri), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("mshg").experiment_id],
                              filter_string="attributes.run_name = 'tracked-run'")
    assert len(runs) == 1
    return client, runs[0], tmp, proc


def tiny_config(tmp: Path, shards: dict[str, Path], **sections) -> Path:
    """A config small enough to train for a few steps in seconds on one core per rank."""
    import yaml

    cfg = {
        "name": "tiny",
        "model": {"channels": 16, "stages": [[2, 2], [4, 4], [8, 2]]},
        "data": {"train_shards": str(shards["train"]), "val_shards": str(shards["val"]), "input_size": 64,
                 "num_threads": 1, "shuffle_buffer": 16},
        # no MLflow model at the end (10-20 s of CPU each); tests/test_track.py logs one
        "train": {"micro_batch": 4, "out_dir": str(tmp / "runs"), "lr": 1e-3, "log_model": False},
        "stop": {"max_steps": 6},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if not (tmp / "mlflow.db").exists():  # the test's store (tests/helpers.run_env), created once per session
        shutil.copy(mlflow_store_template(), tmp / "mlflow.db")
    return path


@functools.cache
def mlflow_store_template() -> Path:
    """An empty MLflow SQLite store, migrated once per session: each test's training starts from a copy
    instead of running MLflow's schema migrations (seconds per store, ~30 stores) itself."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="mshg-mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"
