"""Baseline forecasters for the accuracy benchmark: what a user would do without lossforecast."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import OptimizeWarning, curve_fit

from lossforecast import Schedule
from lossforecast._schedule import annealing_area

Z80 = 1.2815515655446004


@dataclass(frozen=True)
class BaselineForecast:
    loss: float
    low: float
    high: float


def last_smoothed(steps: NDArray, loss: NDArray, final_step: int) -> BaselineForecast | None:
    """The current loss (mean of the last 2% of observed points) as the final loss."""
    k = max(1, len(loss) // 50)
    v = float(np.mean(loss[-k:]))
    return BaselineForecast(v, v, v)


def _post_warmup(schedule: Schedule, steps: NDArray, loss: NDArray):
    keep = steps > max(schedule.warmup_steps, 0.1 * steps[-1])
    if keep.sum() < 4:
        keep = steps >= steps[-1] // 2
    return steps[keep].astype(float), loss[keep]


def _interval(value: float, grad: NDArray, pcov: NDArray) -> BaselineForecast:
    var = float(grad @ pcov @ grad) if np.all(np.isfinite(pcov)) else np.inf
    half = Z80 * np.sqrt(max(var, 0.0))
    return BaselineForecast(value, value - half, value + half)


def power_law_in_steps(
    schedule: Schedule, steps: NDArray, loss: NDArray, final_step: int
) -> BaselineForecast | None:
    """``L = a + b * step^-c`` by least squares on the prefix, schedule ignored."""
    s, y = _post_warmup(schedule, steps, loss)
    if len(s) < 4:
        return None

    def f(t, a, b, c):
        return a + b * np.power(t, -c)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            p, pcov = curve_fit(
                f,
                s,
                y,
                p0=(0.9 * y.min(), (y[0] - 0.9 * y.min()) * s[0] ** 0.5, 0.5),
                bounds=([0, 0, 0.01], [y.min(), np.inf, 3.0]),
                maxfev=5000,
            )
    except (RuntimeError, ValueError):
        return None
    _a, b, c = p
    t = float(final_step)
    grad = np.array([1.0, t**-c, -b * np.log(t) * t**-c])
    return _interval(float(f(t, *p)), grad, pcov)


def plain_lr_annealing(
    schedule: Schedule, steps: NDArray, loss: NDArray, final_step: int, fixed_c: float
) -> BaselineForecast | None:
    """Four-parameter LR-annealing law (decay 0.999) by least squares on the prefix.

    Before any LR decay has been seen ``C`` is not identified and is fixed to ``fixed_c``.
    """
    s, y = _post_warmup(schedule, steps, loss)
    if len(s) < 4:
        return None
    si = s.astype(np.int64)
    s1 = schedule.area[si]
    s2 = annealing_area(schedule, si, 0.999)
    f1 = schedule.area[final_step]
    f2 = float(annealing_area(schedule, [final_step], 0.999)[0])
    decay_seen = s2.max() > 1e-9
    p0 = [0.9 * y.min(), (y[0] - 0.9 * y.min()) * s1[0] ** 0.5, 0.5]
    lo, hi = [0, 0, 0.01], [y.min(), np.inf, 3.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            if decay_seen:
                p, pcov = curve_fit(
                    lambda i, a, b, c, d: a + b * s1[i.astype(int)] ** -c - d * s2[i.astype(int)],
                    np.arange(len(s)),
                    y,
                    p0=[*p0, fixed_c],
                    bounds=([*lo, 0], [*hi, np.inf]),
                    maxfev=5000,
                )
            else:
                p3, pcov3 = curve_fit(
                    lambda i, a, b, c: (
                        a + b * s1[i.astype(int)] ** -c - fixed_c * s2[i.astype(int)]
                    ),
                    np.arange(len(s)),
                    y,
                    p0=p0,
                    bounds=(lo, hi),
                    maxfev=5000,
                )
                p = np.r_[p3, fixed_c]
                pcov = np.zeros((4, 4))
                pcov[:3, :3] = pcov3
    except (RuntimeError, ValueError):
        return None
    a, b, c, d = p
    value = a + b * f1**-c - d * f2
    grad = np.array([1.0, f1**-c, -b * np.log(f1) * f1**-c, -f2])
    return _interval(float(value), grad, pcov)
