"""Backtests: replay a prefix of a logged run into a fresh forecaster and score the forecast."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._forecaster import Forecast, Forecaster
from ._schedule import Schedule

__all__ = [
    "BacktestPoint",
    "Trajectory",
    "backtest",
    "backtest_run",
    "prefix_length",
    "DEFAULT_CUTOFFS",
]

#: Shares of the planned steps at which a backtest cuts the run.
DEFAULT_CUTOFFS = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Predicted loss with its interval at several steps.

    Attributes
    ----------
    steps : ndarray of int
    loss, low, high : ndarray
        Point forecast and interval bounds at ``steps``.
    """

    steps: NDArray[np.int64]
    loss: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]


@dataclass(frozen=True)
class BacktestPoint:
    """The forecast of the final loss made from the prefix of a run up to one cutoff.

    Attributes
    ----------
    cutoff : float
        Share of the planned steps observed, in (0, 1].
    observed_step : int or None
        Last logged step fed to the forecaster (``None`` if nothing was fed).
    forecast : Forecast or None
        The forecast at the final step, or ``None`` if the forecaster gave none yet.
    truth : float
        The true loss at the final step.
    rel_error : float or None
        ``(forecast.loss - truth) / truth``; ``None`` without a forecast.
    covered : bool or None
        Whether ``forecast.low <= truth <= forecast.high``; ``None`` without a forecast.
    trajectory : Trajectory or None
        Predicted loss at the requested ``trajectory_steps`` after ``observed_step``
        (``None`` unless asked for, or without a forecast).
    after_final : bool
        The cutoff reaches the step forecast: nothing is left to forecast there, so nothing
        is fed and no forecast is made (it would have seen the loss it is scored against).
    """

    cutoff: float
    observed_step: int | None
    forecast: Forecast | None
    truth: float
    rel_error: float | None
    covered: bool | None
    trajectory: Trajectory | None = None
    after_final: bool = False


def prefix_length(
    steps: NDArray[np.int64], cutoff: float, total_steps: int, final_step: int
) -> int:
    """How many of a run's logged ``steps`` a backtest at ``cutoff`` feeds: those up to
    ``cutoff * total_steps``, and none once that reaches ``final_step``, the step forecast
    (a run that ended early, or logged its last point before the end of its schedule)."""
    if _reaches(cutoff, total_steps, final_step):
        return 0
    return int(np.searchsorted(steps, cutoff * total_steps, side="right"))


def _reaches(cutoff: float, total_steps: int, final_step: int) -> bool:
    """Whether a cutoff's share of the planned steps reaches the step forecast."""
    return cutoff * total_steps >= final_step


def backtest(
    steps: ArrayLike,
    losses: ArrayLike,
    lr_schedule: ArrayLike | Schedule,
    *,
    cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
    final_step: int | None = None,
    truth: float | None = None,
    trajectory_steps: ArrayLike | None = None,
    **forecaster_kwargs,
) -> list[BacktestPoint]:
    """Forecast the final loss of a logged run from each prefix of it, as it would have been live.

    For each cutoff ``c`` the points with ``step <= c * T`` (``T`` the planned steps) are fed
    in order into a fresh :class:`Forecaster` targeting ``final_step``, and its forecast is
    compared with ``truth``. A cutoff at or past ``final_step`` gets no forecast
    (:attr:`BacktestPoint.after_final`): there is nothing left to forecast.

    Parameters
    ----------
    steps : array_like of int, shape (n,)
        Logged steps, strictly increasing, all inside the schedule.
    losses : array_like, shape (n,)
        Loss at each step (NaN/inf are counted and skipped by the forecaster).
    lr_schedule : array_like, shape (T,), or Schedule
        Planned LR of every step.
    cutoffs : sequence of float, optional
        Shares of ``T`` in (0, 1]. Default ``(0.1, 0.25, 0.5, 0.75, 0.9)``.
    final_step : int, optional
        Step to forecast; the last logged step by default.
    truth : float, optional
        True loss at ``final_step``; by default the loss logged at the last logged step.
    trajectory_steps : array_like of int, optional
        Steps at which to also record the predicted trajectory (only those after each
        cutoff's last observed step are kept), for plots.
    **forecaster_kwargs
        Passed to :class:`Forecaster` (``law``, ``coverage``, ``max_bins``, ``priors``, ...).

    Returns
    -------
    list of BacktestPoint
        One per cutoff, in the order given.

    Raises
    ------
    ValueError
        If the inputs are empty or of different lengths, steps do not increase or fall
        outside the schedule, a cutoff is outside (0, 1],
        ``final_step`` is outside the schedule, or the truth is not finite and non-zero.

    Examples
    --------
    >>> lr = np.r_[np.linspace(1e-4, 1e-3, 100), np.full(900, 1e-3)]
    >>> steps = np.arange(0, 1000, 10)
    >>> loss = 2.0 + 3.0 * (steps + 10.0) ** -0.3
    >>> points = backtest(steps, loss, lr, cutoffs=(0.5, 0.9))
    >>> [(p.cutoff, p.observed_step) for p in points]
    [(0.5, 500), (0.9, 900)]
    """
    schedule = lr_schedule if isinstance(lr_schedule, Schedule) else Schedule(lr_schedule)
    T = schedule.total_steps
    step_arr = np.asarray(steps)
    loss_arr = np.asarray(losses, dtype=np.float64)
    if step_arr.ndim != 1 or loss_arr.ndim != 1 or len(step_arr) != len(loss_arr):
        raise ValueError(
            f"`steps` and `losses` must be 1-D of the same length, got shapes "
            f"{step_arr.shape} and {loss_arr.shape}."
        )
    if not step_arr.size:
        raise ValueError("`steps` is empty: nothing to backtest.")
    step_arr = schedule.check_steps(step_arr)
    back = np.flatnonzero(np.diff(step_arr) <= 0)
    if back.size:
        i = int(back[0]) + 1
        raise ValueError(
            f"steps must increase: got step {step_arr[i]} after step {step_arr[i - 1]}."
        )
    cuts = tuple(float(c) for c in cutoffs)
    if not cuts:
        raise ValueError("`cutoffs` is empty.")
    for c in cuts:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"`cutoffs` must be shares of the run in (0, 1], got {c!r}.")
    if final_step is None:
        final_step = int(step_arr[-1])
    elif not 0 <= final_step < T:
        raise ValueError(f"`final_step` must be in 0..{T - 1} (the schedule), got {final_step!r}.")
    if truth is None:
        truth = float(loss_arr[-1])
    truth = float(truth)
    if not math.isfinite(truth) or truth == 0.0:
        raise ValueError(f"`truth` must be finite and non-zero, got {truth!r}.")
    traj = (
        None if trajectory_steps is None else schedule.check_steps(np.atleast_1d(trajectory_steps))
    )

    points = []
    for c in cuts:
        n = prefix_length(step_arr, c, T, final_step)
        fc = Forecaster(schedule, target_step=final_step, **forecaster_kwargs)
        for s, loss in zip(step_arr[:n].tolist(), loss_arr[:n].tolist(), strict=True):
            fc.update(s, loss)
        observed = int(step_arr[n - 1]) if n else None
        f = fc.forecast() if n else None
        trajectory = None
        if f is not None and traj is not None:
            ahead = traj[traj >= (observed or 0)]
            predicted = fc.trajectory(ahead) if ahead.size else None
            if predicted is not None:
                trajectory = Trajectory(ahead, *predicted)
        points.append(
            BacktestPoint(
                cutoff=c,
                observed_step=observed,
                forecast=f,
                truth=truth,
                rel_error=None if f is None else (f.loss - truth) / truth,
                covered=None if f is None else bool(f.low <= truth <= f.high),
                trajectory=trajectory,
                after_final=_reaches(c, T, final_step),
            )
        )
    return points


def backtest_run(
    run,
    schedule: Schedule | None = None,
    *,
    cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
    **forecaster_kwargs,
) -> list[BacktestPoint]:
    """:func:`backtest` of a finished run's final loss: ``run`` has ``steps``, ``loss``,
    ``lr_schedule``, ``final_step`` and ``final_loss`` (as ``load_runs`` gives); ``schedule``
    is its schedule where the caller has built it already."""
    return backtest(
        run.steps,
        run.loss,
        run.lr_schedule if schedule is None else schedule,
        cutoffs=cutoffs,
        final_step=run.final_step,
        truth=run.final_loss,
        **forecaster_kwargs,
    )
