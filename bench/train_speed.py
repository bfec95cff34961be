"""Training-step speed against the plain stacked-hourglass baseline, measured in the same run.

    python bench/train_speed.py [--rounds 3] [--steps 2] [--reference DIR] [--no-ranks] [--precision-check]

Rows (single process, every core; images/s of one training step: forward, the summed per-module loss,
backward, optimizer step):
  baseline   configs/stacked_hg8.yaml (8 x 256, 256x256, 16 joints, batch 4) the plain way: eager fp32,
             NCHW, RMSprop, no DeepSpeed, as princeton-vl/pytorch_stacked_hourglass trains it
  reference  that repository's own PoseNet(8, 256, 16) beside it, when --reference names a checkout of it
             (its code is not part of this project)
  defaults   the same model and batch through the project's default training path: the DeepSpeed engine
             (ZeRO-2, the trainer's DeepSpeed config), bf16 autocast, channels_last input
  msc_hg     configs/msc_hg.yaml at 256, the same defaults and batch (its FLOPs are ~1.6x the stack's)
and, through `mshg train --ranks 2` on real shards (DALI, the DeepSpeed engine, MLflow): the CPU demo
config and the CPU recipe config (images/s as the run logs it, the data pipeline included).

The single-process rows take turns in interleaved rounds (a machine getting slower moves every row
alike); medians are compared. GFLOP/s counts a training step as 3x the forward FLOPs; the limit is this
machine's measured peak: an fp32 and a bf16 matmul on every core, timed in the same run. Memory: the
process's peak resident set during the row's steps (the single-process rows share one process, so the
models built before are included), and rank 0's peak for the 2-rank rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET = 2.5  # defaults vs baseline (issue 11)
JOINTS = 16


def matmul_peak(dtype, n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of an n x n matmul on every core (the best of `reps`)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class PeakRSS:
    """The process's resident set, sampled every 10 ms while a row runs."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._on = psutil.Process(), 0, False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            if self._on:
                self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def measure(self, fn):
        self.peak, self._on = 0, True
        fn()
        self._on = False
        return self.peak


def synthetic_batch(size: int, batch: int, strides: list[int], sigma: float):
    import torch

    from pipeline.targets import make_targets

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    keypoints = torch.cat([torch.rand(batch, JOINTS, 2, generator=g) * size, torch.ones(batch, JOINTS, 1)], 2)
    heatmaps, weights = make_targets(keypoints, size, strides, sigma)
    return images, heatmaps, weights


def plain_step(cfg, batch: int):
    """The baseline: eager fp32, NCHW, RMSprop (the config's), plain torch."""
    import torch

    from pipeline.data import to_model_input
    from pipeline.model import build_model
    from pipeline.targets import cascade_loss
    from pipeline.train import make_optimizer

    torch.manual_seed(0)
    model = build_model(cfg.model, JOINTS, cfg.data.input_size)
    images, heatmaps, weights = synthetic_batch(cfg.data.input_size, batch, model.strides, cfg.data.sigma)
    x = to_model_input(images, channels_last=False)
    opt = make_optimizer(cfg, model.parameters())

    def step():
        loss, _ = cascade_loss(model(x), heatmaps, weights, model.strides)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def reference_step(checkout: Path, batch: int):
    """princeton-vl/pytorch_stacked_hourglass's own PoseNet(8, 256, 16), its MSE, RMSprop 2.5e-4."""
    import torch

    sys.path.insert(0, str(checkout))
    posenet = importlib.import_module("models.posenet")
    torch.manual_seed(0)
    model = posenet.PoseNet(8, 256, JOINTS)
    x = torch.randn(batch, 3, 256, 256)
    target = torch.rand(batch, JOINTS, 64, 64)
    opt = torch.optim.RMSprop(model.parameters(), lr=2.5e-4)

    def step():
        out = model(x)  # (B, 8, J, 64, 64)
        loss = ((out - target[:, None]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def default_step(cfg, batch: int):
    """The trainer's default path for this config: its DeepSpeed config (ZeRO-2, torch_autocast bf16), its
    optimizer, channels_last input, the summed loss."""
    import deepspeed
    import torch

    from pipeline.data import to_model_input
    from pipeline.model import build_model
    from pipeline.targets import cascade_loss
    from pipeline.train import deepspeed_config, make_optimizer

    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=batch, grad_accum=1, global_batch=0))
    model = build_model(cfg.model, JOINTS, cfg.data.input_size)
    images, heatmaps, weights = synthetic_batch(cfg.data.input_size, batch, model.strides, cfg.data.sigma)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(cfg, model.parameters()),
                                      config=deepspeed_config(cfg, 1))

    def step():
        loss, _ = cascade_loss(engine(to_model_input(images, cfg.train.channels_last)), heatmaps, weights, model.strides)
        engine.backward(loss)
        engine.step()
    return step


def two_rank_run(config: str, steps: int, shards: dict, *overrides: str) -> tuple[float, float, dict[int, float]]:
    """(images/s, rank 0's peak memory in GiB, {step: loss/total} as logged) of `mshg train --ranks 2`
    on real shards, from MLflow."""
    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="train-speed-"))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    name = Path(config).stem
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--ranks", "2", "--master-port", "29677", "--config",
           str(REPO / config), f"train.run_name={name}", f"train.out_dir={tmp}/runs", f"stop.max_steps={steps}",
           "stop.max_minutes=0", "stop.expected_loss=0", "train.eval_every=0", "data.val_shards=",
           f"data.train_shards={shards['train']}", "train.log_every=5", *overrides]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{config}: 2-rank run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("mshg").experiment_id])[0]
    rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)]
    memory = [m.value for m in client.get_metric_history(run.info.run_id, "peak_memory_gb")]
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss/total")}
    return statistics.median(rates[len(rates) // 3:]), max(memory or [float("nan")]), losses


def precision_check(shards: dict, steps: int = 50) -> None:
    """The default precision must not change what is learnt: the CPU recipe's first `steps` steps on 2
    ranks in bf16 (the default) and in fp32, same data order and seed, loss against loss."""
    logged = ("train.log_every=1",)
    _, _, bf16 = two_rank_run("configs/lspet_cpu.yaml", steps, shards, *logged)
    _, _, fp32 = two_rank_run("configs/lspet_cpu.yaml", steps, shards, *logged, "train.precision=fp32")
    common = sorted(set(bf16) & set(fp32))
    diffs = [abs(bf16[k] - fp32[k]) / fp32[k] for k in common]
    last = common[-1]
    print(f"\nlspet_cpu, steps 1-{last} on 2 ranks, bf16 (default) against fp32 ({len(common)} steps): loss/total "
          f"differs by {100 * statistics.mean(diffs):.2f} % on average, {100 * max(diffs):.2f} % at most "
          f"(step 1: {bf16[common[0]]:.5f} vs {fp32[common[0]]:.5f}; step {last}: {bf16[last]:.5f} vs {fp32[last]:.5f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the single-process rows")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row and round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reference", default=None, help="a checkout of princeton-vl/pytorch_stacked_hourglass")
    p.add_argument("--no-ranks", action="store_true", help="skip the 2-rank rows on real shards")
    p.add_argument("--rank-steps", type=int, default=60)
    p.add_argument("--precision-check", action="store_true",
                   help="only the bf16-against-fp32 loss check of the first 50 steps (2 ranks, real shards)")
    args = p.parse_args()
    if args.precision_check:
        return precision_check({"train": str(REPO / "runs" / "shards" / "lspet-train")})

    import torch

    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.model import build_model, count_flops

    distributed.init("cpu")  # a world of one: DeepSpeed's engine needs a process group
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    stacked = load_config(REPO / "configs" / "stacked_hg8.yaml", ["train.device=cpu"])
    msc = load_config(REPO / "configs" / "msc_hg.yaml", ["train.device=cpu"])
    flops = {"stacked": count_flops(build_model(stacked.model, JOINTS, 256), 256),
             "msc": count_flops(build_model(msc.model, JOINTS, 256), 256)}
    rows = {"baseline": ("stacked_hg8", "eager fp32, NCHW, RMSprop, plain torch", flops["stacked"], "fp32",
                         plain_step(stacked, args.batch))}
    if args.reference:
        rows["reference"] = ("princeton-vl PoseNet(8,256,16)", "its own code, fp32, RMSprop", flops["stacked"], "fp32",
                             reference_step(Path(args.reference), args.batch))
    rows["defaults"] = ("stacked_hg8", "defaults: DeepSpeed ZeRO-2, bf16 autocast, channels_last", flops["stacked"],
                        "bf16", default_step(stacked, args.batch))
    rows["msc_hg"] = ("msc_hg", "defaults: DeepSpeed ZeRO-2, bf16 autocast, channels_last", flops["msc"], "bf16",
                      default_step(msc, args.batch))
    sampler = PeakRSS()
    for *_, step in rows.values():
        step()  # warm-up
    times = {k: [] for k in rows}
    memory = {k: 0 for k in rows}
    for _ in range(args.rounds):
        for key, (*_, step) in rows.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                memory[key] = max(memory[key], sampler.measure(step))
                times[key].append(time.perf_counter() - t0)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}; "
          f"{args.rounds} rounds x {args.steps} steps; measured peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 "
          f"{peak['bf16']:.0f} GFLOP/s (matmul on every core)")
    header = f"| config | settings | images/s | vs baseline | GFLOP/s | of peak | GFLOPs/img | peak memory |"
    print("\n" + header + "\n|---|---|---|---|---|---|---|---|")
    base = args.batch / statistics.median(times["baseline"])
    result = {}
    for key, (config, settings, f, precision, _) in rows.items():
        rate = args.batch / statistics.median(times[key])
        result[key] = rate
        achieved = 3 * f * rate / 1e9
        print(f"| {config} | {settings} | {rate:.2f} | {rate / base:.2f}x | {achieved:.0f} | "
              f"{100 * achieved / peak[precision]:.0f} % of {precision} | {f / 1e9:.1f} | {memory[key] / 2**30:.2f} GiB |")
    if not args.no_ranks:
        shards = {"train": str(REPO / "runs" / "shards" / "lspet-train")}
        if not Path(shards["train"]).is_dir():
            print(f"(2-rank rows skipped: no {shards['train']}; shard LSPET as the README says)")
        else:
            for config in ("configs/msc_hg_cpu.yaml", "configs/lspet_cpu.yaml"):
                cfg = load_config(REPO / config)
                f = count_flops(build_model(cfg.model, 14, cfg.data.input_size), cfg.data.input_size)
                rate, gib, _ = two_rank_run(config, args.rank_steps, shards)
                achieved = 3 * f * rate / 1e9
                print(f"| {Path(config).stem} | 2 ranks, `mshg train` on LSPET shards (DALI, DeepSpeed ZeRO-2, "
                      f"{cfg.train.precision}), input {cfg.data.input_size} | {rate:.1f} | - | {achieved:.0f} | "
                      f"{100 * achieved / peak[cfg.train.precision if cfg.train.precision != 'fp16' else 'bf16']:.0f} %"
                      f" | {f / 1e9:.2f} | {gib:.2f} GiB (rank 0) |")
            precision_check(shards)
    print(f"\ndefaults vs baseline: {result['defaults'] / base:.2f}x (target >= {TARGET}x)")
    if "reference" in result:
        print(f"baseline vs the reference implementation: {base / result['reference']:.2f}x (target >= 0.9x)")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")


if __name__ == "__main__":
    main()
