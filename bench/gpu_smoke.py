"""`make gpu-smoke`: the first ten minutes on a GPU node verify the GPU path end to end.

    python bench/gpu_smoke.py [--steps 40] [--keep DIR]
    python bench/gpu_smoke.py --perf [--levers-budget 240] [--levers a,b] [key=value ...]   # the speed run, ~8 min

One PASS/FAIL line per stage, then a summary table. Stages:
  model     the full-size model alone on GPU 0 (random input): images/s and FLOP utilisation, the ceiling
            (bench/gpu_levers.py's eager row; with --perf its whole lever table, within --levers-budget s)
  versions  torch / CUDA / NCCL / DALI / DeepSpeed and the visible GPUs (refuses a CPU build of torch)
  shards    the embedded LSPET sample -> shards (train 1-160, val 161-200)
  dali      one validation batch through DALI on the GPU and on the CPU: images on the GPU, uint8, shape;
            keypoints, matrices and ids identical; the largest pixel difference (nvJPEG vs libjpeg)
  loader    DALI GPU loader throughput at 256x256 with the full training recipe (target >= 3,000 img/s
            per GPU on an H100-class GPU) and the cost of building an epoch's pipeline (s, GPU memory)
  train     configs/lspet_gpu.yaml on every visible GPU for --steps steps with a checkpoint and an
            evaluation, then resumed for 10 more ("resumed at step N"); images/s per GPU, data-wait
            fraction, model FLOP utilisation against the GPU's bf16 peak, peak memory, a line per rank
            naming its GPU
  accum     accumulation 2 on 2 GPUs: trainer step == DeepSpeed's global_steps (meta.json)
  export    `mshg export` (safetensors + ONNX) and `mshg predict` on the GPU
--perf runs versions, the lever table plus an "as trained" row (the model alone with the train stage's
settings), shards (the 160 training photos repeated, so that the timed steps stay inside one epoch), loader
and one training run (no validation, no resume), and prints the real path's images/s against the as-trained
row (target >= 0.9x); key=value overrides apply to that run and row (e.g. train.compile=true).
Without a GPU it says so and exits 0; the CPU-runnable parts of these checks are ordinary tests
(tests/test_loop.py, tests/test_data.py, tests/test_train.py, tests/test_gpu_smoke.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gpu_levers import LEVERS, Lever, mfu, peak_tflops, run_levers  # noqa: E402

CONFIG = REPO / "configs" / "lspet_gpu.yaml"
MFU_TARGET = 15.0  # % of the bf16 peak, the model alone (issue: 4.5 % on 2026-12-04)
REAL_TARGET = 0.9  # the real training path's images/s against the model alone with the same settings
results: list[tuple[str, bool, str]] = []


_last = [time.perf_counter()]


def stage(name: str, ok: bool, detail: str) -> bool:
    now = time.perf_counter()
    detail = f"{detail} [{now - _last[0]:.0f} s]"  # the stage's wall time, for planning a node's first minutes
    _last[0] = now
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name:9s} {detail}", flush=True)
    return ok


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # the repo first, then whatever PYTHONPATH already holds (an offline node's carried packages, say)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db")
    print("  $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def flop_utilisation(forward_flops: float, images_per_s: float, gpu_name: str) -> str:
    """Training FLOPs (forward x 3: forward + backward) per second against the GPU's dense bf16 peak."""
    peak = peak_tflops(gpu_name)
    return f"{mfu(forward_flops, images_per_s, peak):.1f} % of {peak} TFLOP/s bf16" if peak else "peak unknown"


def as_trained(cfg) -> Lever:
    """The model alone with the settings the train stage runs: its micro-batch, precision, layout and
    train.compile, cuDNN's benchmark mode (the trainer turns it on) and the config's optimizer."""
    t = cfg.train
    return Lever("as trained", f"the train stage's settings ({t.precision}, "
                               f"{'NHWC' if t.channels_last else 'NCHW'}, compile {'on' if t.compile else 'off'})",
                 batch=t.micro_batch, bf16=t.precision == "bf16", channels_last=t.channels_last,
                 cudnn_benchmark=True, compile="default" if t.compile else "")


def model_speed(levers: list[Lever], budget_s: float) -> dict:
    """The model alone (random input) lever by lever (bench/gpu_levers.py): {lever name: row}. Eager is the
    ceiling the training path was measured against before; the best row is what the levers reach."""
    import torch

    from pipeline.config import load_config

    cfg = load_config(CONFIG)
    rows = run_levers(cfg, levers, torch.device("cuda"), budget_s=budget_s, print_fn=lambda line: print("  " + line))
    ran = [r for r in rows if r.images_per_s]
    failed = [r.lever.name for r in rows if r.note.startswith("FAILED")]
    best = max(ran, key=lambda r: r.images_per_s, default=None)  # the same FLOPs per image: MFU follows img/s
    if best is None:
        stage("model", False, f"no lever ran ({', '.join(r.note for r in rows)})")
        return {}
    eager = next((r for r in ran if r.lever.name == "eager"), best)
    stage("model", not failed, f"{cfg.name} alone at {cfg.data.input_size}: eager batch {eager.batch} "
                               f"{eager.images_per_s:,.0f} img/s, MFU {eager.mfu or 0:.1f} %; best: {best.lever.name}, "
                               f"{best.images_per_s:,.0f} img/s, MFU {best.mfu or 0:.1f} % (target >= {MFU_TARGET:.0f} %: "
                               f"{'met' if (best.mfu or 0) >= MFU_TARGET else 'NOT met'}), {best.memory_gib or 0:.1f} GiB"
                               + (f"; failed: {', '.join(failed)}" if failed else ""))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {r.lever.name: r for r in rows}


def versions() -> int:
    import torch

    try:
        import deepspeed
        import nvidia.dali
    except ImportError as e:
        stage("versions", False, f"torch {torch.__version__}; cannot import {e.name}: {e}")
        return 0

    if not torch.version.cuda:
        stage("versions", False, f"torch {torch.__version__} is a CPU build: install a CUDA build of torch first "
                                 f"(make setup TORCH=)")
        return 0
    n = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if n else "-"
    stage("versions", n > 0, f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, "
                             f"DALI {nvidia.dali.__version__}, DeepSpeed {deepspeed.__version__}; {n} GPU(s): {names}")
    return n


def dali_gpu_vs_cpu(val: Path) -> None:
    import numpy as np
    import torch

    from pipeline.config import DataConfig
    from pipeline.data import build_loader, unpack
    from shards.format import ShardSet

    shards, cfg = ShardSet.open(val), DataConfig(train_shards=str(val), input_size=256)
    gpu = unpack(next(iter(build_loader(shards, cfg, 16, train=False, device_id=0))), torch.device("cuda"))
    cpu = unpack(next(iter(build_loader(shards, cfg, 16, train=False, device_id=None))), torch.device("cpu"))
    same = all(torch.equal(gpu[k].cpu(), cpu[k]) for k in ("keypoints", "matrix", "sample_id"))
    diff = (gpu["image"].cpu().int() - cpu["image"].int()).abs()
    ok = gpu["image"].is_cuda and gpu["image"].dtype == torch.uint8 and gpu["image"].shape == cpu["image"].shape and same
    stage("dali", ok and float(diff.float().mean()) < 4.0,
          f"images {tuple(gpu['image'].shape)} {gpu['image'].dtype} on {gpu['image'].device}; keypoints/matrices/ids "
          f"{'identical' if same else 'DIFFER'}; pixel difference max {int(diff.max())}, mean {float(diff.float().mean()):.2f}"
          f" ({np.prod(diff.shape)} values)")


def loader_speed(train: Path) -> None:
    import torch

    from pipeline.config import DataConfig
    from pipeline.data import build_loader
    from shards.format import ShardSet

    shards, cfg = ShardSet.open(train), DataConfig(train_shards=str(train), input_size=256, num_threads=4)
    before = torch.cuda.memory_reserved(0)
    t0 = time.perf_counter()
    loader = build_loader(shards, cfg, 32, train=True, device_id=0)
    build = time.perf_counter() - t0
    images, t0 = 0, None
    for epoch in range(40):  # 160 samples an epoch: the rebuild cost is part of what a small set pays
        for k, batch in enumerate(loader):
            if t0 is None and epoch == 1:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            if t0 is not None:
                images += batch[0]["image"].shape[0]
    torch.cuda.synchronize()
    rate = images / (time.perf_counter() - t0)
    del loader
    t1 = time.perf_counter()
    loader = build_loader(shards, cfg, 32, train=True, device_id=0)
    next(iter(loader))
    rebuild = time.perf_counter() - t1
    after = torch.cuda.memory_reserved(0)
    stage("loader", rate >= 3000, f"{rate:,.0f} img/s on GPU 0 at 256x256 (target >= 3,000 on H100-class); pipeline "
                                  f"build {build:.2f} s, rebuild + first batch {rebuild:.2f} s; torch-reserved GPU "
                                  f"memory {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")


def metric(tmp: Path, run_name: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("mshg").experiment_id],
                             filter_string=f"attributes.run_name = '{run_name}'")[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def train_and_resume(tmp: Path, gpus: int, steps: int, overrides: list[str] = (), resume: bool = True,
                     model_alone=None) -> None:
    """configs/lspet_gpu.yaml for `steps` steps (then resumed for 10 more), `overrides` last; `model_alone`: the
    lever row with the same settings, which the real path's images/s per GPU is compared with."""
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_model, count_flops

    common = ["--config", str(CONFIG), f"data.train_shards={tmp}/train",
              f"data.val_shards={tmp}/val", "train.run_name=smoke", f"train.checkpoint_every={steps}",
              f"train.eval_every={steps}", "train.log_every=5",
              # a step of micro_batch x GPUs, as before the config fixed its global batch (128: 8 accumulation
              # steps each on one GPU, 8x the smoke's time)
              "train.global_batch=0",
              # the MLflow model (torch.export of the full-size model on the CPU) took over 5 minutes at a
              # run's end on an H200 node's torch 2.11 (docs/gpu.md): the export stage checks ONNX export
              "train.log_model=false", *overrides]
    first = run([sys.executable, "-m", "pipeline.cli", "train", "--ranks", str(gpus), *common,
                 f"stop.max_steps={steps}"], tmp)
    second = run([sys.executable, "-m", "pipeline.cli", "train", "--ranks", str(gpus), *common,
                  f"stop.max_steps={steps + 10}"], tmp) if resume else first
    out = first.stdout + first.stderr
    ranks = sorted(set(re.findall(r"rank (\d+) \(local \d+\): (cuda:\d+ [^\n]+)", out)))
    for rank, gpu in ranks:
        print(f"  rank {rank}: {gpu}")
    ok = first.returncode == 0 and second.returncode == 0 and (not resume or f"resumed at step {steps}" in second.stdout)
    if not ok:
        print((out + second.stdout + second.stderr)[-5000:])
        stage("train", False, f"exit codes {first.returncode}, {second.returncode}")
        return
    rate = metric(tmp, "smoke", "images_per_s")[-3:]
    wait = metric(tmp, "smoke", "data_wait_fraction")[-3:]
    memory = metric(tmp, "smoke", "peak_memory_gb")
    cfg = load_config(CONFIG, overrides)
    flops = count_flops(build_model(cfg.model, 14, cfg.data.input_size), cfg.data.input_size)
    per_gpu = sum(rate) / len(rate) / gpus
    utilisation = flop_utilisation(flops, per_gpu, torch.cuda.get_device_name(0))
    against = ""
    if model_alone is not None and model_alone.images_per_s:
        ratio = per_gpu / model_alone.images_per_s
        against = (f"; real / model alone as trained ({model_alone.images_per_s:.0f} img/s): {ratio:.2f}x (target >= "
                   f"{REAL_TARGET}x: {'met' if ratio >= REAL_TARGET else 'NOT met'})")
    stage("train", len(ranks) == gpus, f"{gpus} rank(s), micro-batch {cfg.train.micro_batch}, {per_gpu:.0f} img/s per "
                                       f"GPU, data wait {100 * sum(wait) / len(wait):.0f} %, MFU {utilisation}, peak "
                                       f"memory {max(memory):.1f} GiB (rank 0)"
                                       + (f"; resumed at step {steps}" if resume else "") + against)
    # host-side phase times: on a GPU kernels run asynchronously, so a phase's time lands where the host waits
    phases = {k: metric(tmp, "smoke", f"time_fraction/{k}")[-3:] for k in ("data", "targets", "forward", "backward",
                                                                           "step", "ema", "other")}
    print("  step breakdown (rank 0, host time): " + ", ".join(f"{k} {100 * sum(v) / max(len(v), 1):.0f} %"
                                                              for k, v in phases.items()))


def accumulation(tmp: Path) -> None:
    proc = run([sys.executable, "-m", "pipeline.cli", "train", "--ranks", "2", "--config",
                str(REPO / "configs" / "lspet_gpu.yaml"), f"data.train_shards={tmp}/train", "data.val_shards=",
                "train.run_name=accum", "train.micro_batch=4", "train.global_batch=16", "stop.max_steps=5"], tmp)
    ckpts = tmp / "runs" / "accum" / "checkpoints"
    meta = json.loads((ckpts / (ckpts / "latest").read_text() / "meta.json").read_text()) if proc.returncode == 0 else {}
    stage("accum", meta.get("step") == meta.get("engine_steps") == 5 and meta.get("micro_batches") == 10,
          f"2 GPUs x micro-batch 4 x 2 accumulation: trainer step {meta.get('step')}, DeepSpeed global_steps "
          f"{meta.get('engine_steps')}, micro-batches {meta.get('micro_batches')}")


def export_and_predict(tmp: Path) -> None:
    run_dir = tmp / "runs" / "smoke"
    a = run([sys.executable, "-m", "pipeline.cli", "export", "--checkpoint", str(run_dir), "--safetensors",
             str(tmp / "w.safetensors"), "--onnx", str(tmp / "m.onnx")], tmp)
    images = sorted(str(p) for p in (REPO / "shards" / "sample" / "lspet" / "images").glob("*.jpg"))[-8:]
    b = run([sys.executable, "-m", "pipeline.cli", "predict", "--checkpoint", str(tmp / "w.safetensors"), "--out",
             str(tmp / "p.json"), "--device", "cuda", *images], tmp)
    n = len(json.loads((tmp / "p.json").read_text())["predictions"]) if b.returncode == 0 else 0
    stage("export", a.returncode == 0 and n == len(images), f"export exit {a.returncode}; predict on cuda: "
                                                             f"{n}/{len(images)} images")
    if a.returncode or b.returncode:
        print((a.stderr + b.stderr)[-3000:])


def repeated_sample(root: Path, copies: int) -> Path:
    """An LSPET-style folder with the sample's 160 training photographs `copies` times over (links) and their
    joints tiled: a training set whose epoch outlasts the timed steps. (Each epoch builds a new DALI pipeline,
    ~3 s on the H200: the loader stage's "rebuild", which a 160-image epoch would pay every few steps.)"""
    import numpy as np
    import scipy.io

    sample = REPO / "shards" / "sample" / "lspet"
    joints = scipy.io.loadmat(sample / "joints.mat")["joints"][..., :160]  # 14 x 3 x N
    (root / "images").mkdir(parents=True, exist_ok=True)
    for k in range(160 * copies):
        link = root / "images" / f"im{k + 1:05d}.jpg"
        if not link.is_symlink():
            link.symlink_to(sample / "images" / f"im{k % 160 + 1:05d}.jpg")
    scipy.io.savemat(root / "joints.mat", {"joints": np.tile(joints, copies)})
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    p.add_argument("--perf", action="store_true", help="the speed run: lever table, loader, one training run")
    p.add_argument("--levers-budget", type=float, default=240, help="with --perf: seconds after which no lever starts")
    p.add_argument("--levers", default=",".join(lever.name for lever in LEVERS[1:]),
                   help="with --perf: the lever rows after eager and as trained, comma-separated ('' for none)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/lspet_gpu.yaml for the train stage")
    args = p.parse_args(argv)
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode:
        print("gpu-smoke: no GPU on this machine (no working nvidia-smi): nothing to check or measure here. "
              "The CPU-runnable parts are in `make test`.")
        return 0
    from pipeline.config import load_config

    cfg = load_config(CONFIG, args.overrides)  # the train stage's settings, also those of the as-trained row
    if args.perf:
        print(f"gpu-smoke --perf plan: lever table <= {args.levers_budget:.0f} s (a compile that starts within it "
              f"may run past it), shards and loader ~1 min, one training run of {args.steps} steps ~2-3 min: about "
              f"{args.levers_budget / 60 + 4:.0f} minutes (the loan's target: under 8)", flush=True)
    gpus = versions()
    alone = {}
    try:
        chosen = [lever for lever in LEVERS[1:] if lever.name in args.levers.split(",")]
        alone = model_speed([LEVERS[0], as_trained(cfg), *chosen] if args.perf else LEVERS[:1],
                            args.levers_budget if args.perf else 600)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        stage("model", False, f"{type(e).__name__}: {e}")
    if not gpus:
        return 1
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="gpu-smoke-"))
    tmp.mkdir(parents=True, exist_ok=True)
    sample = REPO / "shards" / "sample" / "lspet"
    if args.perf:
        # every rank's epoch longer than the run: (steps + 5) micro-batches of each GPU
        copies = -(-(args.steps + 5) * cfg.train.micro_batch * gpus // 160)
        a = run([sys.executable, "-m", "pipeline.cli", "shard", "lspet", "--root",
                 str(repeated_sample(tmp / "repeated", copies)), "--out", str(tmp / "train"), "--range",
                 f"1:{160 * copies}", "--workers", str(min(8, os.cpu_count() or 1)), "--overwrite", "--quiet"], tmp)
        if not stage("shards", a.returncode == 0, f"{tmp}/train: the 160 training photos x {copies}"):
            print(a.stdout[-2000:] + a.stderr[-2000:])
            return 1
        checks = {"loader": lambda: loader_speed(tmp / "train"),
                  "train": lambda: train_and_resume(tmp, gpus, args.steps, ["data.val_shards=", "train.eval_every=0",
                                                                          "train.checkpoint_every=0", *args.overrides],
                                                    resume=False, model_alone=alone.get("as trained"))}
    else:
        a = run([sys.executable, "-m", "pipeline.cli", "shard", "lspet", "--root", str(sample), "--out",
                 str(tmp / "train"), "--range", "1:160", "--overwrite", "--quiet"], tmp)
        b = run([sys.executable, "-m", "pipeline.cli", "shard", "lspet", "--root", str(sample), "--out", str(tmp / "val"),
                 "--range", "161:200", "--overwrite", "--quiet"], tmp)
        if not stage("shards", a.returncode == b.returncode == 0, f"{tmp}/train (160), {tmp}/val (40)"):
            return 1
        checks = {"dali": lambda: dali_gpu_vs_cpu(tmp / "val"), "loader": lambda: loader_speed(tmp / "train"),
                  "train": lambda: train_and_resume(tmp, gpus, args.steps, args.overrides),
                  "accum": lambda: accumulation(tmp) if gpus >= 2 else stage("accum", True, "skipped: needs 2 GPUs"),
                  "export": lambda: export_and_predict(tmp)}
    for name, check in checks.items():
        try:
            check()
        except Exception as e:  # noqa: BLE001 - a stage that raises is a FAIL line, the others still run
            traceback.print_exc()
            stage(name, False, f"{type(e).__name__}: {e}")
    print("\n| stage | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
