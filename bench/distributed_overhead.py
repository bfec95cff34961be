"""What DeepSpeed costs per training step, against plain torch, on the same model and per-rank batch.

    .venv/bin/python bench/distributed_overhead.py [--config configs/msc_hg_cpu.yaml] [--steps 20]

Rows: (a) plain torch, one process: forward, the summed 8-module loss, backward, gradient clipping,
Adam step; (b) the same through a DeepSpeed engine (ZeRO-1/2/3, one process, the trainer's own
DeepSpeed config); (c) DeepSpeed ZeRO-2 with 2 ranks on this machine (the `deepspeed` launcher, gloo
on a CPU). Inputs are fixed random images and keypoints made once, so the data pipeline is not
measured (bench/loader_speed.py does that). Single processes use every core; each of the 2 ranks gets
its share. (a) runs first and again last: its two medians show how steady the machine was, and their
mean is the baseline of the ratios. Target: ZeRO-2 single process <= 1.10x plain torch.
"""
from __future__ import annotations

import argparse
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


def time_steps(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def plain_torch(cfg, batch: int, steps: int, warmup: int) -> list[float]:
    import torch

    from pipeline.model import build_model
    from pipeline.targets import cascade_loss

    torch.manual_seed(0)
    model = build_model(cfg.model, 14, cfg.data.input_size)
    images, heatmaps, weights = make_inputs(cfg, model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)

    def step():
        loss, _ = cascade_loss(model(images), heatmaps, weights, model.strides)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, steps, warmup)


def deepspeed_engine(cfg, stage: int, batch: int, steps: int, warmup: int, world_size: int = 1) -> list[float]:
    import dataclasses

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

    return time_steps(step, steps, warmup)


def worker(args) -> None:
    """One rank of the 2-rank measurement (started by the deepspeed launcher)."""
    from pipeline import distributed
    from pipeline.config import load_config

    world = distributed.init()
    times = deepspeed_engine(load_config(args.config), 2, args.batch, args.steps, args.warmup, world.size)
    if world.is_main:
        Path(args.worker_out).write_text(json.dumps(times))


def two_ranks(args) -> list[float]:
    out = Path(tempfile.mkdtemp()) / "times.json"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", "29655", str(Path(__file__).resolve()),
           "--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--worker-out", str(out)]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "msc_hg_cpu.yaml"))
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (default: the config's micro_batch)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-two-ranks", action="store_true")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    from pipeline import distributed
    from pipeline.config import load_config

    cfg = load_config(args.config)
    args.batch = args.batch or cfg.train.micro_batch
    if args.worker_out:
        return worker(args)

    world = distributed.init()  # a world of one: DeepSpeed needs a process group
    import torch

    print(f"{Path(args.config).name}: input {cfg.data.input_size}, channels {cfg.model.channels}, per-rank batch "
          f"{args.batch}, {args.steps} timed steps after {args.warmup}; {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads per single process, device {world.device}", flush=True)
    rows = [("(a) plain torch", plain_torch(cfg, args.batch, args.steps, args.warmup), 1)]
    for stage in (1, 2, 3):
        rows.append((f"(b) DeepSpeed ZeRO-{stage}, 1 process",
                     deepspeed_engine(cfg, stage, args.batch, args.steps, args.warmup), 1))
    rows.append(("(a) plain torch, again", plain_torch(cfg, args.batch, args.steps, args.warmup), 1))
    if not args.no_two_ranks:
        rows.append(("(c) DeepSpeed ZeRO-2, 2 ranks", two_ranks(args), 2))

    base = statistics.mean([statistics.median(rows[0][1]), statistics.median(rows[4][1])])
    print(f"\n{'':36s} {'median s/step':>13s} {'vs (a)':>7s} {'images/s':>9s}")
    for name, times, ranks in rows:
        med = statistics.median(times)
        print(f"{name:36s} {med:13.3f} {med / base:6.2f}x {ranks * args.batch / med:9.1f}")
    if not args.no_two_ranks:
        two = statistics.median(rows[-1][1])
        one = statistics.median(rows[2][1])
        print(f"\n2 ranks vs 1 process (ZeRO-2): {2 * args.batch / two / (args.batch / one):.2f}x the images/s "
              f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
