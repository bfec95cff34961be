"""Elastic resume (issue 48): a ZeRO checkpoint written by one number of ranks continues on another, as a
SLURM requeue on other nodes needs. DeepSpeed's universal checkpoint reshards the optimizer state; the
schedule continues from the global step; the data position is re-derived from the samples seen; the
resume says in train.log, MLflow and summary.txt that it was elastic, so not bit-exact.

Real trainings: 2 -> 1 rank under ZeRO-3 (the shared two-rank recipe: RMSprop, cosine, two datasets mixed,
accumulation), 1 -> 2 ranks under ZeRO-1 and ZeRO-2 (Adam, warm-up and cosine). Each resumed process checks
its own load (checkpoint.check_resharded: weights equal to the checkpoint's, optimizer state at its step);
the tests check what a user sees and that the learning rate of every step is the uninterrupted schedule's.
"""
from __future__ import annotations

import ctypes.util
import re

import pytest
import torch

from pipeline.checkpoint import check_resharded
from pipeline.config import ConfigError, DataConfig
from pipeline.data import TrainBatches
from tests.conftest import tiny_config, two_rank_config
from tests.helpers import find_run, metric_history, train


def assert_recorded_elastic(tmp, name: str, output: str, step: int, old: int, new: int) -> None:
    """The one line of an elastic resume, in the output, train.log, summary.txt and MLflow's tags."""
    line = re.search(rf"elastic resume at step {step}: .* written by {old} rank\(s\).* resumed on {new} rank\(s\).*"
                     rf"not bit-exact", output)
    assert line, output[-3000:]
    run_dir = tmp / "runs" / name
    assert line.group(0) in (run_dir / "train.log").read_text()
    assert line.group(0) in (run_dir / "summary.txt").read_text()
    client, run = find_run(tmp, name)
    assert run.data.tags[f"elastic_resume/step_{step}"] in line.group(0)
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # the converted copy is removed after loading
    assert not (run_dir / "checkpoints" / "latest_universal").exists()


def test_two_ranks_resumed_on_one_under_zero3(two_rank_run, lspet_shards, mpii_shards, tmp_path):
    """The shared two-rank recipe stopped by stop.max_epochs=1 at step 4 on 2 ranks and resumed on 1: the
    same MLflow run continues to step 6, each step's learning rate equal to the uninterrupted two-rank run's
    (the cosine continues from the global step), the loss in the trained range, and both datasets' positions
    re-derived."""
    whole_dir, _ = two_rank_run
    whole_client, whole = find_run(whole_dir, "ddp")
    cfg = two_rank_config(tmp_path, lspet_shards, mpii_shards, "elastic")
    first = train(tmp_path, cfg, "stop.max_epochs=1", ranks=2)
    assert "stopping at step 4: max_epochs" in first.stdout, first.stdout[-2000:]
    proc = train(tmp_path, cfg, ranks=1)
    output = proc.stdout + proc.stderr
    assert_recorded_elastic(tmp_path, "elastic", output, step=4, old=2, new=1)
    assert "global batch 16), resumed on 1 rank(s) x micro-batch 4 (global batch 16)" in output  # accumulation 4
    assert re.search(r"lspet epoch 1: 0 samples .*; mpii epoch \d+: \d+ samples drawn by 2 rank\(s\) x 1 -> position "
                     r"\d+ of 1 rank\(s\) x 1", output), output[-3000:]
    client, run = find_run(tmp_path, "elastic")
    lr = metric_history(client, run.info.run_id, "lr")
    assert lr == metric_history(whole_client, whole.info.run_id, "lr")
    losses = metric_history(client, run.info.run_id, "loss/total")
    assert [s for s, _ in losses] == list(range(1, 7))
    assert losses[5][1] < 1.5 * losses[3][1]  # continues from the trained weights, not from a fresh start


@pytest.mark.parametrize("stage", [1, 2])
def test_one_rank_resumed_on_two(stage, lspet_shards, tmp_path):
    """ZeRO-1/2, Adam with warm-up and cosine over 8 steps: 1 rank stops at its epoch end (step 6, by
    stop.max_epochs so the cosine keeps its length) and 2 ranks continue to step 8 with the optimizer
    state resharded. Every step's learning rate is DeepSpeed's WarmupCosineLR at that step."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "grow", "micro_batch": 8, "zero_stage": stage,
                                                    "lr_schedule": "cosine", "warmup_steps": 2},
                      stop={"max_steps": 8})
    first = train(tmp_path, cfg, "stop.max_epochs=1")
    assert "stopping at step 6: max_epochs" in first.stdout, first.stdout[-2000:]
    assert "glibc malloc" in first.stdout  # one process, started without a preload
    proc = train(tmp_path, cfg, ranks=2)
    assert_recorded_elastic(tmp_path, "grow", proc.stdout + proc.stderr, step=6, old=1, new=2)
    # train.allocator=auto: `mshg train --ranks N` preloads tcmalloc into CPU ranks where it is installed (CI does)
    allocator = "tcmalloc" if ctypes.util.find_library("tcmalloc_minimal") else "glibc"
    assert f"{allocator} malloc" in proc.stdout
    assert "lspet epoch 1: 0 samples drawn by 1 rank(s) x 8 -> position 0 of 2 rank(s) x 8" in proc.stdout

    client, run = find_run(tmp_path, "grow")
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = WarmupCosineLR(optimizer, total_num_steps=8, warmup_num_steps=2, warmup_min_ratio=0.0, cos_min_ratio=0.0)
    expected = []
    for step in range(1, 9):
        schedule.step()
        expected.append((step, optimizer.param_groups[0]["lr"]))
    assert metric_history(client, run.info.run_id, "lr") == pytest.approx(expected)


def test_data_position_is_re_derived_from_the_samples_seen(lspet_shards):
    """32 samples drawn from epoch 2 by 2 ranks x 4 -> 1 rank x 8 stands at batch 4 of epoch 2; an exact
    resume (same ranks and batch) keeps the position and says nothing."""
    two = TrainBatches(None, DataConfig(), batch_size=4, part=(0, 2))
    two.epoch, two.position, two.drawn = 2, 4, 28
    state = two.state_dict()

    exact = TrainBatches(None, DataConfig(), batch_size=4, part=(1, 2))
    assert exact.load_state_dict(state) is None and (exact.epoch, exact.position, exact.drawn) == (2, 4, 28)

    class Shards:
        dataset = "lspet"

    one = TrainBatches(Shards(), DataConfig(), batch_size=8, part=(0, 1))
    note = one.load_state_dict(state)
    assert (one.epoch, one.position, one.drawn) == (2, 4, 28)
    assert note == "lspet epoch 2: 32 samples drawn by 2 rank(s) x 4 -> position 4 of 1 rank(s) x 8"
    three = TrainBatches(Shards(), DataConfig(), batch_size=2, part=(0, 3))
    three.load_state_dict(state)
    assert three.position == 5  # 32 // 6: the partial batch is drawn again


class LoadedEngine:
    """What check_resharded reads of DeepSpeed's engine after a load: its module, ZeRO stage and the torch
    optimizer inside ZeRO's (a real module and a real Adam that took `steps` steps)."""

    def __init__(self, module: torch.nn.Module, steps: int):
        self.module = module
        inner = torch.optim.Adam(module.parameters(), lr=1e-3)
        for _ in range(steps):
            module(torch.ones(1, 3)).sum().backward()
            inner.step()
        self.optimizer = type("Zero", (), {"optimizer": inner})()

    def zero_optimization_stage(self) -> int:
        return 1


def test_a_resharded_load_that_lost_weights_or_optimizer_state_is_refused():
    module = torch.nn.Linear(3, 2)
    engine = LoadedEngine(module, steps=3)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    check_resharded(engine, saved, 3, "ckpt")  # all there: passes

    with pytest.raises(ConfigError, match=r"ckpt: resharding .* failed: 1 weight tensor\(s\) differ .*\(bias\)"):
        check_resharded(engine, {**saved, "bias": saved["bias"] + 1}, 3, "ckpt")
    with pytest.raises(ConfigError, match=r"optimizer's state is at step\(s\) \[3\], not 5"):
        check_resharded(engine, saved, 5, "ckpt")
    with pytest.raises(ConfigError, match=r"optimizer's state is at step\(s\) none, not 3"):
        check_resharded(LoadedEngine(module, steps=0), saved, 3, "ckpt")  # a fresh optimizer
