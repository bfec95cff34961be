"""Shared fixtures: real shards of the embedded LSPET sample (shards/sample/lspet) and of the MPII fixtures,
untrained weights, one two-rank run; and the tiny config the training tests run."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main as mshg
from tests.helpers import (LSP_JOINTS, LSP_PAIRS, REPO, SAMPLE, SHARED_DATA,  # noqa: F401  (imported from here too)
                           lsp_record, mlflow_store, mlflow_store_template)


# `make test` runs the suite on 2 pytest-xdist workers (--dist loadgroup), and each worker builds its own
# session and module fixtures. The tests that share an expensive one (a training run, a server, a cluster)
# go to one worker together, so it is built once; the first name a test uses decides its group.
SHARED_FIXTURES = ("two_rank_run", "mlflow_server", "slurm", "finished_run", "lspet_out", "coco_shards")


def pytest_itemcollected(item: pytest.Item) -> None:  # before xdist's collection hook reads the groups
    shared = next((name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())), None)
    if shared:
        item.add_marker(pytest.mark.xdist_group(shared))


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
    return save_weights(model.state_dict(), tmp_path_factory.mktemp("w") / "model.safetensors", lsp_record(cfg))


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
    cosine, a global batch of 16 = micro-batches of 4 x 2 accumulated x 2 ranks, each micro-batch drawn 3
    from LSPET and 1 from MPII (16 joints mapped onto LSP's 14: upper_neck as neck); LSPET's 24 samples a
    rank make an epoch of 8 micro-batches, 4 steps; the loss weighted near the joints and their twins."""
    return tiny_config(tmp, shards, stop={"max_steps": 6}, train={
        "run_name": name, "micro_batch": 4, "global_batch": 16,
        "deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.yaml"),
        "optimizer": "rmsprop", "lr": 2.5e-4, "lr_schedule": "cosine", "warmup_steps": 2,
        "loss_fg_weight": 10.0, "loss_twin_weight": 5.0},
        data={"train_weight": 3.0, "extra_sets": [{"shards": str(mpii), "weight": 1.0, "joints": {"neck": "upper_neck"}}]})


@pytest.fixture(scope="session")
def two_rank_run(lspet_shards, mpii_shards, tmp_path_factory) -> tuple[Path, str]:
    """One 2-rank run of 6 steps (two_rank_config: ZeRO-3, accumulation, a mix of two datasets) started as
    on a cluster of two nodes: launch/deepspeed.sh --hostfile, the DeepSpeed launcher starting each node's
    rank through pdsh over a real sshd (tests/ssh_nodes.py; both "hosts" are this machine), DS_ACCELERATOR
    reaching the remote shells through .deepspeed_env as docs/cluster.md tells users. Returns (its folder,
    with runs/ddp and mlflow.db; its output). tests/test_train.py reads it; tests/test_resume.py resumes a
    twin started on one node against it. One run for all of these because each 2-rank launch costs ~30 s
    of start-up on 2 cores."""
    import subprocess

    from tests.helpers import free_port, run_env
    from tests.ssh_nodes import ssh_nodes

    tmp = tmp_path_factory.mktemp("ddp")
    cfg = two_rank_config(tmp, lspet_shards, mpii_shards, "ddp")
    (tmp / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\n")
    with ssh_nodes(tmp) as nodes:
        hostfile = nodes.hostfile(tmp / "hostfile", slots=1)
        cmd = [str(REPO / "launch" / "deepspeed.sh"), "--hostfile", str(hostfile), "--no_ssh_check",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(cfg)]
        proc = subprocess.run(cmd, cwd=tmp, env={**run_env(tmp), **nodes.env}, capture_output=True, text=True,
                              timeout=600)
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
def server_runs(mlflow_server, lspet_shards, tmp_path_factory) -> dict:
    """Two tiny runs logged over HTTP to the session's server, trained side by side (one core each):
    "tracked-run" (6 steps, an evaluation every 3, the MLflow model at the end; tests/test_track.py reads
    it) and "ui-b" (lr 3e-3, 4 steps; tests/test_ui.py compares the two). Returns {name: (client, run,
    its folder, the finished process)}."""
    import subprocess

    from mlflow.tracking import MlflowClient

    from tests.helpers import server_env, train_cmd

    # the export is bounded (train.log_model_timeout, 120 s): on 2 shared cores it took 48 s for the tiny model
    settings = {"tracked-run": ({"eval_every": 3, "log_model": True, "log_model_timeout": 600}, 6),
                "ui-b": ({"lr": 3e-3}, 4)}
    started = {}
    for name, (train, steps) in settings.items():
        tmp = tmp_path_factory.mktemp(name)
        cfg = tiny_config(tmp, lspet_shards, train={"run_name": name, **train}, stop={"max_steps": steps})
        # the tracker's HTTP defaults fail fast (track.HTTP_DEFAULTS); here two trainings, the server and the
        # other tests share 2 cores, so a request may wait longer than a user's would
        env = dict(server_env(mlflow_server.uri), MLFLOW_HTTP_REQUEST_MAX_RETRIES="4", MLFLOW_HTTP_REQUEST_TIMEOUT="60")
        started[name] = tmp, subprocess.Popen(train_cmd(cfg), cwd=tmp, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = {}
    for name, (tmp, proc) in started.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        found = client.search_runs([client.get_experiment_by_name("mshg").experiment_id],
                                   filter_string=f"attributes.run_name = '{name}'")
        assert len(found) == 1, f"run {name} not on the server:\n" + out[-3000:] + err[-3000:]
        # a tracker that gave up half-way leaves the run RUNNING: say so here, with its warning and the
        # server's log, rather than as four tests' bare assertions
        warned = [line for line in err.splitlines() if "UserWarning: MLflow " in line]
        assert not warned, (f"run {name}: the tracker gave up:\n" + "\n".join(warned) + "\nserver log:\n"
                            + mlflow_server.log.read_text()[-3000:])
        runs[name] = client, found[0], tmp, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


@pytest.fixture(scope="session")
def tracked_run(server_runs):
    """6 steps, an evaluation every 3 (steps 3 and 6), the MLflow model at the end, logged over HTTP:
    (client, run, its folder, the finished process)."""
    return server_runs["tracked-run"]


def tiny_config(tmp: Path, shards: dict[str, Path], **sections) -> Path:
    """A config small enough to train for a few steps in seconds on one core per rank."""
    import yaml

    cfg = {
        "name": "tiny",
        "model": {"channels": 16, "stages": [[2, 2], [4, 4], [8, 2]]},
        "data": {"train_shards": str(shards["train"]), "val_shards": str(shards["val"]), "input_size": 64,
                 "num_threads": 1, "shuffle_buffer": 16},
        # no MLflow model at the end (10-20 s of CPU each; tests/test_track.py logs one); one torch thread
        # a rank, so that a test's training and a fixture's started beside it each have a core
        "train": {"micro_batch": 4, "out_dir": str(tmp / "runs"), "lr": 1e-3, "log_model": False, "cpu_threads": 1},
        "stop": {"max_steps": 6},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    mlflow_store(tmp)  # the test's store (tests/helpers.run_env), a copy of the one migrated once per session
    return path
