"""Real training runs: DeepSpeed ZeRO-2 on 2 CPU ranks (gloo) from real shards, tracked in MLflow,
then the run's weights through `mshg evaluate` and `mshg predict`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main as mshg
from tests.conftest import REPO, SAMPLE, tiny_config

STAGES = [f"loss/stage_{i}" for i in range(1, 9)]


def run_env(tmp: Path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
               PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return env


def find_run(tmp: Path, name: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("mshg").experiment_id,
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def two_rank_run(lspet_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = tiny_config(tmp, lspet_shards, train={"run_name": "ddp", "zero_stage": 2}, stop={"max_steps": 5})
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29611",
           "--module", "pipeline.train", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp, env=run_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc.stdout


def test_two_rank_zero2_run_logs_every_stage_loss_to_mlflow(two_rank_run):
    tmp, stdout = two_rank_run
    assert "2 rank(s) on cpu" in stdout
    client, run = find_run(tmp, "ddp")
    assert run.info.status == "FINISHED"
    for key in STAGES + ["loss/total", "lr", "images_per_s"]:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4, 5], key
    total = client.get_metric_history(run.info.run_id, "loss/total")
    stage_sum = [sum(client.get_metric_history(run.info.run_id, k)[i].value for k in STAGES) for i in range(5)]
    assert [m.value for m in total] == pytest.approx(stage_sum, rel=1e-5)  # total = sum of the 8 stages
    assert run.data.params["train.zero_stage"] == "2"
    assert run.data.tags["stop_reason"] == "max_steps" and run.data.tags["stopped_at_step"] == "5"
    assert run.data.tags["world_size"] == "2"
    assert 0.0 <= run.data.metrics["final/pck"] <= 1.0
    assert "PCK@0.2 = " in stdout and "mlflow ui --backend-store-uri" in stdout


def test_run_directory_feeds_evaluate_and_predict(two_rank_run, lspet_shards, tmp_path, capsys):
    tmp, _ = two_rank_run
    run_dir = tmp / "runs" / "ddp"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000005"
    assert (run_dir / "model.safetensors").is_file()
    assert mshg(["evaluate", "--checkpoint", str(run_dir), "--shards", str(lspet_shards["val"])]) == 0
    assert "PCK@0.2 = " in capsys.readouterr().out

    images = [str(SAMPLE / "images" / "im00161.jpg"), str(SAMPLE / "images" / "im00162.jpg")]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "preds.json"
    assert mshg(["predict", "--checkpoint", str(run_dir), "--out", str(out), images[0], str(bad), images[1]]) == 0
    assert "broken.jpg: cannot read" in capsys.readouterr().err
    preds = json.loads(out.read_text())
    assert len(preds["joints"]) == 14 and preds["joints"][-1] == "head_top"
    assert [p["image"] for p in preds["predictions"]] == images
    import cv2
    h, w = cv2.imread(images[0]).shape[:2]
    for kp in preds["predictions"][0]["keypoints"]:
        x, y, score = kp
        # the whole image is the crop (padded by 1.25), so predictions land within it or its padding
        assert -0.15 * max(w, h) <= x <= 1.15 * max(w, h) and -0.15 * max(w, h) <= y <= 1.15 * max(w, h)


def test_convergence_stop_ends_a_real_training_on_its_own(lspet_shards, tmp_path):
    """A single-process run whose expected loss is reachable stops by convergence, not max_steps."""
    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "conv", "lr": 2e-3},
                      stop={"max_steps": 300, "expected_loss": 0.25, "window": 8, "tolerance": 0.5,
                            "smoothing": 0.5})
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(cfg)], cwd=tmp_path,
                          env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopping at step" in proc.stdout and ": converged" in proc.stdout
    _, run = find_run(tmp_path, "conv")
    assert run.data.tags["stop_reason"] == "converged"
    assert int(run.data.tags["stopped_at_step"]) < 300
