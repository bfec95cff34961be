"""bench/gpu_smoke.py and bench/gpu_levers.py where there is no GPU: what runs without CUDA runs here (the
lever loop on the CPU with a tiny model, its time budget, MFU arithmetic, the as-trained row, the repeated
sample the --perf run trains on), and both scripts say "no GPU" and exit 0. The compiled rows are left out
(minutes of C++ builds on 2 cores; tests/test_compile.py compiles the trainer's model)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench.gpu_levers import LEVERS, main as levers_main, mfu, peak_tflops, run_levers
from bench.gpu_smoke import CONFIG, as_trained, flop_utilisation, repeated_sample
from pipeline.config import load_config
from tests.helpers import REPO

TINY = ["train.device=cpu", "model.channels=8", "model.stages=[[4,1]]", "data.input_size=64", "train.micro_batch=4"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the scripts would measure it")
def test_both_scripts_say_no_gpu_and_exit_0():
    for script in ("gpu_smoke.py", "gpu_levers.py"):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--perf" if script == "gpu_smoke.py" else "--steps=1"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "no GPU" in proc.stdout and "|" not in proc.stdout  # a line, no table


def test_mfu_counts_forward_and_backward_against_the_bf16_peak():
    # 1 GFLOP forward x 3 x 100 img/s = 300 GFLOP/s = 30 % of 1 TFLOP/s
    assert mfu(1e9, 100, 1.0) == pytest.approx(30.0)
    assert mfu(1e9, 100, None) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("Some CPU") is None
    # the 2026-12-04 model row: 89.7 GFLOPs/img at 165 img/s on an H200 was 4.5 %
    assert flop_utilisation(89.7e9, 165, "NVIDIA H200") == "4.5 % of 989 TFLOP/s bf16"


def test_the_lever_loop_runs_every_eager_row_on_the_cpu(capsys):
    cfg = load_config(CONFIG, TINY)
    eager_rows = [lever for lever in LEVERS if not lever.compile]
    graphs = next(lever for lever in LEVERS if lever.compile == "reduce-overhead")
    rows = run_levers(cfg, [*eager_rows, graphs, as_trained(cfg)], torch.device("cpu"), batch=2, warmup=1, steps=2)
    by_name = {row.lever.name: row for row in rows}
    assert list(by_name) == [lever.name for lever in eager_rows] + ["CUDA graphs", "as trained"]
    for row in rows:
        if row.lever.name != "CUDA graphs":
            assert row.images_per_s > 0 and row.mfu is None and not row.note, row  # no peak known for a CPU
    assert by_name["2x batch"].batch == 4 and by_name["as trained"].batch == cfg.train.micro_batch == 4
    assert by_name["CUDA graphs"].images_per_s == 0 and "need CUDA" in by_name["CUDA graphs"].note
    out = capsys.readouterr().out
    assert "GFLOPs/img forward" in out and f"plan: {len(rows)} rows" in out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(rows)  # the header, then one line per row
    assert lines[1].startswith("| eager |") and "| 1.00x |" in lines[1]


def test_no_row_starts_past_the_budget_nor_a_compile_that_would_not_fit(capsys):
    cfg = load_config(CONFIG, TINY)
    compiled = next(lever for lever in LEVERS if lever.compile == "default")
    # 60 s left cannot hold a compile (assumed 120 s until one is timed): skipped without compiling
    row, = run_levers(cfg, [compiled], torch.device("cpu"), batch=2, warmup=1, steps=1, budget_s=60)
    assert row.images_per_s == 0 and "a compile takes ~120 s" in row.note
    rows = run_levers(cfg, LEVERS[:2], torch.device("cpu"), batch=2, warmup=1, steps=1, budget_s=0)
    assert all(r.images_per_s == 0 and r.note.startswith("skipped") for r in rows)


def test_the_as_trained_row_has_the_train_stages_settings():
    lever = as_trained(load_config(CONFIG))
    assert (lever.batch, lever.bf16, lever.channels_last, lever.cudnn_benchmark, lever.compile) == (16, True, True, True, "")
    assert as_trained(load_config(CONFIG, ["train.compile=true", "train.micro_batch=32"])).compile == "default"


def test_levers_command_line_runs_on_the_cpu_and_refuses_unknown_levers(capsys):
    assert levers_main(["--device", "cpu", "--levers", "eager,channels_last", "--batch", "2", "--warmup", "1",
                        "--steps", "1", *TINY]) == 0
    assert "| channels_last |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        levers_main(["--levers", "eager,turbo"])
    assert "unknown lever(s) turbo" in capsys.readouterr().err


def test_the_perf_runs_training_set_repeats_the_sample_with_its_joints(tmp_path):
    import numpy as np
    import scipy.io

    from pipeline.cli import main as mshg
    from shards.format import ShardSet

    root = repeated_sample(tmp_path / "repeated", 3)
    joints = scipy.io.loadmat(root / "joints.mat")["joints"]
    sample = scipy.io.loadmat(REPO / "shards" / "sample" / "lspet" / "joints.mat")["joints"]
    assert joints.shape == (14, 3, 480)
    assert np.array_equal(joints[..., 160 + 7], sample[..., 7]) and np.array_equal(joints[..., 479], sample[..., 159])
    assert (root / "images" / "im00168.jpg").resolve().name == "im00008.jpg"
    assert mshg(["shard", "lspet", "--root", str(root), "--out", str(tmp_path / "train"), "--range", "1:480",
                 "--quiet"]) == 0
    assert ShardSet.open(tmp_path / "train").num_samples == 480
