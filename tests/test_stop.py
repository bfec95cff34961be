"""The convergence stop on constructed loss sequences."""
import pytest

from pipeline.config import StopConfig
from pipeline.stop import CONVERGED, MAX_EPOCHS, MAX_STEPS, ConvergenceStop

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them


def run(losses, **kw):
    stop = ConvergenceStop(StopConfig(**kw))
    for step, loss in enumerate(losses, 1):
        reason = stop.update(loss, step, epoch=0)
        if reason:
            return step, reason
    return None, None


def test_stops_exactly_when_the_window_has_stayed_below_the_expected_value():
    losses = [1.0] * 10 + [0.5] * 20
    # no smoothing: the window of 5 is all <= 0.6 and flat from step 15 on, not at step 14
    assert run(losses, expected_loss=0.6, tolerance=0.1, window=5, smoothing=0.0, max_steps=100) == (15, CONVERGED)


def test_does_not_stop_while_the_loss_still_moves_more_than_the_tolerance():
    losses = [0.5, 0.58] * 20  # always below 0.6, but swings by 0.08 > 0.1 * 0.6
    assert run(losses, expected_loss=0.6, tolerance=0.1, window=5, smoothing=0.0, max_steps=100) == (None, None)
    assert run(losses, expected_loss=0.6, tolerance=0.2, window=5, smoothing=0.0, max_steps=100) == (5, CONVERGED)


def test_smoothing_delays_the_stop_until_the_average_has_settled():
    losses = [1.0] * 10 + [0.5] * 200
    step, reason = run(losses, expected_loss=0.6, tolerance=0.05, window=10, smoothing=0.9, max_steps=1000)
    assert reason == CONVERGED and step > 20  # the EMA needs time to fall below 0.6 and flatten


def test_hard_limits_and_disabled_rule():
    assert run([0.1] * 50, expected_loss=0.0, window=5, max_steps=30) == (30, MAX_STEPS)
    stop = ConvergenceStop(StopConfig(max_steps=100, max_epochs=2))
    assert stop.update(1.0, step=1, epoch=2) == MAX_EPOCHS


def test_state_round_trip_continues_identically():
    losses = [1.0] * 10 + [0.5] * 40
    kw = dict(expected_loss=0.6, tolerance=0.05, window=10, smoothing=0.9, max_steps=1000)
    first = ConvergenceStop(StopConfig(**kw))
    for step, loss in enumerate(losses[:20], 1):
        first.update(loss, step, 0)
    second = ConvergenceStop(StopConfig(**kw))
    second.load_state_dict(first.state_dict())
    for step, loss in enumerate(losses[20:], 21):
        assert first.update(loss, step, 0) == second.update(loss, step, 0)
        assert first.smoothed == second.smoothed


def test_max_minutes_is_a_hard_limit_like_steps():
    from pipeline.stop import MAX_MINUTES

    stop = ConvergenceStop(StopConfig(max_steps=100, max_minutes=2.0))
    assert stop.update(1.0, step=1, epoch=0, minutes=1.9) is None
    assert stop.update(1.0, step=2, epoch=0, minutes=2.0) == MAX_MINUTES


def test_proposed_stop_fires_where_validation_stops_paying():
    """A calibration run whose loss falls like 1/t and flattens, and whose PCK saturates: the proposed
    rule, replayed on the curve, fires at (or just after) the first evaluation within 2 points of the
    best, not before, and says how much later training would have gone on."""
    import math
    import random

    from pipeline.stop import propose

    rng = random.Random(0)
    steps = list(range(10, 3010, 10))
    smoothed = [0.05 + 0.5 / math.sqrt(s) + rng.uniform(-0.0005, 0.0005) for s in steps]
    evals = list(range(300, 3001, 300))
    pck = [0.7 * (1 - math.exp(-e / 600)) for e in evals]
    p = propose(steps, smoothed, evals, pck, within=0.02)
    target = next(e for e, v in zip(evals, pck) if v >= max(pck) - 0.02)
    assert p["target_step"] == target
    assert p["fires_at"] is not None and target <= p["fires_at"] <= target + p["window"]
    # the proposal, as the trainer's rule: ConvergenceStop on the same values stops there too
    stop = ConvergenceStop(StopConfig(expected_loss=p["expected_loss"], tolerance=p["tolerance"],
                                      window=p["window"] // 10, smoothing=0.0, max_steps=10**6))
    fired = next(s for s, v in zip(steps, smoothed) if stop.update(v, s, 0))
    assert abs(fired - p["fires_at"]) <= 10
