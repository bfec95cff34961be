"""Learning-rate schedules: DeepSpeed's own when the budget is in steps, a torch LambdaLR where
DeepSpeed has none (step decay; linear or cosine over a wall-time budget).

    constant  WarmupLR (only with train.warmup_steps > 1)
    linear    WarmupDecayLR to 0 at stop.max_steps
    cosine    WarmupCosineLR to cos_min_ratio * lr at stop.max_steps
    step      warm-up, then lr * lr_step_gamma every lr_step_every optimizer steps (LambdaLR)

With `stop.max_minutes`, linear and cosine run over the budget: progress is the larger of
step / stop.max_steps and minutes / stop.max_minutes, so the rate reaches its end value when the
run ends, whichever limit ends it. The minutes come from `Trainer.minutes`, the value all ranks
agreed on at the last step, so every rank computes the same rate; such a schedule depends on
the machine's speed, so a resumed run is not bit-identical to an uninterrupted one (docs/cluster.md).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from pipeline.config import Config


def over_time_budget(cfg: Config) -> bool:
    return cfg.stop.max_minutes > 0 and cfg.train.lr_schedule in ("linear", "cosine")


def deepspeed_scheduler(cfg: Config) -> dict | None:
    """The `scheduler` entry of DeepSpeed's config, or None when `make_scheduler` provides one."""
    t = cfg.train
    if over_time_budget(cfg):
        return None
    if t.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.stop.max_steps, "warmup_num_steps": max(t.warmup_steps, 1),
            "warmup_min_ratio": 0.0, "cos_min_ratio": t.cos_min_ratio}}
    if t.lr_schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": cfg.stop.max_steps, "warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
            "warmup_num_steps": max(t.warmup_steps, 1), "warmup_type": "linear"}}
    if t.lr_schedule == "constant" and t.warmup_steps > 1:
        return {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": t.warmup_steps,
            "warmup_type": "linear"}}
    return None


def make_scheduler(cfg: Config, optimizer, minutes: Callable[[], float] = lambda: 0.0):
    """A LambdaLR for what DeepSpeed's schedulers cannot do, or None. `minutes()`: the training minutes
    spent so far (the same value on every rank)."""
    t, s = cfg.train, cfg.stop
    if t.lr_schedule == "step":
        def factor(step: int) -> float:
            if step < t.warmup_steps:
                return (step + 1) / t.warmup_steps
            return t.lr_step_gamma ** ((step - t.warmup_steps) // t.lr_step_every)
    elif over_time_budget(cfg):
        def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict leaves it out
            warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
            progress = min(1.0, max(step / s.max_steps, minutes() / s.max_minutes))
            if t.lr_schedule == "linear":
                return warm * (1.0 - progress)
            return warm * (t.cos_min_ratio + (1 - t.cos_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    else:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
