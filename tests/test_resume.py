"""Exact resume, signals and atomic checkpoints, with real training processes (DeepSpeed ZeRO-2 on the
CPU, DALI, a real MLflow store).

The reference is one uninterrupted run of N steps. The same config interrupted at step k and resumed
must give the same MLflow run with one continuous loss history equal to the reference's, value for
value, and bit-identical final weights (one process on the CPU is deterministic; measured: max
difference 0.0). The tiny config has 6 batches per epoch, so the runs cross an epoch boundary and a
resume lands inside epoch 0 (signal) and inside epoch 1 (max_steps).
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config, two_rank_config
from tests import helpers
from tests.helpers import Training, find_run, metric_history

N = 9  # steps of the reference run
EXIT_REQUEUE = 75
METRICS = ["loss/total", "loss/smoothed", "lr", "loss/stage_1", "loss/stage_8"]


def config(tmp: Path, shards, **train) -> Path:
    # micro_batch 8 on 48 samples: 6 batches per epoch
    return tiny_config(tmp, shards, train={"micro_batch": 8, "run_name": "r", **train}, stop={"max_steps": N})


def train(tmp: Path, cfg: Path, *overrides: str) -> tuple[int, str]:
    """(exit status, stdout and stderr as written) of a training to its end (helpers.train, unchecked)."""
    proc = helpers.train(tmp, cfg, *overrides, check=False, merged=True)
    return proc.returncode, proc.stdout


def history(tmp: Path, name: str = "r") -> tuple[dict[str, list], object]:
    client, run = find_run(tmp, name)
    return {key: metric_history(client, run.info.run_id, key) for key in METRICS}, run


def weights(tmp: Path, name: str = "r") -> dict[str, torch.Tensor]:
    return load_file(str(tmp / "runs" / name / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(lspet_shards, tmp_path_factory):
    """The uninterrupted run, started in the background (the tests run their own processes beside it)."""
    tmp = tmp_path_factory.mktemp("reference")
    training = Training(tmp, config(tmp, lspet_shards))  # config() creates the store first
    result = {}

    def get():
        if not result:
            assert training.wait(600) == 0, training.output[-4000:]
            curves, run = history(tmp)
            assert [s for s, _ in curves["loss/total"]] == list(range(1, N + 1))
            result.update(curves=curves, weights=weights(tmp), run=run)
        return result

    yield get
    if training.proc.poll() is None:
        training.kill()


def assert_same_as_reference(tmp: Path, ref: dict) -> float:
    curves, run = history(tmp)
    assert run.info.status == "FINISHED"
    for key in METRICS:
        steps = [s for s, _ in curves[key]]
        assert steps == list(range(1, N + 1)), f"{key}: steps {steps}: not one continuous history"
        assert curves[key] == ref["curves"][key], key  # exact, value for value
    diff = max_difference(weights(tmp), ref["weights"])
    assert diff == 0.0, f"final weights differ by up to {diff}"
    return diff


def test_signal_and_resumes_around_an_epoch_end_match_the_uninterrupted_run(lspet_shards, tmp_path, reference):
    """One run stopped five ways, each resume continuing the last, equals the uninterrupted reference in
    MLflow value for value and in its final weights bit for bit (6 batches an epoch):
    1. SIGUSR1 after step 1, then SIGTERMs every 20 ms until the process is gone (signals while it
       saves): exit 75 with a complete checkpoint at step k < 6 (inside epoch 0), the MLflow run KILLED;
    2. resumed to max_steps 6, skipping the k batches already trained on: a checkpoint after the
       epoch's last batch (it used to resume by skipping the whole next epoch under the old epoch's seed);
    3. to 7 (epoch 1's first batch, nothing to skip); 4. a new run under the name is refused
       (train.resume=never); 5. train.resume=require to the end, skipping the 1 batch of epoch 1 already
       trained on."""
    cfg = config(tmp_path, lspet_shards)  # and the store
    training = Training(tmp_path, cfg)
    training.wait_for(r"step +1 epoch 0")
    proc = training.proc
    proc.send_signal(signal.SIGUSR1)
    extra = 0
    while proc.poll() is None:
        time.sleep(0.02)
        try:
            proc.send_signal(signal.SIGTERM)
            extra += 1
        except ProcessLookupError:
            break
    training.wait(60)
    out = training.output
    assert proc.returncode == EXIT_REQUEUE, out[-4000:]
    assert extra > 0
    k = int((tmp_path / "runs" / "r" / "checkpoints" / "latest").read_text()[4:])
    assert 1 <= k < 6, k
    seconds = float(re.search(r"checkpoint step\d+ written ([\d.]+) s after SIGUSR1", out).group(1))
    _, run = history(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "signal"

    for start, stop in ((k, 6), (6, 7)):
        code, out = train(tmp_path, cfg, f"stop.max_steps={stop}")
        assert code == 0, out[-4000:]
        assert f"resumed at step {start}" in out
        assert ("skipped the" in out) == (start != 6), out[-2000:]  # at the epoch end nothing is left to skip
    assert (tmp_path / "runs" / "r" / "checkpoints" / "latest").read_text() == "step00000007"
    code, out = train(tmp_path, cfg, "train.resume=never")
    assert code == 2 and "train.resume=never, but" in out, out[-2000:]
    code, out = train(tmp_path, cfg, "train.resume=require")
    assert code == 0, out[-4000:]
    assert "resumed at step 7" in out and "epoch 1: skipped the 1 batches already trained on" in out
    diff = assert_same_as_reference(tmp_path, reference())
    print(f"signal at step {k}: checkpoint written {seconds:.2f} s after SIGUSR1 ({extra} more signals "
          f"while stopping); resumed 3 times: max weight difference {diff}")


def test_zero1_stopped_and_resumed_trains_what_zero2_trains(lspet_shards, tmp_path, reference):
    """The CPU recipe runs ZeRO-1 (its gradients reduced once after the backward: faster over gloo than
    ZeRO-2's per-bucket reductions, docs/results/throughput.md). The stage must change the speed only: stopped at
    step 4 (inside epoch 0) and resumed to the end, ZeRO-1 equals the uninterrupted ZeRO-2 reference in
    MLflow value for value and in its final weights bit for bit."""
    cfg = config(tmp_path, lspet_shards, zero_stage=1)  # and the store
    code, out = train(tmp_path, cfg, "stop.max_steps=4")
    assert code == 0, out[-4000:]
    code, out = train(tmp_path, cfg)
    assert code == 0 and "resumed at step 4" in out, out[-4000:]
    assert history(tmp_path)[1].data.tags["zero_stage"] == "1"
    assert_same_as_reference(tmp_path, reference())


def test_two_rank_resume_at_an_epoch_end_is_exact(two_rank_run, lspet_shards, mpii_shards, tmp_path):
    """2 ranks, ZeRO-3, RMSprop under a cosine schedule over the 6 steps, 2 micro-batches accumulated,
    two datasets mixed (conftest.two_rank_config): stopped at the end of LSPET's epoch 0 by
    stop.max_epochs=1 (a max_steps stop would shorten the cosine), resumed to 6, both legs on one node
    (`mshg train --ranks 2`), against the 6 uninterrupted steps of the shared two-rank run (same config
    but the name, launched as two nodes over pdsh), loss for loss."""
    whole_dir, _ = two_rank_run
    client, run = find_run(whole_dir, "ddp")
    whole = metric_history(client, run.info.run_id, "loss/total")
    cfg = two_rank_config(tmp_path, lspet_shards, mpii_shards, "split")
    first = helpers.train(tmp_path, cfg, "stop.max_epochs=1", ranks=2)
    k = int(re.search(r"stopping at step (\d+): max_epochs", first.stdout).group(1))
    assert k == 4, first.stdout[-2000:]  # 24 LSPET samples a rank, 3 a micro-batch, 2 micro-batches a step
    proc = helpers.train(tmp_path, cfg, ranks=2)
    assert f"resumed at step {k}" in proc.stdout
    client, run = find_run(tmp_path, "split")
    split = metric_history(client, run.info.run_id, "loss/total")
    assert [s for s, _ in whole] == list(range(1, 7))
    assert split == whole


def test_kill_while_saving_leaves_the_previous_checkpoint_usable(lspet_shards, tmp_path):
    """SIGKILL the trainer the moment a checkpoint folder is being written (checkpoint every step):
    `latest` still names a complete checkpoint, a new run resumes from it, the leftover is removed,
    and only the last 2 checkpoints are kept."""
    cfg = config(tmp_path, lspet_shards, checkpoint_every=1, keep_checkpoints=2)
    ckpts = tmp_path / "runs" / "r" / "checkpoints"
    training = Training(tmp_path, cfg, "stop.max_steps=200")
    proc = training.proc
    deadline = time.monotonic() + 300
    partial = None
    try:
        while partial is None and time.monotonic() < deadline and proc.poll() is None:
            if ckpts.is_dir():
                partial = next((p.name for p in os.scandir(ckpts) if p.name.startswith(".partial-step")
                                and (ckpts / "latest").exists()), None)
            if partial is None:
                time.sleep(0.002)
        proc.kill()
    finally:
        training.kill()
    assert partial, "never saw a checkpoint being written"
    latest = (ckpts / "latest").read_text()
    assert (ckpts / latest / "meta.json").is_file() and list((ckpts / latest).glob("*model_states.pt"))
    assert int(latest[4:]) < int(partial[len(".partial-step"):])  # the one being written is not `latest`

    k = int(latest[4:])
    code, out = train(tmp_path, cfg, f"stop.max_steps={k + 2}")
    assert code == 0, out[-4000:]
    assert f"resumed at step {k}" in out
    assert not list(ckpts.glob(".partial-*"))
    assert sorted(p.name for p in ckpts.glob("step*")) == [f"step{k + 1:08d}", f"step{k + 2:08d}"]
    assert (ckpts / "latest").read_text() == f"step{k + 2:08d}"
