"""Real training runs: DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) from a mix of real LSPET and MPII shards,
tracked in MLflow, then the run's partitioned checkpoint through `mshg export` and its weights through
`mshg evaluate` and `mshg predict`, launched as two nodes over pdsh; batch math, DeepSpeed configs."""
import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main as mshg
from tests.conftest import REPO, SAMPLE, tiny_config
from tests.helpers import STAGES, assert_accumulated_steps, find_run, no_rank_started

def test_a_log_written_to_a_file_reads_cleanly(two_rank_run):
    """Output to a pipe (a SLURM file, `> log`): plain lines, no progress-bar frames, no third-party
    FutureWarnings per rank, and rank 0 alone reports the steps."""
    _, output = two_rank_run
    assert "\r" not in output
    assert "FutureWarning" not in output, [line for line in output.splitlines() if "FutureWarning" in line]
    steps = re.findall(r"step +(\d+) epoch", output)
    assert steps and len(steps) == len(set(steps)), steps  # each logged step once, not once per rank


def test_two_node_zero3_run_on_a_mix_accumulates_and_logs_every_stage_loss_and_both_datasets(two_rank_run):
    """The shared run (conftest.two_rank_run): launched over pdsh as two nodes of one rank each, every node
    with its node rank and DS_ACCELERATOR from .deepspeed_env; ZeRO-3 from configs/deepspeed/zero3.yaml;
    the accumulation derived from train.global_batch (16 = 4 x 2 x 2 ranks): 6 optimizer steps of 2
    micro-batches, the trainer's step equal to DeepSpeed's global_steps, the stop/log/checkpoint at step 6;
    every stage's loss logged each step, their sum the total; both datasets as MLflow inputs."""
    from tests.ssh_nodes import HOSTS

    tmp, stdout = two_rank_run
    assert "cmd = pdsh " in stdout and "export DS_ACCELERATOR=cpu;" in stdout  # from .deepspeed_env
    for node_rank, host in enumerate(HOSTS):
        assert f"{host}: " in stdout and f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in stdout
    assert "2 rank(s) on cpu (1 thread(s) each, " in stdout
    assert "mixing 3 of lspet" in stdout and "1 of mpii" in stdout  # 3:1 of a micro-batch of 4
    assert_accumulated_steps(tmp, "ddp", stdout, ranks=2, micro=4, accum=2, steps=6, zero_stage=3)
    client, run = find_run(tmp, "ddp")
    assert run.info.status == "FINISHED"
    for key in STAGES + ["loss/total", "lr", "images_per_s"]:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6], key
    total = client.get_metric_history(run.info.run_id, "loss/total")
    stage_sum = [sum(client.get_metric_history(run.info.run_id, k)[i].value for k in STAGES) for i in range(6)]
    assert [m.value for m in total] == pytest.approx(stage_sum, rel=1e-5)  # total = sum of the 8 stages
    # the stage comes from configs/deepspeed/zero3.yaml: config, params and tags agree
    assert run.data.params["train.zero_stage"] == "3"
    assert run.data.tags["stop_reason"] == "max_steps" and run.data.tags["world_size"] == "2"
    assert run.data.tags["dataset"] == "lspet+mpii"
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["lspet-train", "lspet-val", "mpii-train"]
    assert 0.0 <= run.data.metrics["final/pck"] <= 1.0
    assert "PCK@0.2 = " in stdout and "mlflow ui --backend-store-uri" in stdout


def test_run_directory_feeds_export_evaluate_and_predict(two_rank_run, lspet_shards, tmp_path, capsys):
    """The ZeRO-3 run's partitioned checkpoint exports (zero_to_fp32) to the weights the run wrote itself,
    every model key there, BatchNorm statistics included; `evaluate` and `predict` take the run's folder."""
    tmp, _ = two_rank_run
    run_dir = tmp / "runs" / "ddp"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000006"
    exported_file = tmp_path / "exported.safetensors"
    assert mshg(["export", "--checkpoint", str(run_dir / "checkpoints"), "--safetensors", str(exported_file)]) == 0
    import torch
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.model import build_model
    exported = load_file(str(exported_file))
    assert exported.keys() == build_model(load_config(tmp / "tiny.yaml").model, 14, 64).state_dict().keys()
    assert any("running_var" in k for k in exported)
    assert all(v.dtype in (torch.float32, torch.int64) for v in exported.values())
    trained = load_file(str(run_dir / "model.safetensors"))  # written by the run itself
    assert all((exported[k] == trained[k]).all() for k in exported)

    sheet = tmp_path / "sheet.png"
    assert mshg(["evaluate", "--checkpoint", str(run_dir), "--shards", str(lspet_shards["val"]),
                 "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "PCK@0.2 = " in out and f"contact sheet of 16 crops -> {sheet}" in out
    import cv2
    assert cv2.imread(str(sheet)).shape == (4 * 224, 4 * 224, 3)  # 16 crops, 4 a row

    images = [str(SAMPLE / "images" / "im00161.jpg"), str(SAMPLE / "images" / "im00162.jpg")]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "preds.json"
    # one pass: the whole photo or one of its windows, whose crops lie inside the whole photo's, so every
    # prediction lies in that crop (a second pass crops the grown box of the first pass's joints, which for
    # these untrained weights may reach past it)
    assert mshg(["predict", "--checkpoint", str(run_dir), "--out", str(out), "--passes", "1", images[0], str(bad),
                 images[1]]) == 0
    assert "broken.jpg: cannot read" in capsys.readouterr().err
    preds = json.loads(out.read_text())
    assert len(preds["joints"]) == 14 and preds["joints"][-1] == "head_top"
    assert [p["image"] for p in preds["predictions"]] == images
    import cv2
    h, w = cv2.imread(images[0]).shape[:2]
    for kp in preds["predictions"][0]["keypoints"]:
        x, y, score = kp
        # the crop is a square of side 1.25 * max(w, h) around the image centre: predictions land in it
        half = 0.625 * max(w, h) + 1
        assert abs(x - w / 2) <= half and abs(y - h / 2) <= half, (x, y, w, h)


# --- batch math, DeepSpeed config, ZeRO stages ------------------------------------------------------

def test_batch_plan_derives_accumulation_and_names_wrong_combinations():
    from pipeline.config import ConfigError, TrainConfig, batch_plan

    assert batch_plan(TrainConfig(micro_batch=8, grad_accum=2), 4) == (64, 8, 2)
    assert batch_plan(TrainConfig(micro_batch=8, global_batch=64), 2) == (64, 8, 4)
    assert batch_plan(TrainConfig(micro_batch=8, global_batch=64, grad_accum=4), 2) == (64, 8, 4)
    with pytest.raises(ConfigError, match=r"global_batch=60 cannot be split .* not a multiple of 16"):
        batch_plan(TrainConfig(micro_batch=8, global_batch=60), 2)
    with pytest.raises(ConfigError, match="set only one of train.global_batch and train.grad_accum"):
        batch_plan(TrainConfig(micro_batch=8, global_batch=64, grad_accum=2), 2)


def test_wrong_batch_is_an_error_before_the_launcher_starts(tmp_path, lspet_shards, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, lspet_shards, train={"global_batch": 12})  # micro 4 x 2 ranks: 8 per pass
    with no_rank_started(monkeypatch):
        assert mshg(["train", "--ranks", "2", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch=12 cannot be split into train.micro_batch=4 x 2 rank(s)" in err


def test_deepspeed_config_from_train_settings_and_zero_files():
    from pipeline.config import ConfigError, load_config
    from pipeline.train import deepspeed_config

    cfg = load_config(REPO / "configs" / "msc_hg_cpu.yaml", [
        "train.deepspeed=configs/deepspeed/zero3.yaml", "train.global_batch=32", "train.micro_batch=4",
        "train.optimizer=rmsprop", "train.lr=2.5e-4", "train.lr_schedule=cosine", "train.warmup_steps=10",
        "train.precision=bf16", "train.grad_clip=0.5"])
    assert cfg.train.zero_stage == 3  # taken from the file
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (32, 4, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["contiguous_gradients"]
    # mixed precision by autocast: fp32 weights and BatchNorm statistics (not DeepSpeed's bf16 weight cast)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds and "fp16" not in ds
    assert ds["gradient_clipping"] == 0.5
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10
    linear = deepspeed_config(load_config(REPO / "configs" / "msc_hg_cpu.yaml", ["train.lr_schedule=linear"]), 1)
    assert linear["scheduler"]["type"] == "WarmupDecayLR"
    for stage in (1, 2, 3):
        c = load_config(REPO / "configs" / "msc_hg_cpu.yaml", [f"train.deepspeed=configs/deepspeed/zero{stage}.yaml"])
        assert deepspeed_config(c, 2)["zero_optimization"]["stage"] == stage
    with pytest.raises(ConfigError, match="needs train.lr_step_every"):
        load_config(REPO / "configs" / "msc_hg_cpu.yaml", ["train.lr_schedule=step"])
    assert "torch_autocast" not in deepspeed_config(load_config(REPO / "configs" / "msc_hg_cpu.yaml",
                                                                ["train.precision=fp32"]), 1)
    with pytest.raises(ConfigError, match="train.precision must be one of auto, bf16, fp32, fp16"):
        load_config(REPO / "configs" / "msc_hg_cpu.yaml", ["train.precision=int8"])
    with pytest.raises(ConfigError, match="train.bf16"):  # the old key is refused by name
        load_config(REPO / "configs" / "msc_hg_cpu.yaml", ["train.bf16=true"])


def test_step_schedule_warms_up_then_decays():
    import torch

    from pipeline.config import load_config
    from pipeline.schedule import make_scheduler

    cfg = load_config(REPO / "configs" / "msc_hg_cpu.yaml", [
        "train.lr_schedule=step", "train.warmup_steps=2", "train.lr_step_every=3", "train.lr_step_gamma=0.5",
        "train.lr=1.0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(cfg, opt)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_weight_decay_reaches_the_optimizer():
    """train.weight_decay is what the optimizer (Adam or RMSprop, with or without aligned views) decays by."""
    import torch

    from pipeline.config import load_config
    from pipeline.train import make_optimizer

    for optimizer in ("adam", "rmsprop"):
        cfg = load_config(REPO / "configs" / "msc_hg_cpu.yaml", [f"train.optimizer={optimizer}",
                                                                 "train.weight_decay=0.05"])
        for align in (False, True):
            opt = make_optimizer(cfg, torch.nn.Linear(3, 2).parameters(), align_views=align)
            assert [g["weight_decay"] for g in opt.param_groups] == [0.05] * len(opt.param_groups), optimizer
    # and it decays: with a zero gradient, only the decay term moves a weight, towards 0
    w = torch.nn.Parameter(torch.ones(1))
    opt = make_optimizer(load_config(REPO / "configs" / "msc_hg_cpu.yaml", ["train.weight_decay=0.05"]), [w])
    w.grad = torch.zeros(1)
    opt.step()
    assert w.item() < 1.0


def test_cosine_schedule_ends_at_cos_min_ratio_of_the_lr(monkeypatch):
    """train.cos_min_ratio: the last rate of the cosine schedule is lr * cos_min_ratio, both in DeepSpeed's
    WarmupCosineLR (a budget in steps; built here from the entry the trainer hands DeepSpeed) and in the
    LambdaLR of a budget in minutes."""
    import torch

    from pipeline.config import load_config
    from pipeline.schedule import deepspeed_scheduler, make_scheduler

    overrides = ["train.lr_schedule=cosine", "train.lr=0.5", "train.warmup_steps=2", "train.cos_min_ratio=0.1",
                 "stop.max_steps=10"]
    cfg = load_config(REPO / "configs" / "msc_hg_cpu.yaml", overrides)
    entry = deepspeed_scheduler(cfg)
    assert entry["type"] == "WarmupCosineLR" and entry["params"]["cos_min_ratio"] == 0.1
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = WarmupCosineLR(opt, **entry["params"])
    lrs = []
    for _ in range(cfg.stop.max_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.05) and max(lrs) == pytest.approx(0.5)
    # over a budget in minutes: the rate when the budget is spent
    cfg = load_config(REPO / "configs" / "msc_hg_cpu.yaml", [*overrides, "stop.max_minutes=5"])
    assert deepspeed_scheduler(cfg) is None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    spent = [0.0]
    sched = make_scheduler(cfg, opt, minutes=lambda: spent[0])
    for _ in range(3):  # past the warm-up
        opt.step()
        sched.step()
    spent[0] = 5.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_precision_auto_is_bf16_only_where_the_cpu_computes_it():
    """`auto` (the default) trains in bf16 only on hardware with bf16 instructions: a CPU without them
    (AVX2 only, as some of the project's machines) emulates bf16 ~10x slower than fp32."""
    import torch

    from pipeline.config import ConfigError, load_config
    from pipeline.distributed import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert load_config(REPO / "configs" / "lspet_cpu.yaml").train.precision == "auto"
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(cpu) == has_bf16
    precision, why = resolve_precision("auto", cpu)
    assert precision == ("bf16" if has_bf16 else "fp32") and "train.precision=auto" in why
    assert resolve_precision("fp32", cpu)[0] == "fp32" and resolve_precision("bf16", cpu)[0] == "bf16"
    if not has_bf16:  # asked for explicitly, bf16 is honoured, with the warning in the log line
        assert "emulated" in resolve_precision("bf16", cpu)[1]
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        resolve_precision("fp16", cpu)


def test_the_stacked_twin_differs_from_the_recipe_only_in_its_model():
    """The study compares the models under one recipe: a retuned setting must reach both configs."""
    from dataclasses import asdict, replace

    from pipeline.config import load_config

    recipe = load_config(REPO / "configs" / "lspet_cpu.yaml")
    twin = load_config(REPO / "configs" / "lspet_cpu_stacked.yaml")
    assert twin.model != recipe.model
    assert asdict(replace(twin, model=recipe.model, name=recipe.name)) == asdict(recipe)


def test_the_stacked_twin_costs_the_recipes_flops():
    """'At equal FLOPs' (the study): a recipe that widens its model must widen the twin with it."""
    from pipeline.config import load_config
    from pipeline.model import build_model, count_flops

    flops = {}
    for name in ("lspet_cpu", "lspet_cpu_stacked"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        flops[name] = count_flops(build_model(cfg.model, 14, cfg.data.input_size), cfg.data.input_size)
    assert abs(flops["lspet_cpu_stacked"] / flops["lspet_cpu"] - 1) < 0.05, flops


def test_slurm_rendezvous_port_is_the_job_scripts_rule(monkeypatch):
    """Under srun without launch/slurm/common.sh, the trainer derives the same MASTER_PORT as the script."""
    import os

    from pipeline.distributed import fill_env_from_slurm, slurm_master_port

    # a private environment: what fill_env_from_slurm writes must not leak into later tests' subprocesses
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="123456", MASTER_ADDR="node1")  # else scontrol
    monkeypatch.setattr(os, "environ", env)
    fill_env_from_slurm()
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    assert env["MASTER_PORT"] == str(slurm_master_port(123456)) == str(15000 + 123456 % 15000)
    # and the script's rule, run: launch/slurm/common.sh with stand-ins for scontrol and srun on PATH
    import subprocess

    script = REPO / "launch" / "slurm" / "common.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = run_common_sh(script, srun_exit=0)
    assert "SRUN MASTER_ADDR=node1 MASTER_PORT=" + str(slurm_master_port(123456)) in out, out
    assert "ranks finished with exit code 0" in out and "SCONTROL requeue" not in out, out
    out = run_common_sh(script, srun_exit=75)  # exit 75: the job requeues itself
    assert "ranks finished with exit code 75" in out and "SCONTROL requeue 123456" in out, out


def run_common_sh(script, srun_exit: int) -> str:
    """common.sh as a 2-task job 123456 on node[1-2] runs it, with a stand-in srun (prints the rendezvous
    it was given, exits `srun_exit`) and scontrol (the node names; records a requeue): its output."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(tmp)
        (bin_dir / "scontrol").write_text('#!/bin/sh\nif [ "$1" = show ]; then printf "node1\\nnode2\\n"; '
                                          'else echo "SCONTROL $*"; fi\n')
        (bin_dir / "srun").write_text(f'#!/bin/sh\necho "SRUN MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"\n'
                                      f'exit {srun_exit}\n')
        for f in bin_dir.iterdir():
            f.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "MSHG_"))}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="123456", SLURM_NTASKS="2",
                   SLURM_JOB_NODELIST="node[1-2]", MSHG_ROOT=str(REPO))
        proc = subprocess.run(["bash", str(script), "configs/lspet_cpu.yaml"], env=env, capture_output=True,
                              text=True, timeout=60)
    return proc.stdout + proc.stderr


ALIGNMENT_PROBE = """
import sys
from pipeline import distributed
from pipeline.config import load_config
from pipeline import train
train.views_need_alignment = lambda world: True  # as on a GPU
cfg = load_config(sys.argv[1], ["train.zero_stage=2"])
engine = train.build_engine(cfg, distributed.init("cpu", 1), [f"j{k}" for k in range(14)], lambda: 0.0)[0]
params = list(engine.module.parameters())
print(len(params), sum(p.numel() % 4 != 0 for p in params), sum(p.data_ptr() % 16 != 0 for p in params),
      sum(p.untyped_storage().nbytes() > p.nbytes for p in params))
"""


def test_zero_hands_back_every_parameter_16_byte_aligned(tmp_path):
    """ZeRO-2 gives the model its parameters back as views into one flat buffer. A heatmap head's
    14-float bias used to shift every parameter after it off 16-byte alignment, and CUDA kernels fault on
    that ("misaligned address" in the first step on an H200, docs/gpu.md). The flattening is the same on
    the CPU, so it is checked here: odd-sized parameters exist, the parameters are views, none is misaligned."""
    from tests.helpers import run_python

    proc = run_python(tmp_path, ALIGNMENT_PROBE, str(REPO / "configs" / "lspet_cpu.yaml"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, odd_sized, misaligned, views = map(int, proc.stdout.split()[-4:])
    assert odd_sized == 8 and views >= total - odd_sized, (total, odd_sized, views)
    assert misaligned == 0, f"{misaligned} of {total} parameters are not 16-byte aligned under ZeRO-2"


def test_cpu_optimizer_keeps_one_parameter_group():
    """The alignment groups are for GPUs only: on the CPU ZeRO's step costs per group, and the stacked
    twin's 75 channels make hundreds of odd-sized tensors (3.5x slower steps when each was a group)."""
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.train import make_optimizer

    cfg = load_config(REPO / "configs" / "lspet_cpu_stacked.yaml", [])
    model = build_model(cfg.model, 14, cfg.data.input_size)
    assert len(make_optimizer(cfg, model.parameters()).param_groups) == 1
    assert len(make_optimizer(cfg, model.parameters(), align_views=True).param_groups) > 100
