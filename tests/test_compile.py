"""train.compile: the model compiled by torch.compile (inductor builds C++ kernels on this CPU) inside the real
trainer (DeepSpeed ZeRO-2, DALI, MLflow), against the same training eager."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from tests.conftest import tiny_config
from tests.helpers import find_run, metric_history, run_env, train, train_cmd


def test_a_compiled_training_finishes_and_its_first_loss_is_eagers(tmp_path, lspet_shards):
    # one hourglass module instead of the tiny model's 8: inductor builds each fused kernel with g++, ~3 s
    # apiece on 2 cores. Cold, the 8-module model took ~10 minutes to compile on a busy machine here, this
    # one 2-4; with its kernels in the cache (~/.cache/mshg/inductor, kept between runs) tens of seconds
    cfg = tiny_config(tmp_path, lspet_shards, model={"stages": [[4, 1]]}, stop={"max_steps": 3})
    train(tmp_path, cfg, "train.run_name=eager")
    # TORCH_LOGS=dynamo: dynamo names each function it traces, the proof that the compiled path ran
    proc = subprocess.run(train_cmd(cfg, "train.run_name=compiled", "train.compile=true"), cwd=tmp_path,
                          env=run_env(tmp_path, TORCH_LOGS="dynamo"), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"torchdynamo start tracing forward \S*pipeline/model\.py", out), out[-3000:]
    cache = re.search(r"inductor cache (\S+)", proc.stdout)
    assert cache and any(Path(cache.group(1)).rglob("*.so")), proc.stdout[-2000:]  # kernels built there

    losses = {}
    for name in ("eager", "compiled"):
        client, run = find_run(tmp_path, name, "one run each")
        losses[name] = dict(metric_history(client, run.info.run_id, "loss/total"))
        assert sorted(losses[name]) == [1, 2, 3]
    # same weights, same batch: fused kernels only round differently (1e-6 relative seen here)
    assert losses["compiled"][1] == pytest.approx(losses["eager"][1], rel=1e-4)


def test_compile_is_a_bool_setting_off_by_default():
    assert load_config(None).train.compile is False
    assert load_config(None, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=maybe"])
