"""The weight average's update on the recipe's model: pipeline.ema.WeightAverage against torch's
AveragedModel (what it replaced), milliseconds per update, measured in turns in the same process.

    python bench/ema_speed.py [--config configs/lspet_cpu.yaml] [--updates 200] [--rounds 5] [--threads 1]

One thread by default: each training rank runs its update on one core (train.cpu_threads).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import load_config  # noqa: E402
from pipeline.ema import WeightAverage  # noqa: E402
from pipeline.model import build_model  # noqa: E402


def warmed_up_ema(decay: float):
    """The multi_avg_fn the trainer gave AveragedModel before (same arithmetic as WeightAverage)."""
    @torch.no_grad()
    def average(averaged, current, num_averaged):
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = int(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + n) / (10 + n)))
    return average


def ms_per_update(update, model, updates: int) -> float:
    t0 = time.perf_counter()
    for _ in range(updates):
        update(model)
    return (time.perf_counter() - t0) / updates * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/lspet_cpu.yaml")
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    model = build_model(cfg.model, 16, cfg.data.input_size)
    decay = cfg.train.ema_decay or 0.998
    rows = {"AveragedModel.update_parameters": AveragedModel(model, multi_avg_fn=warmed_up_ema(decay),
                                                             use_buffers=True).update_parameters,
            "WeightAverage.update": WeightAverage(model, decay).update}
    times = {name: [] for name in rows}
    for _ in range(args.rounds):  # turns, so that the machine's drift moves both rows alike
        for name, update in rows.items():
            times[name].append(ms_per_update(update, model, args.updates))
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    params = sum(t.numel() for t in model.parameters())
    print(f"{args.config}: {params:,} weights in {tensors} tensors (with buffers), {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.updates} updates")
    base = statistics.median(times["AveragedModel.update_parameters"])
    for name, ms in times.items():
        mid = statistics.median(ms)
        print(f"  {name:34s} {mid:7.2f} ms per update (rounds {min(ms):.2f}-{max(ms):.2f})  {base / mid:5.1f}x")


if __name__ == "__main__":
    main()
