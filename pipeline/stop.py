"""When training stops: the convergence stop from the patent (the loss has reached an expected value
and stabilised), hard limits on steps, epochs and wall time, and a preemption signal. Every stop
reason lives here.

The convergence rule, checked after every optimizer step on rank 0 (the trainer broadcasts the decision):
  smoothed = EMA of the total loss (bias-corrected, so early values are not dragged towards 0);
  converged when, over the last `window` steps, every smoothed value is <= expected_loss and
  (max - min) <= tolerance * expected_loss.
"""
from __future__ import annotations

import signal
import time
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


class StopSignals:
    """Preemption: SIGTERM, SIGUSR1 (SLURM's warning) and Ctrl-C ask the run to checkpoint and stop at the
    end of the current step; every rank acts on it together (the trainer's decide_stop). A second signal,
    also one during the checkpoint, changes nothing, except a second Ctrl-C: stop at once."""
    HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, log=print):
        self.received, self.time, self.log = 0, 0.0, log
        for sig in self.HANDLED:
            signal.signal(sig, self.request_stop)

    def request_stop(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once, without a checkpoint")
        if not self.received:
            self.received, self.time = signum, time.monotonic()
            if signum == signal.SIGINT:
                self.log("Ctrl-C: checkpointing at the end of this step, then stopping (Ctrl-C again: at once)")

    def seconds_since(self) -> float:
        return time.monotonic() - self.time

    @classmethod
    def ignore(cls) -> None:
        """Python puts the default handlers back while it shuts down, so a late SIGTERM (a launcher or srun
        passing on another signal) would turn exit 75 into "killed": once the work is saved, ignore them."""
        for sig in cls.HANDLED:
            signal.signal(sig, signal.SIG_IGN)


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


def propose(steps: list[int], smoothed: list[float], eval_steps: list[int], metric: list[float],
            within: float = 0.02, window: int = 0) -> dict:
    """A convergence stop for a new dataset or model, from a calibration run: its smoothed-loss curve
    (`steps`, `smoothed`, as logged) and its validation curve (`eval_steps`, `metric`, higher is better).

    The stop should fire where validation has stopped paying for more training: the first evaluation
    within `within` (absolute, e.g. 0.02 = 2 points) of the best. `window` (steps; default: a tenth of
    that step, at least 3 logged points) is how long the smoothed loss must have stayed; the expected
    loss is the highest smoothed value in the window ending there, and the tolerance the window's
    relative range. The rule is then replayed on the logged curve to say where it fires."""
    if not eval_steps or len(steps) < 3:
        raise ValueError("the calibration run needs a logged loss curve and at least one evaluation")
    best = max(metric)
    target = next(s for s, m in zip(eval_steps, metric) if m >= best - within)
    spacing = max(1, (steps[-1] - steps[0]) // max(len(steps) - 1, 1))
    window = window or max(target // 10, 3 * spacing)
    inside = [v for s, v in zip(steps, smoothed) if target - window < s <= target]
    tolerance = max((max(inside) - min(inside)) / max(inside), 0.01) + 0.005

    def replay(expected: float) -> int | None:
        """The first logged step at which the rule fires with this expected loss."""
        for k, s in enumerate(steps):
            recent = [v for t, v in zip(steps[:k + 1], smoothed[:k + 1]) if s - window < t <= s]
            if s >= window and max(recent) <= expected and max(recent) - min(recent) <= tolerance * expected:
                return s
        return None

    # the expected loss whose first firing lands closest to the target, not before it: a noisy curve
    # dips below the window's maximum early, so the maximum alone would stop too soon
    def badness(candidate: tuple[float, int | None]) -> tuple[int, int]:
        fires = candidate[1]
        if fires is None:
            return 2, 0
        return (1, target - fires) if fires < target else (0, fires - target)

    expected, fires = min(((e, replay(e)) for e in sorted(set(inside), reverse=True)), key=badness)
    at_stop = max((m for e, m in zip(eval_steps, metric) if fires is not None and e <= fires), default=None)
    return {"expected_loss": expected, "tolerance": round(tolerance, 3), "window": window,
            "target_step": target, "fires_at": fires, "best": best, "metric_at_stop": at_stop,
            "last_step": steps[-1]}
