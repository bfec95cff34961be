"""What DeepSpeed costs per training step, against plain torch, on the same model and per-rank batch.

    DS_ACCELERATOR=cpu .venv/bin/python bench/distributed_overhead.py [--config configs/msc_hg_cpu.yaml]
        [--rounds 5] [--steps 4] [key=value ...]

Rows: (a) plain torch, one process: forward, the summed 8-module loss, backward, gradient clipping,
the config's optimizer step; (b) the same through a DeepSpeed engine (ZeRO-1/2/3, one process, the
trainer's own DeepSpeed config); (c) DeepSpeed ZeRO-2 with 2 ranks on this machine (the `deepspeed`
launcher, gloo on a CPU). Inputs are fixed random images and keypoints made once, so the data pipeline
is not measured (bench/loader_speed.py does that). Everything runs in fp32 (DeepSpeed's bf16 casts the
model, plain torch would need autocast: not the same work).

(a) and (b) are built once and then timed in interleaved rounds (a, ZeRO-1, ZeRO-2, ZeRO-3, a, ...),
`--steps` steps each per round, so that a machine getting slower or faster during the run moves every
row alike; the medians over all rounds are compared. Single processes use every core; each of the 2
ranks gets its share. Target (issue 5): ZeRO-2 single process <= 1.10x plain torch.

DeepSpeed's ZeRO-1/2 cost is mostly per parameter tensor (a Python gradient hook each, ~40 us here),
so the ratio depends on the model: run it with `--config configs/lspet_gpu.yaml data.input_size=128
--batch 4` for the full-width network as well (docs/cluster.md has both).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_config(args):
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))


def make_inputs(cfg, model, batch: int, seed: int = 0):
    import torch

    from pipeline.targets import make_targets

    g = torch.Generator().manual_seed(seed)
    size = cfg.data.input_size
    images = torch.rand(batch, 3, size, size, generator=g)
    joints = 14
    xy = torch.rand(batch, joints, 2, generator=g) * size
    keypoints = torch.cat([xy, torch.ones(batch, joints, 1)], dim=2)
    heatmaps, weights = make_targets(keypoints, size, model.strides, cfg.data.sigma)
    return images, heatmaps, weights


def plain_torch(cfg, batch: int):
    """-> one training step of plain torch, as a function."""
    import torch

    from pipeline.model import build_model
    from pipeline.targets import cascade_loss
    from pipeline.train import make_optimizer

    torch.manual_seed(0)
    model = build_model(cfg.model, 14, cfg.data.input_size)
    images, heatmaps, weights = make_inputs(cfg, model, batch)
    opt = make_optimizer(cfg, model.parameters())

    def step():
        loss, _ = cascade_loss(model(images), heatmaps, weights, model.strides)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def deepspeed_engine(cfg, stage: int, batch: int, world_size: int = 1):
    """-> one training step through a DeepSpeed engine with the trainer's DeepSpeed config."""
    import deepspeed
    import torch

    from pipeline.model import build_model
    from pipeline.targets import cascade_loss
    from pipeline.train import deepspeed_config, make_optimizer

    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage, micro_batch=batch,
                                                             grad_accum=1, global_batch=0, deepspeed=""))
    model = build_model(cfg.model, 14, cfg.data.input_size)
    images, heatmaps, weights = make_inputs(cfg, model, batch)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(cfg, model.parameters()),
                                      config=deepspeed_config(cfg, world_size))

    def step():
        loss, _ = cascade_loss(engine(images), heatmaps, weights, model.strides)
        engine.backward(loss)
        engine.step()

    return step


def time_interleaved(steps: dict, rounds: int, per_round: int, warmup: int) -> dict:
    """{name: step function} -> {name: [seconds per step]}, the rows taking turns round by round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times


def worker(args) -> None:
    """One rank of the 2-rank measurement (started by the deepspeed launcher)."""
    from pipeline import distributed

    world = distributed.init()
    step = deepspeed_engine(bench_config(args), 2, args.batch, world.size)
    times = time_interleaved({"zero2": step}, args.rounds, args.steps, args.warmup)["zero2"]
    if world.is_main:
        Path(args.worker_out).write_text(json.dumps(times))


def two_ranks(args) -> list[float]:
    out = Path(tempfile.mkdtemp()) / "times.json"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", "29655", str(Path(__file__).resolve()),
           "--config", args.config, "--batch", str(args.batch), "--rounds", str(args.rounds),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--worker-out", str(out), *args.overrides]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "msc_hg_cpu.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. data.input_size=128)")
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (default: the config's micro_batch)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-two-ranks", action="store_true")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    from pipeline import distributed

    cfg = bench_config(args)
    args.batch = args.batch or cfg.train.micro_batch
    if args.worker_out:
        return worker(args)

    world = distributed.init()  # a world of one: DeepSpeed needs a process group
    import torch

    from pipeline.model import build_model, count_parameters

    model = build_model(cfg.model, 14, cfg.data.input_size)
    print(f"{Path(args.config).name} {' '.join(args.overrides)}: input {cfg.data.input_size}, channels "
          f"{cfg.model.channels}, {count_parameters(model) / 1e6:.2f} M parameters in "
          f"{len(list(model.parameters()))} tensors, {cfg.train.optimizer}, fp32, per-rank batch {args.batch}; "
          f"{args.rounds} rounds x {args.steps} timed steps per row after {args.warmup} warm-up; "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads per single process, device "
          f"{world.device}", flush=True)
    steps = {"(a) plain torch": plain_torch(cfg, args.batch)}
    for stage in (1, 2, 3):
        steps[f"(b) DeepSpeed ZeRO-{stage}, 1 process"] = deepspeed_engine(cfg, stage, args.batch)
    rows = [(name, times, 1) for name, times in time_interleaved(steps, args.rounds, args.steps, args.warmup).items()]
    if not args.no_two_ranks:
        rows.append(("(c) DeepSpeed ZeRO-2, 2 ranks", two_ranks(args), 2))

    base = statistics.median(rows[0][1])
    print(f"\n{'':36s} {'median s/step':>13s} {'vs (a)':>7s} {'images/s':>9s}")
    for name, times, ranks in rows:
        med = statistics.median(times)
        print(f"{name:36s} {med:13.3f} {med / base:6.2f}x {ranks * args.batch / med:9.1f}")
    zero2 = statistics.median(rows[2][1])
    print(f"\nZeRO-2 single process: {zero2 / base:.2f}x plain torch (target <= 1.10x)")
    if not args.no_two_ranks:
        two = statistics.median(rows[-1][1])
        print(f"2 ranks vs 1 process (ZeRO-2): {2 * args.batch / two / (args.batch / zero2):.2f}x the images/s "
              f"on {os.cpu_count()} cores")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")


if __name__ == "__main__":
    main()
