"""The convergence stop on constructed loss sequences."""
from pipeline.config import StopConfig
from pipeline.stop import CONVERGED, MAX_EPOCHS, MAX_STEPS, ConvergenceStop


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
