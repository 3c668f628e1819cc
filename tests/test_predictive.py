"""Probabilities read off a forecast's calibrated interval; what-if forecasts with no refit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import norm

from lossforecast import Forecast, Forecaster, Schedule
from lossforecast._cooldown import cooldown_schedule
from lossforecast._predictive import latest_final, latest_what_if, predictive


def _gaussian(loss: float, sd: float, *, fit: int = 1):
    """A query whose interval at coverage ``c`` is a Gaussian's, as a forecaster's would be."""

    def query(coverage: float) -> Forecast:
        half = norm.ppf(0.5 + coverage / 2) * sd
        return Forecast(999, loss, loss - half, loss + half, coverage, "multi-power", fit, 0.0, 500)

    return query


@pytest.mark.parametrize("x", [2.8, 2.9, 2.95, 3.0, 3.02, 3.1, 3.2, 3.3])
def test_prob_above_recovers_the_distribution_behind_the_interval(x):
    dist = predictive(_gaussian(3.0, 0.05), 0.8)
    assert dist is not None and dist.loss == 3.0 and dist.forecast.coverage == 0.8
    # exact at the grid's coverages, linear in between, clamped beyond 99.8%
    expected = float(np.clip(norm.sf(x, 3.0, 0.05), 0.001, 0.999))
    assert dist.prob_above(x) == pytest.approx(expected, abs=0.015)


def test_prob_above_is_monotone_and_a_point_mass_without_width():
    dist = predictive(_gaussian(3.0, 0.05), 0.8)
    probs = [dist.prob_above(x) for x in np.linspace(2.7, 3.3, 61)]
    assert all(a >= b for a, b in itertools.pairwise(probs))
    point = predictive(_gaussian(3.0, 0.0), 0.8)
    assert (point.prob_above(2.99), point.prob_above(3.0), point.prob_above(3.01)) == (1, 0.5, 0)


def test_a_fit_landing_between_the_queries_is_read_again():
    calls = itertools.count()
    first = _gaussian(3.0, 0.05, fit=1)
    second = _gaussian(2.9, 0.05, fit=2)

    def racing(coverage):  # the fit changes after the 5th query of the first round
        return first(coverage) if next(calls) < 5 else second(coverage)

    dist = predictive(racing, 0.8)
    assert dist is not None and dist.loss == 2.9

    flipping = itertools.count()

    def unstable(coverage):  # a new fit for every query
        return _gaussian(3.0, 0.05, fit=next(flipping))(coverage)

    assert predictive(unstable, 0.8) is None
    assert predictive(lambda c: None, 0.8) is None


def test_latest_forecasts_read_the_last_fit_and_never_refit():
    lr = np.r_[np.linspace(1e-5, 1e-3, 100), np.full(1900, 1e-3)]
    fc = Forecaster(lr)
    for s in range(110, 1000, 10):
        fc.update(s, 3.0 + 2.0 * (s / 2000) ** -0.5)
    assert latest_final(fc) is None  # nothing fitted yet, and nothing fitted now
    assert fc.refit()
    fc.update(1000, 4.2)  # new data: a refit would change the forecast
    fitted = fc.forecast(refit=False)
    final = latest_final(fc)
    assert final.loss == fitted.loss and final.forecast.observed_step == fitted.observed_step
    what = cooldown_schedule(lr, 1001, 200)
    cooled = predictive(latest_what_if(fc, Schedule(what, peak_lr=1e-3)), 0.8)
    assert cooled.forecast.step == 1200 and cooled.forecast.observed_step == fitted.observed_step
    assert fc.forecast(refit=False).loss == fitted.loss  # still the same fit
