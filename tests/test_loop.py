"""The training loop for every setting it accepts: gradient accumulation (one loop turn = one optimizer
step, trainer step == DeepSpeed's), mixed precision with fp32 BatchNorm statistics, one evaluation
(training's final metric == `mshg evaluate`), the device choice, the launcher's GPU list, and the data
order (shuffled at shard time, ranks rotated per epoch). Real shards, real DeepSpeed, real DALI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main as mshg
from tests.conftest import REPO, SAMPLE, tiny_config
from tests.helpers import assert_accumulated_steps, find_run, no_rank_started, run_env, run_python, train


# --- gradient accumulation (2 ranks: the shared run, tests/test_train.py) ------------------------------

ACCUMULATION_PROBE = """if True:
    import json, sys, torch
    from pipeline.config import load_config
    from pipeline.train import Trainer
    out = {}
    for name, overrides in (("one", ["train.micro_batch=8"]), ("two", ["train.micro_batch=4", "train.grad_accum=2"])):
        trainer = Trainer(load_config(sys.argv[1], overrides + [f"train.run_name={name}"]))
        # BatchNorm's batch statistics differ between 8 samples and two groups of 4 by construction;
        # fixed statistics isolate what accumulation must preserve: the loss and the update
        for m in trainer.engine.module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        losses = [trainer.train_step()[0].item() for _ in range(2)]
        weights = torch.cat([p.detach().flatten() for p in trainer.engine.module.parameters()])
        out[name] = {"losses": losses, "weights": weights.tolist()[:2000], "steps": trainer.engine.global_steps}
    print("RESULT " + json.dumps(out))
"""


def test_accumulation_2x4_equals_micro_batch_8(lspet_shards, tmp_path):
    """Micro-batch 4 x 2 accumulation steps and micro-batch 8 see the same 8 samples per step (no
    augmentation, no shuffle) and must give the same loss at step 1, the same update, hence the same
    loss at step 2 (fp32: to rounding)."""
    cfg = tiny_config(tmp_path, lspet_shards, train={"precision": "fp32"},
                      data={"scale_range": [1.0, 1.0], "rotation_prob": 0.0, "flip_prob": 0.0, "color_jitter": 0.0,
                            "shuffle_buffer": 1})
    proc = run_python(tmp_path, ACCUMULATION_PROBE, str(cfg), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    one, two = result["one"], result["two"]
    assert one["steps"] == two["steps"] == 2
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    # Adam's step is lr * m / sqrt(v): for a weight whose gradient is near 0, the rounding difference
    # between summing 2 x 4 and 8 samples moves it by up to ~1 % of a step (lr 1e-3: 1e-5; fused Adam)
    np.testing.assert_allclose(two["weights"], one["weights"], rtol=1e-4, atol=5e-5)
    assert one["losses"][0] != one["losses"][1]  # the step changed the weights


def test_zero_stage_0_trains_checkpoints_and_exports(lspet_shards, tmp_path):
    """train.zero_stage=0 (plain data parallel, no partitioning; the other runs take 1-3): a 1-rank run of
    2 steps trains, checkpoints and exports its weights, and MLflow records the stage."""
    cfg = tiny_config(tmp_path, lspet_shards, stop={"max_steps": 2}, train={"run_name": "z0", "zero_stage": 0})
    proc = train(tmp_path, cfg)
    assert_accumulated_steps(tmp_path, "z0", proc.stdout, ranks=1, micro=4, accum=1, steps=2, zero_stage=0)
    assert (tmp_path / "runs" / "z0" / "model.safetensors").is_file()


# --- precision, evaluation --------------------------------------------------------------------------

def test_one_run_accumulates_averages_and_keeps_fp32_statistics(lspet_shards, tmp_path, capsys):
    """One process, ZeRO-1 (configs/deepspeed/zero1.yaml), bf16 autocast, EMA 0.9, 3 micro-batches
    accumulated per step, 3 steps, then resumed to 4:
    - accumulation: 3 optimizer steps of 3 micro-batches, the trainer's step equal to DeepSpeed's
      global_steps, the stop/log/checkpoint at step 3 (not after 2a-1 micro-batches), 3 logged steps;
    - EMA: the averaged weights (not the last ones) are what is checkpointed and exported; resuming
      continues the average from the checkpoint;
    - bf16: the exported BatchNorm running statistics are fp32 and carry more than bf16's 8-bit mantissa;
    - the run's final PCK (flip test, fp32, the multi-scale test of eval.scales, the same function) is the
      number `mshg evaluate` prints; the learning curve's last point is the one-scale figure
      (`mshg evaluate --scales 1`). (Whether the zooms map back right: tests/test_evaluate.py.)"""
    cfg = tiny_config(tmp_path, lspet_shards, stop={"max_steps": 3}, train={
        "run_name": "one", "micro_batch": 4, "grad_accum": 3, "ema_decay": 0.9, "precision": "bf16",
        "deepspeed": str(REPO / "configs" / "deepspeed" / "zero1.yaml")}, eval={"scales": [0.8, 1.0, 1.25]})
    proc = train(tmp_path, cfg)
    assert "1 rank(s) on cpu (1 thread(s) each, " in proc.stdout  # train.cpu_threads=1 (conftest.tiny_config)
    assert_accumulated_steps(tmp_path, "one", proc.stdout, ranks=1, micro=4, accum=3, steps=3, zero_stage=1)

    run_dir = tmp_path / "runs" / "one"
    tag = run_dir / "checkpoints" / "step00000003"
    averaged = load_file(str(tag / "ema.safetensors"))
    exported = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(exported[k], averaged[k]) for k in exported) and averaged["n_averaged"].item() == 3
    last = load_file(str(tag / "weights.safetensors"))  # the weights of step 3 themselves
    conv = next(k for k in exported if k.endswith("conv2.weight"))
    assert not torch.equal(last[conv], exported[conv])  # the average, not the last weights

    proc = train(tmp_path, cfg, "stop.max_steps=4")
    assert "resumed at step 3" in proc.stdout
    averaged = load_file(str(run_dir / "checkpoints" / "step00000004" / "ema.safetensors"))
    assert averaged["n_averaged"].item() == 4  # continued, not restarted

    weights = load_file(str(run_dir / "model.safetensors"))
    stats = [v for k, v in weights.items() if k.endswith("running_var")]
    assert stats and all(v.dtype == torch.float32 for v in stats)
    values = torch.cat([v.flatten() for v in stats])
    assert (values != values.bfloat16().float()).float().mean() > 0.5  # not rounded to bf16
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    client, run = find_run(tmp_path, "one")
    final = run.data.metrics["final/pck"]
    out = tmp_path / "metrics.json"
    capsys.readouterr()
    assert "with the multi-scale test (eval.scales [0.8, 1.0, 1.25]): PCK@0.2 = " in proc.stdout
    assert mshg(["evaluate", "--checkpoint", str(run_dir), "--shards", str(lspet_shards["val"]), "--out", str(out)]) == 0
    assert "flip test on, zooms 0.8, 1, 1.25," in capsys.readouterr().out
    assert json.loads(out.read_text())["value"] == pytest.approx(final, abs=1e-9)
    curve = client.get_metric_history(run.info.run_id, "pck")
    assert curve[-1].step == 4
    assert mshg(["evaluate", "--checkpoint", str(run_dir), "--shards", str(lspet_shards["val"]), "--out", str(out),
                 "--scales", "1"]) == 0
    assert "flip test on, one scale," in capsys.readouterr().out
    one_scale = json.loads(out.read_text())["value"]
    assert one_scale == pytest.approx(curve[-1].value, abs=1e-9)


# --- device and launcher ------------------------------------------------------------------------------

def test_cuda_without_cuda_is_a_clear_error_and_auto_says_what_it_chose(lspet_shards, tmp_path, capsys,
                                                                        monkeypatch):
    """Refused before any rank starts (`mshg train --ranks 2`) and by a rank itself; then `auto` trains on
    the CPU with train.cpu_threads=0's threads (the machine's cores, one rank), and that run stops by the
    convergence rule (a loss target every step meets, a window of 3: converged at step 3, not max_steps;
    the rule itself: tests/test_stop.py). The other tiny runs take 1 thread (conftest.tiny_config)."""
    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "dev", "device": "cuda"})
    monkeypatch.chdir(tmp_path)
    with no_rank_started(monkeypatch):
        assert mshg(["train", "--ranks", "2", "--config", str(cfg)]) == 2
    assert "train.device=cuda, but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    proc = train(tmp_path, cfg, check=False)
    assert proc.returncode == 2 and "train.device=cuda, but CUDA is not available" in proc.stderr
    proc = train(tmp_path, cfg, "train.device=auto", "train.cpu_threads=0", "stop.max_steps=50",
                 "stop.expected_loss=100", "stop.tolerance=1", "stop.window=3")
    assert "train.device=auto: cpu (" in proc.stdout and "no GPU: training on the CPU over gloo" in proc.stdout
    assert f"1 rank(s) on cpu ({os.cpu_count()} thread(s) each, " in proc.stdout
    assert "stopping at step 3" in proc.stdout and ": converged" in proc.stdout
    _, run = find_run(tmp_path, "dev")
    assert run.data.tags["stop_reason"] == "converged" and run.data.tags["stopped_at_step"] == "3"


def test_every_rank_builds_deepspeeds_cpu_op_with_the_venvs_ninja(tmp_path):
    """Ranks started by pdsh or srun get another PATH, where a system ninja 1.11 came first; it and the
    venv's ninja 1.13 hash build commands differently, so each rebuilt DeepSpeed's shared JIT op (~1 min
    of g++) after the other (measured: 2-3 rebuilds per test-suite run). init puts the venv's bin first."""
    from pipeline.distributed import use_own_ninja

    own = os.path.dirname(sys.executable)
    assert os.path.isfile(os.path.join(own, "ninja"))  # the project's venv has one (pyproject: ninja)
    env = {"PATH": os.pathsep.join(["/usr/bin", "/bin", own])}
    use_own_ninja(env)
    assert env["PATH"].split(os.pathsep) == [own, "/usr/bin", "/bin", own]
    use_own_ninja(env)  # once is enough: a second call (a resumed rank) leaves it
    assert env["PATH"].split(os.pathsep) == [own, "/usr/bin", "/bin", own]
    assert shutil.which("ninja", path=env["PATH"]) == os.path.join(own, "ninja")
    # and a rank calls it: distributed.init in a process whose PATH is a remote shell's, without the venv
    probe = ("import os; from pipeline.distributed import init; init('cpu', 1); "
             "print('PATH0', os.environ['PATH'].split(os.pathsep)[0])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**run_env(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert proc.returncode == 0 and f"PATH0 {own}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_launcher_takes_the_gpus_cuda_visible_devices_names():
    from pipeline.config import ConfigError
    from pipeline.distributed import gpu_index, launcher_devices

    assert launcher_devices(2, {"CUDA_VISIBLE_DEVICES": "4,5,6"}) == ["--include", "localhost:4,5"]
    assert launcher_devices(2, {}) == ["--num_gpus", "2"]
    assert launcher_devices(2, {"CUDA_VISIBLE_DEVICES": "4,5", "DS_ACCELERATOR": "cpu"}) == ["--num_gpus", "2"]
    with pytest.raises(ConfigError, match="names 1 GPU"):
        launcher_devices(2, {"CUDA_VISIBLE_DEVICES": "3"})
    assert gpu_index(3, visible=1) == 0  # the site bound one GPU to this task
    assert gpu_index(3, visible=8) == 3  # every task sees the node's GPUs
    with pytest.raises(ConfigError, match="LOCAL_RANK=3, but this task sees 2 GPU"):
        gpu_index(3, visible=2)


def test_launch_script_honours_cuda_visible_devices(tmp_path):
    """launch/deepspeed.sh on a GPU node with CUDA_VISIBLE_DEVICES: --include, not --num_gpus (which
    would drop it). A stand-in nvidia-smi and deepspeed on PATH show the command it runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: A'\necho 'GPU 1: B'\n")
    (bin_dir / "deepspeed").write_text("#!/bin/sh\necho \"LAUNCH $*\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    root = tmp_path / "repo"  # a copy without .venv, so the stand-in deepspeed on PATH is used
    (root / "launch").mkdir(parents=True)
    (root / "launch" / "deepspeed.sh").write_text((REPO / "launch" / "deepspeed.sh").read_text())
    script = str(root / "launch" / "deepspeed.sh")
    out = subprocess.run(["bash", script, str(cfg)], env={**env, "CUDA_VISIBLE_DEVICES": "2,3"},
                         capture_output=True, text=True, timeout=60).stdout
    assert "LAUNCH --include localhost:2,3 --module pipeline.train" in out
    out = subprocess.run(["bash", script, "--num_gpus", "1", str(cfg)], env={**env, "CUDA_VISIBLE_DEVICES": "2,3"},
                         capture_output=True, text=True, timeout=60).stdout
    assert "LAUNCH --include localhost:2 --module" in out
    out = subprocess.run(["bash", script, str(cfg)], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "LAUNCH --num_gpus 2 --module" in out


def test_missing_shards_are_an_error_before_any_rank_starts(lspet_shards, tmp_path, capsys):
    cfg = tiny_config(tmp_path, lspet_shards, data={"train_shards": str(tmp_path / "nowhere")})
    assert mshg(["train", "--ranks", "2", "--config", str(cfg)]) == 2
    assert f"{tmp_path / 'nowhere'}: no such shard directory" in capsys.readouterr().err
    from pipeline.config import ConfigError, load_config
    from pipeline.train import open_shards
    with pytest.raises(ConfigError, match="data.train_shards is not set"):
        open_shards(load_config(None, ["model.channels=8"]))
    for config in ("lspet_gpu.yaml", "lspet_gpu_stacked.yaml", "msc_hg_cpu.yaml", "lspet_cpu.yaml"):
        assert load_config(REPO / "configs" / config).data.train_shards  # every config names its data
    # the demo shards its 160-image sample into its own folders: no config but the demo's trains on them,
    # and the demo never overwrites the recipe's full LSPET shards
    demo = {load_config(REPO / "configs" / "msc_hg_cpu.yaml").data.train_shards,
            load_config(REPO / "configs" / "msc_hg_cpu.yaml").data.val_shards}
    assert demo == {"runs/shards/demo-train", "runs/shards/demo-val"}
    # `make shards`, run (set-up taken as done) in a folder of its own: it writes the demo config's two
    # shard sets, where the config looks for them, and nothing else under runs/shards
    work = tmp_path / "make"
    work.mkdir()
    (work / "shards").symlink_to(REPO / "shards")  # the embedded sample, at the path the Makefile names
    venv = Path(sys.executable).parent.parent
    made = subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", str(venv / ".installed"), "shards",
                           f"VENV={venv}"], cwd=work, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    assert sorted(p.name for p in (work / "runs" / "shards").iterdir()) == ["demo-train", "demo-val"]
    assert {str(p.relative_to(work)) for p in (work / "runs" / "shards").iterdir()} == demo
    assert [json.loads((work / d / "manifest.json").read_text())["num_samples"]
            for d in sorted(demo)] == [160, 40]  # images 1-160 train, 161-200 held apart
    for path in (REPO / "configs").glob("*.yaml"):
        if path.name != "msc_hg_cpu.yaml":
            data = load_config(path).data
            assert not {data.train_shards, data.val_shards} & demo, path


# --- data order ----------------------------------------------------------------------------------------

def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


@pytest.mark.parametrize("order", ["shuffled", "source"])
def test_training_batches_do_not_follow_dataset_order(order, tmp_path):
    """The sharder shuffles (seeded) by default: the sample ids a rank trains on, in the order it
    draws them, are uncorrelated with dataset order. Written in source order they are not (DALI
    shuffles only within its buffer): the test can tell the two apart."""
    from pipeline.config import DataConfig
    from pipeline.data import TrainBatches
    from shards.format import ShardSet

    out = tmp_path / order
    assert mshg(["shard", "lspet", "--root", str(SAMPLE), "--out", str(out), "--range", "1:200", "--maxcount", "50",
                 "--order", order, "--quiet"]) == 0
    cfg = DataConfig(train_shards=str(out), input_size=64, num_threads=1, shuffle_buffer=16)
    batches = TrainBatches(ShardSet.open(out), cfg, 8, part=(0, 2))
    ids = [int(i) for _ in range(12) for i in batches.next()[0]["sample_id"].view(-1)]
    rho = spearman(range(len(ids)), ids)
    if order == "shuffled":
        assert abs(rho) < 0.3, rho
    else:
        assert rho > 0.6, rho


def test_ranks_rotate_over_the_shards_each_epoch(lspet_shards):
    """Epoch e, rank r reads the reader shard (r + e) % world_size: rank 0's second epoch is over the
    samples rank 1 had in the first, so no rank trains on half of the data only."""
    from pipeline.config import DataConfig
    from pipeline.data import TrainBatches
    from shards.format import ShardSet

    shards = ShardSet.open(lspet_shards["train"])  # 48 samples, micro-batch 8, 2 ranks: 3 batches per epoch
    cfg = DataConfig(train_shards=str(lspet_shards["train"]), input_size=64, num_threads=1, shuffle_buffer=16)

    def epochs(rank):
        b = TrainBatches(shards, cfg, 8, part=(rank, 2))
        seen = [set(), set()]
        while b.epoch < 2:
            e = b.epoch
            seen[e].update(int(i) for i in b.next()[0]["sample_id"].view(-1))
        return seen

    r0, r1 = epochs(0), epochs(1)
    assert r0[0] == r1[1] and r1[0] == r0[1] and not r0[0] & r1[0]
    assert len(r0[0] | r1[0]) == 48
