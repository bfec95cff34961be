"""When training stops: the convergence stop from the patent (the loss has reached an expected value
and stabilised), hard limits on steps, epochs and wall time, and a preemption signal. Every stop
reason lives here.

The convergence rule, checked after every optimizer step on rank 0 (the trainer broadcasts the decision):
  smoothed = EMA of the total loss (bias-corrected, so early values are not dragged towards 0);
  converged when, over the last `window` steps, every smoothed value is <= expected_loss and
  (max - min) <= tolerance * expected_loss.
"""
from __future__ import annotations

from collections import deque

from pipeline.config import StopConfig

CONVERGED = "converged"
MAX_STEPS = "max_steps"
MAX_EPOCHS = "max_epochs"
MAX_MINUTES = "max_minutes"
SIGNAL = "signal"
# the order decides when several apply at once (ranks agree by an all-reduce MAX over these codes)
REASONS = (None, CONVERGED, MAX_STEPS, MAX_EPOCHS, MAX_MINUTES, SIGNAL)


def reason_code(reason: str | None) -> int:
    return REASONS.index(reason)


def reason_from_code(code: int) -> str | None:
    return REASONS[code]


class ConvergenceStop:
    def __init__(self, cfg: StopConfig):
        self.cfg = cfg
        self.ema = 0.0
        self.updates = 0
        self.recent: deque[float] = deque(maxlen=cfg.window)

    @property
    def smoothed(self) -> float:
        return self.ema / (1 - self.cfg.smoothing ** self.updates) if self.updates else float("nan")

    def update(self, loss: float, step: int, epoch: int, minutes: float = 0.0) -> str | None:
        """Feed the loss of optimizer step `step` (1-based), the epochs completed and the minutes of
        training spent; returns a stop reason or None."""
        a = self.cfg.smoothing
        self.ema = a * self.ema + (1 - a) * loss
        self.updates += 1
        self.recent.append(self.smoothed)
        if self.converged():
            return CONVERGED
        return self.limit_reached(step, epoch, minutes)

    def limit_reached(self, step: int, epoch: int, minutes: float) -> str | None:
        """A hard limit (steps, epochs, minutes) reached, or None. Also asked before the first step of
        a resumed run, which may have reached its limit already."""
        if step >= self.cfg.max_steps:
            return MAX_STEPS
        if self.cfg.max_epochs and epoch >= self.cfg.max_epochs:
            return MAX_EPOCHS
        if self.cfg.max_minutes and minutes >= self.cfg.max_minutes:
            return MAX_MINUTES
        return None

    def converged(self) -> bool:
        target = self.cfg.expected_loss
        if target <= 0 or len(self.recent) < self.cfg.window:
            return False
        return max(self.recent) <= target and max(self.recent) - min(self.recent) <= self.cfg.tolerance * target

    def state_dict(self) -> dict:
        return {"ema": self.ema, "updates": self.updates, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.updates = state["ema"], state["updates"]
        self.recent = deque(state["recent"], maxlen=self.cfg.window)
