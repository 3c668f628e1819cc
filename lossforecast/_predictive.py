"""Predictive distributions from a forecaster's latest fit, read off its calibrated interval.

The forecaster's interval at coverage ``c`` is calibrated on backtests (its tails are heavier
than a Gaussian's). Reading it at a grid of coverages gives the probability that the loss
ends above any threshold without assuming a shape; every query uses the latest fit only, so
nothing is fitted on the caller's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from ._forecaster import Forecast, Forecaster
    from ._schedule import Schedule

__all__ = ["Predictive", "predictive", "latest_final", "latest_what_if"]

#: Coverages at which the interval is read to turn a threshold into a probability. One-sided
#: probabilities of 0.9, 0.95 and 0.99 (stop thresholds) fall on the grid: 0.8, 0.9, 0.98.
COVERAGES = (0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.998)


@dataclass(frozen=True)
class Predictive:
    """The forecast at one step read at several coverages: a predictive distribution."""

    forecast: Forecast  # at the forecaster's own coverage
    coverages: NDArray[np.float64]
    below: NDArray[np.float64]  # loss - low at each coverage
    above: NDArray[np.float64]  # high - loss at each coverage

    @property
    def loss(self) -> float:
        return self.forecast.loss

    def prob_above(self, x: float) -> float:
        """P(loss > x): a central interval of coverage c leaves (1 - c) / 2 in each tail."""
        if x >= self.loss:
            return 0.5 * (1.0 - _coverage_at(x - self.loss, self.above, self.coverages))
        return 0.5 * (1.0 + _coverage_at(self.loss - x, self.below, self.coverages))


def _coverage_at(distance: float, half: NDArray[np.float64], cov: NDArray[np.float64]) -> float:
    """Coverage of the interval whose half-width is ``distance`` (interpolated, clamped)."""
    half = np.maximum.accumulate(np.maximum(half, 0.0))
    if half[-1] <= 0.0:
        return 0.0 if distance <= 0.0 else 1.0
    return float(np.interp(distance, np.r_[0.0, half], np.r_[0.0, cov]))


def predictive(query: Callable[[float], Forecast | None], own: float) -> Predictive | None:
    """Query a forecast at every coverage; None if unavailable or a new fit landed meanwhile."""
    for _ in range(2):  # a background fit may land between the queries: try once more
        grid = [query(c) for c in COVERAGES]
        nominal = grid[COVERAGES.index(own)] if own in COVERAGES else query(own)
        if nominal is None or any(f is None for f in grid):
            return None
        if len({(f.observed_step, f.n_points, f.loss) for f in (nominal, *grid)}) == 1:
            return Predictive(
                nominal,
                np.asarray(COVERAGES),
                np.array([f.loss - f.low for f in grid]),
                np.array([f.high - f.loss for f in grid]),
            )
    return None


def latest_what_if(
    forecaster: Forecaster, schedule: Schedule
) -> Callable[[float], Forecast | None]:
    """``coverage -> Forecast`` for a what-if schedule from the latest fit, never refitting."""
    step = schedule.total_steps - 1
    return lambda c: forecaster.what_if(schedule, step, coverage=c, refit=False)


def latest_final(forecaster: Forecaster) -> Predictive | None:
    """The forecast of the final loss (target step) from the latest fit, or None."""
    return predictive(lambda c: forecaster.forecast(coverage=c, refit=False), forecaster.coverage)
