"""`make gpu-smoke`: the first ten minutes on a GPU node verify the GPU path end to end.

    python bench/gpu_smoke.py [--steps 40] [--keep DIR]

One PASS/FAIL line per stage, then a summary table. Stages:
  model     the full-size model alone on GPU 0 (random input): images/s and FLOP utilisation, the ceiling
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
Without a GPU it says so and exits 0; the CPU-runnable parts of these checks are ordinary tests
(tests/test_loop.py, tests/test_data.py, tests/test_train.py).
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
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125,
                    "B200": 2250, "RTX 4090": 165, "RTX 6000 Ada": 364}
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
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu_name), None)
    if not peak:
        return "peak unknown"
    return f"{100 * 3 * forward_flops * images_per_s / (peak * 1e12):.1f} % of {peak} TFLOP/s bf16"


def model_speed(batch: int = 32) -> None:
    """The model alone (random input, bf16 autocast, channels-last off): forward + backward + Adam. The
    ceiling the training path's images/s is measured against."""
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_model, count_flops

    cfg = load_config(REPO / "configs" / "lspet_gpu.yaml")
    model = build_model(cfg.model, 14, cfg.data.input_size)
    flops = count_flops(model, cfg.data.input_size)
    model = model.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, cfg.data.input_size, cfg.data.input_size, device="cuda")
    times = []
    for i in range(25):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(h.float().square().mean() for h in model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rate = batch / (sum(times[5:]) / len(times[5:]))
    mfu = flop_utilisation(flops, rate, torch.cuda.get_device_name(0))
    stage("model", True, f"{cfg.name} alone, batch {batch} at {cfg.data.input_size}: {rate:,.0f} img/s, "
                         f"{flops / 1e9:.1f} GFLOPs/img forward, MFU {mfu}, peak memory "
                         f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model, opt, x
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


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


def train_and_resume(tmp: Path, gpus: int, steps: int) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_model, count_flops

    common = ["--config", str(REPO / "configs" / "lspet_gpu.yaml"), f"data.train_shards={tmp}/train",
              f"data.val_shards={tmp}/val", "train.run_name=smoke", f"train.checkpoint_every={steps}",
              f"train.eval_every={steps}", "train.log_every=5",
              # a step of micro_batch x GPUs, as before the config fixed its global batch (128: 8 accumulation
              # steps each on one GPU, 8x the smoke's time)
              "train.global_batch=0",
              # the MLflow model (torch.export of the full-size model on the CPU) took over 5 minutes at a
              # run's end on an H200 node's torch 2.11 (docs/gpu.md): the export stage checks ONNX export
              "train.log_model=false"]
    first = run([sys.executable, "-m", "pipeline.cli", "train", "--ranks", str(gpus), *common,
                 f"stop.max_steps={steps}"], tmp)
    second = run([sys.executable, "-m", "pipeline.cli", "train", "--ranks", str(gpus), *common,
                  f"stop.max_steps={steps + 10}"], tmp)
    out = first.stdout + first.stderr
    ranks = sorted(set(re.findall(r"rank (\d+) \(local \d+\): (cuda:\d+ [^\n]+)", out)))
    for rank, gpu in ranks:
        print(f"  rank {rank}: {gpu}")
    ok = first.returncode == 0 and second.returncode == 0 and f"resumed at step {steps}" in second.stdout
    if not ok:
        print((out + second.stdout + second.stderr)[-5000:])
        stage("train", False, f"exit codes {first.returncode}, {second.returncode}")
        return
    rate = metric(tmp, "smoke", "images_per_s")[-3:]
    wait = metric(tmp, "smoke", "data_wait_fraction")[-3:]
    memory = metric(tmp, "smoke", "peak_memory_gb")
    cfg = load_config(REPO / "configs" / "lspet_gpu.yaml")
    flops = count_flops(build_model(cfg.model, 14, cfg.data.input_size), cfg.data.input_size)
    per_gpu = sum(rate) / len(rate) / gpus
    mfu = flop_utilisation(flops, per_gpu, torch.cuda.get_device_name(0))
    stage("train", len(ranks) == gpus, f"{gpus} rank(s), {per_gpu:.0f} img/s per GPU, data wait "
                                       f"{100 * sum(wait) / len(wait):.0f} %, MFU {mfu}, peak memory "
                                       f"{max(memory):.1f} GiB (rank 0); resumed at step {steps}")
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args()
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode:
        print("gpu-smoke: no NVIDIA GPU on this machine (no working nvidia-smi): nothing to check here. "
              "The CPU-runnable parts are in `make test`.")
        return 0
    gpus = versions()
    try:
        model_speed()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        stage("model", False, f"{type(e).__name__}: {e}")
    if not gpus:
        return 1
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="gpu-smoke-"))
    tmp.mkdir(parents=True, exist_ok=True)
    sample = REPO / "shards" / "sample" / "lspet"
    a = run([sys.executable, "-m", "pipeline.cli", "shard", "lspet", "--root", str(sample), "--out", str(tmp / "train"),
             "--range", "1:160", "--overwrite", "--quiet"], tmp)
    b = run([sys.executable, "-m", "pipeline.cli", "shard", "lspet", "--root", str(sample), "--out", str(tmp / "val"),
             "--range", "161:200", "--overwrite", "--quiet"], tmp)
    if not stage("shards", a.returncode == b.returncode == 0, f"{tmp}/train (160), {tmp}/val (40)"):
        return 1
    checks = {"dali": lambda: dali_gpu_vs_cpu(tmp / "val"), "loader": lambda: loader_speed(tmp / "train"),
              "train": lambda: train_and_resume(tmp, gpus, args.steps),
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
