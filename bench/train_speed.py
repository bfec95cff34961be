"""Training speed of the CPU recipe's path, row by row, measured in the same run.

    python bench/train_speed.py [--config configs/lspet_cpu.yaml] [--rounds 3] [--seconds 20] [--levers]
    python bench/train_speed.py --stacked [--reference DIR]      # issue 11's rows: stacked_hg8 / msc_hg at 256
    python bench/train_speed.py --precision-check                 # bf16 against fp32, first 50 steps
    python bench/train_speed.py --zero-stages --ranks 2 --rounds 2 --real-steps 300   # row (c) at ZeRO-2/1/0
    python bench/train_speed.py --real-levers --ranks 2 --rounds 2 [--compile]      # row (c) with each lever

Rows on the recipe's model, batch and precision (`train.precision` as the trainer resolves it), with
every core of the machine:
  (a) plain      a plain PyTorch loop: one process, torch.set_num_threads(cores), random tensors (uint8
                 images, keypoints), the project's targets and summed loss, the trainer's optimizer (Adam,
                 fused), channels_last input
  (b) plain+DALI the same loop fed by the project's real loader: DALI on the CPU (`build_loader`), joints
                 relabelled after flips, targets, `to_model_input`
  (c) mshg train the real path, `mshg train --ranks N` on the LSPET shards (DeepSpeed, ranks, EMA, MLflow,
                 logging), images/s as its log reports them (median of the last two thirds), and its
                 per-step breakdown (Meter.PHASES: data wait, targets, forward, backward with DeepSpeed's
                 gradient reduction, optimizer step, EMA, other: decisions, logging, evaluations)
Rows (a) and (b) take turns in interleaved rounds before and after (c) (this machine's speed drifts by
10-20 % over minutes; interleaving moves every row alike). Ratios are against (a). GFLOP/s counts a
training step as 3x the forward FLOPs; the peak is a matmul on every core in the same precision.

--levers adds one row per lever against (a), interleaved the same way: micro-batch, for-loop/foreach Adam,
the EMA update, DeepSpeed's engine (ZeRO 0/1/2, one process), the DALI loader's threads, NCHW input, the cost of
the targets alone; with --compile, torch.compile (its compile time printed, then its steps).
"""
from __future__ import annotations

import argparse
import ctypes.util
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


def synthetic_batch(size: int, batch: int, strides: list[int], sigma: float, joints: int = JOINTS):
    import torch

    from pipeline.targets import make_targets

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    keypoints = torch.cat([torch.rand(batch, joints, 2, generator=g) * size, torch.ones(batch, joints, 1)], 2)
    heatmaps, weights = make_targets(keypoints, size, strides, sigma)
    return images, heatmaps, weights


def plain_step(cfg, batch: int):
    """The baseline: eager fp32, NCHW, RMSprop (the config's), plain torch."""
    import torch

    from pipeline.inputs import to_model_input
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

    from pipeline.inputs import to_model_input
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


def recipe_loop(cfg, batch: int, loader=None, shards=None, optimizer: dict | None = None, ema: bool = False,
                zero: int | None = None, compiled: bool = False):
    """One optimizer step of the recipe's model as a plain loop (or DeepSpeed's engine with ZeRO `zero`):
    random tensors, or batches from the project's DALI `loader`, then targets, forward, loss, backward, step.
    compiled: the model through torch.compile (its first step compiles, for minutes on 2 cores)."""
    import torch

    from pipeline.data import unpack
    from pipeline.ema import WeightAverage
    from pipeline.inputs import to_model_input, training_inputs
    from pipeline.model import build_model
    from pipeline.targets import cascade_loss
    from pipeline.train import deepspeed_config, make_optimizer

    torch.manual_seed(0)
    size = cfg.data.input_size
    model = build_model(cfg.model, 14, size)
    images, heatmaps, weights = synthetic_batch(size, batch, model.strides, cfg.data.sigma, joints=14)
    # the trainer's optimizer (Adam, fused), or Adam with the given settings (a lever row)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, **optimizer) if optimizer is not None \
        else make_optimizer(cfg, model.parameters())
    forward = torch.compile(model) if compiled else model
    if zero is not None:
        import deepspeed

        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=batch, grad_accum=1,
                                                               global_batch=0, zero_stage=zero))
        forward, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(c, 1))
    average = WeightAverage(model, cfg.train.ema_decay or 0.998) if ema else None
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16" and zero is None)
    batches = iter(loader) if loader is not None else None
    perm = shards.flip_permutation() if shards is not None else None

    def step():
        x, h, w = to_model_input(images, cfg.train.channels_last), heatmaps, weights
        if batches is not None:
            try:
                b = unpack(next(batches), torch.device("cpu"))
            except StopIteration:  # an epoch ended (the loader resets itself)
                b = unpack(next(batches), torch.device("cpu"))
            x, _, h, w = training_inputs(b, perm, size, model.strides, cfg.data.sigma, cfg.train.channels_last)
        with torch.autocast(**autocast):
            out = forward(x)
        loss, _ = cascade_loss(out, h, w, model.strides)
        if zero is None:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            forward.backward(loss)
            forward.step()
        if average is not None:
            average.update(model)
    return step


def targets_only(cfg, batch: int):
    """The targets of a batch alone (flip relabel + heatmaps at every stride), random keypoints."""
    import torch

    from pipeline.model import build_model
    from pipeline.targets import make_targets, swap_flipped

    strides = build_model(cfg.model, 14, cfg.data.input_size).strides
    g = torch.Generator().manual_seed(0)
    kp = torch.cat([torch.rand(batch, 14, 2, generator=g) * cfg.data.input_size, torch.ones(batch, 14, 1)], 2)
    flip = torch.zeros(batch)

    def step():
        make_targets(swap_flipped(kp, flip, list(range(14))), cfg.data.input_size, strides, cfg.data.sigma)
    return step


def timed_rows(rows: dict, rounds: int, seconds: float, times: dict | None = None) -> dict:
    """Interleaved rounds: each row runs for `seconds`/`rounds` per round; per-step times collected."""
    times = times if times is not None else {k: [] for k in rows}
    for key, (step, _) in rows.items():
        t0 = time.perf_counter()
        step()  # warm-up (oneDNN picks its kernels, DALI fills its queue, torch.compile compiles)
        if time.perf_counter() - t0 > 10:
            print(f"{key}: first step {time.perf_counter() - t0:.0f} s", flush=True)
    for _ in range(rounds):
        for key, (step, _) in rows.items():
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - t0)
    return times


def real_path(config: str, ranks: int, steps: int, shards: str, *overrides: str, env_extra: dict | None = None,
              bind_cores: bool = False) -> tuple[float, dict, float]:
    """(images/s, {phase: fraction of the wall time}, rank 0's peak memory GiB) of `mshg train --ranks N`;
    `env_extra` joins its environment (an LD_PRELOAD allocator); `bind_cores` starts the ranks with DeepSpeed's
    launcher itself, `--bind_cores_to_rank` (numactl pins each rank to its share of the cores)."""
    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="train-speed-"))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env_extra or {}))
    start = [sys.executable, "-m", "pipeline.cli", "train", "--ranks", str(ranks), "--master-port", "29677"]
    if bind_cores:
        env.setdefault("DS_ACCELERATOR", "cpu")
        start = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--bind_cores_to_rank",
                 "--master_port", "29677", "--module", "pipeline.train"]
    cmd = [*start,
           "--config", str(REPO / config), "train.run_name=speed", f"train.out_dir={tmp}/runs", f"stop.max_steps={steps}",
           "stop.max_minutes=0", "stop.expected_loss=0", "train.eval_every=0", "train.checkpoint_every=0",
           "data.val_shards=", f"data.train_shards={shards}", "train.log_every=5", "train.log_model=false", *overrides]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{config}: `mshg train` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("mshg").experiment_id])[0]

    def steady(metric: str) -> float:
        values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]
        return statistics.median(values[len(values) // 3:]) if values else float("nan")

    shares = {k: steady(f"time_fraction/{k}") for k in ("data", "targets", "forward", "backward", "step", "ema", "other")}
    return steady("images_per_s"), shares, steady("peak_memory_gb")


OP_KINDS = [("conv", ("convolution", "conv2d", "mkldnn_convolution")), ("batchnorm", ("batch_norm",)),
            ("relu", ("relu", "threshold")), ("pool", ("max_pool", "pooling")), ("upsample", ("upsample",)),
            ("add", ("aten::add",)), ("loss/targets", ("exp", "mse", "sub", "pow", "mul", "mean", "where"))]


def profile_stages(cfg, batch: int, steps: int = 5) -> None:
    """Where a step of the plain loop (a) spends its time: torch.profiler's self CPU time per operator kind
    and feature-map side (the side says the scale: input/2, /4, /8 and the smaller maps inside the
    hourglasses), forward and backward together."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step = recipe_loop(cfg, batch)
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    table: dict[tuple[str, int], float] = {}
    total = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        name = event.key.lower()
        kind = next((k for k, keys in OP_KINDS if any(x in name for x in keys)), "other")
        shapes = [sh for sh in event.input_shapes if isinstance(sh, list) and len(sh) == 4]
        side = shapes[0][2] if shapes else 0
        table[(kind, side)] = table.get((kind, side), 0.0) + event.self_cpu_time_total
    sides = sorted({side for _, side in table}, reverse=True)
    kinds = [k for k, _ in OP_KINDS] + ["other"]
    print(f"\nplain loop (a), batch {batch}, {steps} steps: % of the step's CPU time by operator and feature-map side "
          f"(0: not a feature map)\n")
    print("| op | " + " | ".join(f"side {s}" for s in sides) + " | all |")
    print("|---" * (len(sides) + 2) + "|")
    for kind in kinds:
        cells = [table.get((kind, side), 0.0) / total for side in sides]
        print(f"| {kind} | " + " | ".join(f"{100 * c:.1f}" if c >= 0.0005 else "" for c in cells)
              + f" | {100 * sum(cells):.1f} |")


def recipe_main(args) -> None:
    import torch

    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.data import build_loader
    from shards.format import ShardSet
    from pipeline.model import build_model, count_flops

    world = distributed.init("cpu")  # a world of one: the ZeRO rows need a process group
    cfg = load_config(REPO / args.config, args.overrides)
    requested = cfg.train.precision
    precision, _ = distributed.resolve_precision(requested, world.device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    batch = cfg.train.micro_batch * args.ranks  # the real path's images per optimizer step
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    flops = count_flops(build_model(cfg.model, 14, cfg.data.input_size), cfg.data.input_size)
    shards = ShardSet.open(args.shards)

    def loader(c, b):
        return build_loader(shards, c.data, b, train=True)

    rows = {"(a) plain": (recipe_loop(cfg, batch), "random tensors"),
            "(b) plain+DALI": (recipe_loop(cfg, batch, loader(cfg, batch), shards), "DALI CPU loader, targets")}
    if args.levers:
        for b in sorted({8, 16, 32} - {batch}):
            rows[f"batch {b}"] = (recipe_loop(cfg, b), "plain loop, another batch")
        rows["Adam for-loop"] = (recipe_loop(cfg, batch, optimizer={"foreach": False}), "plain loop, torch's CPU default")
        rows["Adam foreach"] = (recipe_loop(cfg, batch, optimizer={"foreach": True}), "plain loop")
        rows["+ EMA"] = (recipe_loop(cfg, batch, ema=True), "plain loop + WeightAverage.update every step")
        for stage in (0, 1, 2):
            rows[f"DeepSpeed ZeRO-{stage}"] = (recipe_loop(cfg, batch, zero=stage), "one process, the engine's step")
        for threads in (1, 2):
            c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_threads=threads))
            rows[f"DALI {threads} thread(s)"] = (recipe_loop(c, batch, loader(c, batch), shards), "plain loop + DALI")
        nchw = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=False))
        rows["NCHW input"] = (recipe_loop(nchw, batch), "plain loop, train.channels_last=false")
        if args.compile:
            rows["torch.compile"] = (recipe_loop(cfg, batch, compiled=True), "plain loop, the model compiled")
        rows["targets alone"] = (targets_only(cfg, batch), "flip relabel + heatmaps at every stride")
    cores = os.cpu_count()
    print(f"{cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, {precision} "
          f"(train.precision={requested}); {args.config}: batch {batch} per step, "
          f"{flops / 1e9:.3f} GFLOPs/img forward; peak {peak:.0f} GFLOP/s ({precision} matmul on every core)", flush=True)
    if args.profile:
        return profile_stages(cfg, batch)
    times = timed_rows(rows, args.rounds, args.seconds)
    real = None
    if not args.no_real:
        real = real_path(args.config, args.ranks, args.real_steps, args.shards, *args.overrides)
        timed_rows(rows, args.rounds, args.seconds, times)  # the same rows again after (c)
    rate = {k: (batch if k in ("(a) plain", "(b) plain+DALI") or not k.startswith("batch ") else int(k.split()[1]))
            / statistics.median(v) for k, v in times.items()}
    base = rate["(a) plain"]
    print("\n| row | what | images/s | vs (a) | GFLOP/s | of peak |\n|---|---|---|---|---|---|")

    def line(name, what, r):
        achieved = 3 * flops * r / 1e9
        print(f"| {name} | {what} | {r:.1f} | {r / base:.2f}x | {achieved:.1f} | {100 * achieved / peak:.1f} % |")

    for key, (_, what) in rows.items():
        if key == "targets alone":
            print(f"| {key} | {what} | {rate[key]:.0f} | - | - | - |")
        else:
            line(key, what, rate[key])
    if real:
        images_per_s, shares, gib = real
        line("(c) mshg train", f"--ranks {args.ranks}, {cfg.train.micro_batch} per rank, DeepSpeed ZeRO-"
             f"{cfg.train.zero_stage}, EMA {cfg.train.ema_decay or 'off'}, MLflow; rank 0 {gib:.2f} GiB", images_per_s)
        print("\n(c)'s step, rank 0, share of the wall time: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items()))
        print(f"\n(c) against (a): {images_per_s / base:.2f}x (target >= 0.9x); (b) against (a): "
              f"{rate['(b) plain+DALI'] / base:.2f}x")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/lspet_cpu.yaml")
    p.add_argument("--shards", default=str(REPO / "runs" / "shards" / "lspet-train"))
    p.add_argument("--ranks", type=int, default=1, help="ranks of row (c), as the recipe's README command runs it")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the in-process rows")
    p.add_argument("--seconds", type=float, default=20, help="seconds per in-process row, before and after (c)")
    p.add_argument("--real-steps", type=int, default=150, help="optimizer steps of row (c)")
    p.add_argument("--no-real", action="store_true", help="skip row (c)")
    p.add_argument("--levers", action="store_true", help="one row per lever against (a)")
    p.add_argument("--compile", action="store_true", help="with --levers: a torch.compile row (compiles for ~5 min)")
    p.add_argument("--profile", action="store_true", help="only: where a step of (a) spends its time, by op and scale")
    p.add_argument("--stacked", action="store_true", help="issue 11's rows (stacked_hg8 / msc_hg at 256) instead")
    p.add_argument("--batch", type=int, default=4, help="with --stacked")
    p.add_argument("--steps", type=int, default=2, help="with --stacked: timed steps per row and round")
    p.add_argument("--reference", default=None, help="with --stacked: a checkout of princeton-vl/pytorch_stacked_hourglass")
    p.add_argument("--zero-stages", action="store_true",
                   help="only row (c) at ZeRO-2, 1 and 0, interleaved over --rounds, against ZeRO-2")
    p.add_argument("--real-levers", action="store_true",
                   help="only row (c) with each lever (allocators, pinned ranks; --compile) against itself plain")
    p.add_argument("--precision-check", action="store_true",
                   help="only the bf16-against-fp32 loss check of the first 50 steps (2 ranks, real shards)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe config")
    args = p.parse_args()
    if args.compile and not (args.levers or args.real_levers):
        p.error("--compile adds a row to --levers or --real-levers: give one of them")
    if args.real_levers:
        return real_levers_main(args)
    if args.precision_check:
        return precision_check({"train": args.shards})
    if args.stacked:
        return stacked_main(args)
    if args.zero_stages:
        return zero_stages_main(args)
    return recipe_main(args)


# found as the trainer finds tcmalloc (pipeline.distributed.allocator_preload); None where not installed
ALLOCATORS = {"jemalloc": ctypes.util.find_library("jemalloc"),  # Debian's libjemalloc2
              "tcmalloc": ctypes.util.find_library("tcmalloc_minimal")}  # libtcmalloc-minimal4


def real_levers_main(args) -> None:
    """Row (c), the real `mshg train --ranks N` path, with one lever each, in turns over --rounds (the machine
    drifts over minutes): glibc's allocator (baseline) against jemalloc and tcmalloc (LD_PRELOAD), each rank
    pinned to its cores (DeepSpeed's --bind_cores_to_rank), and with --compile train.compile=true (its first
    round compiles cold; the steady rate leaves the compile out)."""
    rows = {"baseline": {}, **{name: {"env_extra": {"LD_PRELOAD": lib}} for name, lib in ALLOCATORS.items() if lib},
            "pinned": {"bind_cores": True}}
    if args.compile:
        rows["compile"] = {"overrides": ["train.compile=true"]}
    rates, shares = {k: [] for k in rows}, {}
    for k in range(args.rounds):
        for name, row in rows.items():
            rate, shares[name], _ = real_path(args.config, args.ranks, args.real_steps, args.shards, *args.overrides,
                                              *row.get("overrides", []), env_extra=row.get("env_extra"),
                                              bind_cores=row.get("bind_cores", False))
            rates[name].append(rate)
            print(f"round {k + 1}, {name}: {rate:.1f} images/s", flush=True)
    base = statistics.mean(rates["baseline"])
    print(f"\n{args.config}, --ranks {args.ranks}, {args.real_steps} steps a run, {args.rounds} round(s)\n"
          "| lever | images/s (each round) | mean | vs baseline | data | forward | backward | step |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in rows:
        mean = statistics.mean(rates[name])
        print(f"| {name} | {' / '.join(f'{r:.1f}' for r in rates[name])} | {mean:.1f} | {mean / base:.2f}x | "
              + " | ".join(f"{100 * shares[name][k]:.0f} %" for k in ("data", "forward", "backward", "step")) + " |")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")


def zero_stages_main(args) -> None:
    """Row (c), the real `mshg train --ranks N` path, at each ZeRO stage in turns (the machine drifts over
    minutes): on CPU ranks over gloo the stages differ in how the gradients are reduced, not in the math."""
    stages = (2, 1, 0)
    rates, shares = {z: [] for z in stages}, {}
    for k in range(args.rounds):
        for z in stages:
            rate, shares[z], _ = real_path(args.config, args.ranks, args.real_steps, args.shards, *args.overrides,
                                           f"train.zero_stage={z}")
            rates[z].append(rate)
            print(f"round {k + 1}, ZeRO-{z}: {rate:.1f} images/s", flush=True)
    base = statistics.mean(rates[2])
    print(f"\n{args.config}, --ranks {args.ranks}, {args.real_steps} steps a run, {args.rounds} round(s)\n"
          "| ZeRO stage | images/s (each round) | mean | vs ZeRO-2 | backward | step |\n|---|---|---|---|---|---|")
    for z in stages:
        mean = statistics.mean(rates[z])
        print(f"| {z} | {' / '.join(f'{r:.1f}' for r in rates[z])} | {mean:.1f} | {mean / base:.2f}x | "
              f"{100 * shares[z]['backward']:.0f} % | {100 * shares[z]['step']:.0f} % |")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")


def stacked_main(args) -> None:
    import torch

    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.model import build_model, count_flops

    distributed.init("cpu")  # a world of one: DeepSpeed's engine needs a process group
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    stacked = load_config(REPO / "configs" / "lspet_gpu_stacked.yaml", ["train.device=cpu"])
    msc = load_config(REPO / "configs" / "lspet_gpu.yaml", ["train.device=cpu"])
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
    print(f"\ndefaults vs baseline: {result['defaults'] / base:.2f}x (target >= {TARGET}x)")
    if "reference" in result:
        print(f"baseline vs the reference implementation: {base / result['reference']:.2f}x (target >= 0.9x)")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")



if __name__ == "__main__":
    main()
