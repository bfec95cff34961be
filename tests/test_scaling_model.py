"""bench/scaling_model.py's prediction (the tables of docs/cluster.md): its inputs are the models' own
counts, and its terms behave as a data-parallel step must. Its --measure mode (minutes of both cores, against
real 1- and 2-rank runs) is not run here."""
from __future__ import annotations

import pytest

from bench.scaling_model import (GPU_COUNTS, efficiency, exchanged_bytes, link_bytes_s, main, model_of,
                                 state_bytes, step)
from pipeline.config import load_config
from pipeline.model import build_model, count_parameters
from tests.helpers import REPO


@pytest.mark.parametrize("name, config", [("full-size", "lspet_gpu.yaml"), ("CPU recipe", "lspet_cpu.yaml")])
def test_the_models_parameters_are_counted_from_the_model(name, config):
    cfg = load_config(REPO / "configs" / config)
    net = build_model(cfg.model, 14, cfg.data.input_size)
    m = model_of(name)
    assert m.params == count_parameters(net) and m.tensors == len(list(net.parameters()))
    assert m.gradient_bytes == 4 * m.params and m.micro_batch == cfg.train.micro_batch


def test_bytes_a_step_follow_the_ring_and_the_zero_stage():
    m = model_of("full-size")
    assert exchanged_bytes(m, 1, 2) == 0
    for gpus in (2, 8, 256):
        ring = 2 * (gpus - 1) / gpus * m.gradient_bytes  # reduce-scatter + all-gather = one all-reduce
        assert exchanged_bytes(m, gpus, 0) == exchanged_bytes(m, gpus, 2) == pytest.approx(ring)
        assert exchanged_bytes(m, gpus, 3) == pytest.approx(1.5 * ring)  # + the weights gathered twice
        assert state_bytes(m, gpus, 3) == pytest.approx(state_bytes(m, gpus, 0) / gpus)
    assert link_bytes_s(8, 400) == 450e9 and link_bytes_s(16, 400) == 50e9 and link_bytes_s(16, 200) == 25e9


@pytest.mark.parametrize("dataset", [8000, 0])  # LSPET's epochs, and no epoch rebuilds
def test_efficiency_is_one_on_one_gpu_and_falls_with_the_gpus(dataset):
    for name in ("full-size", "CPU recipe"):
        m = model_of(name)
        for stage in (0, 1, 2):
            assert efficiency(m, 1, stage, 4.5, dataset=dataset) == pytest.approx(1.0)
            assert efficiency(m, 256, stage, 4.5, dataset=dataset) <= 1.0
        assert efficiency(m, 1, 3, 4.5, dataset=dataset) < 1.0  # ZeRO-3's hooks cost even one GPU
    # plain data parallel only adds communication (and epoch rebuilds) to the full-size model's compute-bound
    # step; ZeRO-1/2 also split the optimizer step N ways, which may win back a little more than an NVLink
    # exchange costs (8 GPUs). (The CPU recipe's model is bound by DALI on every GPU: 1.0 without rebuilds.)
    curve = [efficiency(model_of("full-size"), n, 0, 4.5, dataset=dataset) for n in GPU_COUNTS]
    assert all(a > b for a, b in zip(curve, curve[1:])), curve
    # slower links only lose images
    full = model_of("full-size")
    assert step(full, 64, 0, 15, ib_gbps=200)["images_per_s"] < step(full, 64, 0, 15, ib_gbps=400)["images_per_s"]


def test_the_table_prints_every_gpu_count_for_both_models(capsys):
    main([])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4.5 %") or line.startswith("| 15.0 %")]
    assert len(rows) == 2 * 2 * len(GPU_COUNTS)  # two models x two MFUs x the GPU counts
    assert "full-size (configs/lspet_gpu.yaml)" in out and "CPU recipe (configs/lspet_cpu.yaml)" in out
