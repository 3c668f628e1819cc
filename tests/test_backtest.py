"""Backtests: prefixes replayed into fresh forecasters, scored against the truth."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from lossforecast import BacktestPoint, Forecast, Schedule, backtest
from lossforecast._backtest import backtest_run, prefix_length

T = 4000
WARM = 200


def _run(every: int = 20):
    t = np.arange(T - WARM) / (T - WARM)
    lr = 1e-3 * np.r_[np.linspace(0.01, 1.0, WARM), 0.1 + 0.45 * (1 + np.cos(np.pi * t))]
    steps = np.arange(0, T, every)
    rng = np.random.default_rng(0)
    loss = 2.5 + 4.0 * (steps + 50.0) ** -0.35 + rng.normal(0, 0.002, steps.size)
    return steps, loss, lr


def test_backtest_structure_and_defaults():
    steps, loss, lr = _run()
    points = backtest(steps, loss, lr)
    assert [p.cutoff for p in points] == [0.1, 0.25, 0.5, 0.75, 0.9]
    for p in points:
        assert isinstance(p, BacktestPoint)
        assert p.truth == loss[-1]  # default truth: the loss at the last logged step
        assert p.observed_step == steps[steps <= p.cutoff * T][-1]
        assert isinstance(p.forecast, Forecast)
        assert p.forecast.step == steps[-1]  # default final step: the last logged one
        assert p.forecast.observed_step <= p.observed_step
        assert p.rel_error == pytest.approx((p.forecast.loss - p.truth) / p.truth)
        assert p.covered == (p.forecast.low <= p.truth <= p.forecast.high)
        assert p.trajectory is None
        assert math.isfinite(p.rel_error) and abs(p.rel_error) < 0.2  # loose sanity only
    assert abs(points[-1].rel_error) < 0.05


def test_backtest_run_forecasts_a_finished_runs_final_loss():
    steps, loss, lr = _run()
    # a finished run whose true final loss lies below its last logged point
    run = SimpleNamespace(
        steps=steps[:-5], loss=loss[:-5], lr_schedule=lr, final_step=T - 1, final_loss=2.6
    )
    for schedule in (None, Schedule(lr)):
        points = backtest_run(run, schedule, cutoffs=(0.5,), law="lr-annealing")
        expected = backtest(
            run.steps, run.loss, lr, cutoffs=(0.5,), final_step=T - 1, truth=2.6, law="lr-annealing"
        )
        assert points[0].truth == 2.6 and points[0].forecast.step == T - 1
        assert points[0].forecast.law == "lr-annealing"
        assert points[0].forecast.loss == pytest.approx(expected[0].forecast.loss)


def test_backtest_options_reach_the_forecaster():
    steps, loss, lr = _run()
    points = backtest(
        steps,
        loss,
        Schedule(lr),
        cutoffs=(0.7, 0.5),
        final_step=3000,
        truth=2.9,
        law="lr-annealing",
        coverage=0.5,
    )
    assert [p.cutoff for p in points] == [0.7, 0.5]  # order kept
    for p in points:
        assert p.truth == 2.9
        assert p.forecast.step == 3000
        assert p.forecast.law == "lr-annealing"
        assert p.forecast.coverage == 0.5


def test_backtest_without_data_before_a_cutoff():
    steps, loss, lr = _run()
    late = steps >= 0.3 * T
    points = backtest(steps[late], loss[late], lr, cutoffs=(0.1, 0.9))
    empty, later = points
    assert empty.observed_step is None and empty.forecast is None
    assert empty.rel_error is None and empty.covered is None and not empty.after_final
    assert later.observed_step == steps[steps <= 0.9 * T][-1] and later.forecast is not None


def test_backtest_makes_no_forecast_from_a_cutoff_past_the_final_step():
    # A run that stopped at 60% of its planned steps: from 75% on there is nothing left to
    # forecast, and a forecast fed the final point would be scored against its own input.
    steps, loss, lr = _run()
    stopped = steps <= 0.6 * T
    points = backtest(steps[stopped], loss[stopped], lr, cutoffs=(0.5, 0.75, 1.0))
    before, *after = points
    assert before.forecast is not None and not before.after_final
    assert before.forecast.step == steps[stopped][-1]
    for p in after:
        assert p.after_final
        assert p.observed_step is None and p.forecast is None
        assert p.rel_error is None and p.covered is None
    # cutoff 1.0 reaches every step of the schedule, the one forecast included
    assert backtest(steps, loss, lr, cutoffs=(1.0,))[0].after_final
    # a step forecast beyond the last logged point: every point is fed
    ahead = backtest(
        steps[stopped], loss[stopped], lr, cutoffs=(0.75,), final_step=T - 1, truth=2.6
    )[0]
    assert not ahead.after_final and ahead.observed_step == steps[stopped][-1]
    assert ahead.forecast.step == T - 1


def test_prefix_length():
    steps = np.array([0, 100, 200, 300, 400])
    assert prefix_length(steps, 0.25, 1000, 400) == 3  # steps 0, 100, 200
    assert prefix_length(steps, 0.4, 1000, 400) == 0  # reaches the step forecast
    assert prefix_length(steps, 0.4, 1000, 999) == 5
    assert prefix_length(steps, 0.001, 1000, 400) == 1


def test_backtest_trajectory():
    steps, loss, lr = _run()
    points = backtest(steps, loss, lr, cutoffs=(0.5,), trajectory_steps=np.arange(0, T, 100))
    traj = points[0].trajectory
    assert traj is not None
    assert traj.steps.min() >= points[0].observed_step
    assert traj.loss.shape == traj.low.shape == traj.high.shape == traj.steps.shape
    assert np.all(traj.low <= traj.loss) and np.all(traj.loss <= traj.high)


def test_backtest_skips_nonfinite_losses():
    steps, loss, lr = _run()
    loss = loss.copy()
    loss[[10, 40, 70]] = [np.nan, np.inf, np.nan]
    points = backtest(steps, loss, lr, cutoffs=(0.5,))
    assert points[0].forecast is not None and math.isfinite(points[0].forecast.loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cutoffs": (0.0,)}, r"`cutoffs` must be shares of the run in \(0, 1\], got 0.0"),
        ({"cutoffs": (1.5,)}, r"`cutoffs` must be shares of the run in \(0, 1\], got 1.5"),
        ({"cutoffs": ()}, "`cutoffs` is empty"),
        ({"final_step": T}, r"`final_step` must be in 0..3999"),
        ({"truth": float("nan")}, "`truth` must be finite"),
        ({"law": "nope"}, "`law` must be one of"),
    ],
)
def test_backtest_bad_options(kwargs, match):
    steps, loss, lr = _run()
    with pytest.raises(ValueError, match=match):
        backtest(steps, loss, lr, **kwargs)


def test_backtest_bad_data():
    steps, loss, lr = _run()
    with pytest.raises(ValueError, match="same length"):
        backtest(steps, loss[:-1], lr)
    with pytest.raises(ValueError, match="empty"):
        backtest([], [], lr)
    with pytest.raises(ValueError, match="outside the planned schedule"):
        backtest(np.r_[steps, T], np.r_[loss, 2.0], lr)
    with pytest.raises(ValueError, match="steps must increase"):
        backtest(steps[::-1], loss, lr)
