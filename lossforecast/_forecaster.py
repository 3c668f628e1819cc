"""The online forecaster: observations in, a forecast of the loss on the planned schedule out."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._fit import FitResult, fit_law
from ._laws import LAWS, Law, LawInputs
from ._observations import Observations
from ._priors import Priors
from ._schedule import Schedule, decode_lr, encode_lr

__all__ = ["Forecaster", "Forecast"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: Share of the observed steps skipped at the start of a fit: the early transient bends the
#: power law (Choshen et al. 2024). In the leave-one-source-out backtests 0.35 beat 0.1, 0.25
#: and 0.5, and it keeps a small model's steep early phase from being read as annealing.
#: Skipping less only up to 10% of the LR area (0, 0.1 or 0.2 there) changed that cut-off's
#: median through the three tdlt runs alone (their errors went from 7.8% to 14%, 3.8% or
#: 1.5%), so it is not done.
_SKIP_FRACTION = 0.35


@dataclass(frozen=True)
class Forecast:
    """A forecast of the loss at one step of a schedule.

    Attributes
    ----------
    step : int
        The step forecast (by default the last step of the planned schedule).
    loss : float
        Point forecast.
    low, high : float
        Interval that holds the loss with probability ``coverage``.
    coverage : float
        Nominal probability of the interval.
    law : str
        The law fitted (``"multi-power"`` or ``"lr-annealing"``).
    n_points : int
        Observations the fit used (before binning).
    fit_seconds : float
        Wall time of the fit behind this forecast.
    observed_step : int
        Last observed step when the fit was made.
    """

    step: int
    loss: float
    low: float
    high: float
    coverage: float
    law: str
    n_points: int
    fit_seconds: float
    observed_step: int


@dataclass(frozen=True)
class _Fitted:
    """A successful fit and what its forecasts need."""

    result: FitResult
    law: Law
    covariance: NDArray[np.float64]
    progress: float
    n_points: int
    observed_step: int


class Forecaster:
    """Forecast the final loss of a run while it trains, for its planned LR schedule.

    Feed observed losses with :meth:`update` (O(1)); :meth:`forecast` refits the law when new
    data arrived and returns the forecast with an interval. The law is fitted on binned
    points with a Huber loss and priors for what the data cannot yet identify (such as the
    drop a cooldown will bring before it has started).

    Parameters
    ----------
    lr_schedule : array_like, shape (T,)
        Planned LR of every optimizer step ``0..T-1``.
    law : {'multi-power', 'lr-annealing'}, optional
        Law to fit. Default ``'multi-power'``, chosen by the accuracy backtests.
    target_step : int, optional
        Step :meth:`forecast` targets by default; ``T-1`` if not given.
    coverage : float, optional
        Nominal probability of the interval, in (0, 1). Default 0.8.
    max_bins : int, optional
        Observations are merged into at most this many bins. Default 128.
    min_points : int, optional
        Bins after warmup needed before the first forecast. Default 2.
    priors : Priors, optional
        Priors and interval calibration; the shipped ones by default.

    Raises
    ------
    ValueError
        If the schedule is invalid (empty, NaN, negative) or an option is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> lr = np.r_[np.linspace(0, 1e-3, 100), np.full(900, 1e-3)]
    >>> fc = Forecaster(lr)
    >>> for s in range(100, 500, 10):
    ...     fc.update(s, 3.0 + 20.0 * (s / 1000) ** -0.5 / 10)
    >>> f = fc.forecast()
    >>> f.step, f.low <= f.loss <= f.high
    (999, True)
    """

    def __init__(
        self,
        lr_schedule: ArrayLike,
        *,
        law: str = "multi-power",
        target_step: int | None = None,
        coverage: float = 0.8,
        max_bins: int = 128,
        min_points: int = 2,
        priors: Priors | None = None,
    ) -> None:
        if law not in LAWS:
            raise ValueError(f"`law` must be one of {sorted(LAWS)}, got {law!r}.")
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"`coverage` must be in (0, 1), got {coverage!r}.")
        if min_points < 2:
            raise ValueError(f"`min_points` must be at least 2, got {min_points!r}.")
        self.schedule = lr_schedule if isinstance(lr_schedule, Schedule) else Schedule(lr_schedule)
        T = self.schedule.total_steps
        if target_step is None:
            target_step = T - 1
        if not 0 <= target_step < T:
            raise ValueError(
                f"`target_step` must be in 0..{T - 1} (the schedule), got {target_step!r}."
            )
        self.law_name = law
        self.target_step = int(target_step)
        self.coverage = float(coverage)
        self.min_points = int(min_points)
        self.priors = priors if priors is not None else Priors.default()
        self._law = LAWS[law]()
        self._obs = Observations(max_bins)
        self._lock = threading.RLock()
        self._fitted: _Fitted | None = None
        self._fitted_total = -1
        self._restored_params: NDArray[np.float64] | None = None
        self.n_nonfinite = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ observing
    def update(self, step: int, loss: float) -> None:
        """Record the loss observed at ``step`` (O(1); never fits).

        ``loss`` is a cross-entropy in nats per token, the unit of the shipped priors for the
        drop a cooldown brings: convert a loss logged in bits (times ln 2) or summed over
        tokens first. Non-finite losses are counted in :attr:`n_nonfinite` and skipped.

        Raises
        ------
        ValueError
            If ``step`` is outside the schedule or not above the previous step.
        """
        step_i = int(step)
        if step_i != step or not 0 <= step_i < self.schedule.total_steps:
            raise ValueError(
                f"step {step!r} is outside the planned schedule of "
                f"{self.schedule.total_steps} steps (0..{self.schedule.total_steps - 1})."
            )
        loss_f = float(loss)
        with self._lock:
            last = self._obs.last_step
            if last is not None and step_i <= last:
                raise ValueError(f"steps must increase: got step {step_i} after step {last}.")
            if not math.isfinite(loss_f):
                self.n_nonfinite += 1
                return
            self._obs.add(step_i, loss_f)

    @property
    def n_points(self) -> int:
        """Finite observations recorded so far."""
        return self._obs.n_total

    @property
    def last_step(self) -> int | None:
        """Last step with a finite observation."""
        return self._obs.last_step

    # ------------------------------------------------------------------ fitting
    def refit(self) -> bool:
        """Fit the law to everything observed so far if new data arrived; True if a fit is held.

        A fit that fails keeps the last good one and records why in :attr:`last_error`.
        Safe to call from a background thread while :meth:`update` runs on another.
        """
        with self._lock:
            total = self._obs.n_total
            if total == self._fitted_total:
                return self._fitted is not None
            binned = self._obs.binned()
            previous = self._fitted
        try:
            fitted, error = self._fit(binned, total, previous)
        except Exception as exc:  # a fit must never take the training run down with it
            fitted, error = None, f"the fit raised {type(exc).__name__}: {exc}"
        with self._lock:
            self._fitted_total = total
            if fitted is not None:
                self._fitted = fitted
                self.last_error = None
            elif error is not None:
                if error != self.last_error:
                    logger.info("lossforecast: fit skipped: %s", error)
                self.last_error = error
            return self._fitted is not None

    def _fit(
        self, binned, total: int, previous: _Fitted | None
    ) -> tuple[_Fitted | None, str | None]:
        sched = self.schedule
        if len(binned) < self.min_points:
            return None, None
        keep = _fitted_points(binned.step, sched.warmup_steps, self.min_points)
        if keep is None:
            return None, None
        steps, loss, count = binned.step[keep], binned.loss[keep], binned.count[keep]
        min_loss = float(loss.min())
        sigma = _bin_noise(binned.point_noise, count, min_loss)
        x = LawInputs.at(sched, steps)
        law_prior = self.priors.laws[self._law.name]
        progress = float(sched.area[steps[-1]] / sched.area[-1])
        prior = law_prior.for_run(min_loss, sched.peak_lr, sched.lr_area(int(steps[-1])))
        if previous is not None:
            starts = [previous.result.params]
        elif self._restored_params is not None:  # continue a checkpointed run's fit
            starts = [self._restored_params]
        else:
            starts = _initial_starts(self._law, prior, steps, loss, sched)
        result = fit_law(self._law, x, loss, sigma, starts, prior=prior)
        if not result.success:
            return None, result.message
        # When the law fits worse than the noise says, the misfit is systematic: widen the
        # noise by the robust dispersion and refit, so the priors keep their say instead of
        # letting, say, the annealing amplitude absorb the misfit and run away.
        dispersion = self._dispersion(result, x, loss, sigma)
        if dispersion > 1.5:
            sigma = sigma * np.sqrt(dispersion)
            refined = fit_law(self._law, x, loss, sigma, [result.params], prior=prior)
            if refined.success:
                result = refined
                dispersion = self._dispersion(result, x, loss, sigma)
        # A positive loss (cross-entropy) cannot end below zero: such a fit is the law's
        # annealing term running away while the data cannot yet pin it down.
        end = LawInputs.at(sched, np.array([sched.total_steps - 1]))
        final = float(self._law.predict(result.params, end)[0])
        if min_loss > 0 and not final > 0:
            return None, (
                f"the fit predicts a loss of {final:.3g} at the end of the schedule, below zero "
                "for a loss that has stayed positive"
            )
        cov = np.linalg.pinv(result.hessian)
        fitted = _Fitted(result, self._law, cov * dispersion, progress, total, int(steps[-1]))
        return fitted, None

    def _dispersion(self, result, x, loss, sigma) -> float:
        """Robust chi-square per degree of freedom of a fit (residuals clipped at 3), >= 1."""
        resid = (self._law.predict(result.params, x) - loss) / sigma
        dof = max(len(loss) - len(self._law.params), 1)
        return max(float(np.sum(np.minimum(resid**2, 9.0)) / dof), 1.0)

    # ------------------------------------------------------------------ forecasting
    def forecast(
        self, step: int | None = None, *, coverage: float | None = None, refit: bool = True
    ) -> Forecast | None:
        """Forecast the loss at ``step`` (default: the target step) of the planned schedule.

        Returns ``None`` until enough points after warmup have been observed. With
        ``refit=False`` the latest fit is used as is (for callers that fit in the background).
        """
        return self._forecast_on(self.schedule, step, coverage, refit)

    def what_if(
        self,
        lr_schedule: ArrayLike,
        step: int | None = None,
        *,
        coverage: float | None = None,
        refit: bool = True,
    ) -> Forecast | None:
        """Forecast for another schedule, with the parameters fitted on this run.

        ``lr_schedule`` must agree with the planned one on the steps observed so far; the
        default ``step`` is its last step. With ``refit=False`` the latest fit is used as is.
        """
        lr = lr_schedule.lr if isinstance(lr_schedule, Schedule) else lr_schedule
        other = Schedule(lr, peak_lr=self.schedule.peak_lr)
        seen = self.last_step
        if seen is not None:
            if other.total_steps <= seen:
                raise ValueError(
                    f"what-if schedule has {other.total_steps} steps, "
                    f"but the run is already at step {seen}."
                )
            past = slice(0, seen + 1)
            differs = ~np.isclose(other.lr[past], self.schedule.lr[past], rtol=1e-6, atol=0.0)
            if differs.any():
                i = int(np.argmax(differs))
                raise ValueError(
                    f"what-if schedule differs from the planned one at step {i}, which the run has "
                    f"already trained ({other.lr[i]!r} vs {self.schedule.lr[i]!r}); "
                    "only the future can change."
                )
        if step is None:
            step = other.total_steps - 1
        return self._forecast_on(other, step, coverage, refit=refit)

    def trajectory(
        self, steps: ArrayLike, *, refit: bool = True
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None:
        """Predicted loss with interval at many steps of the planned schedule: (loss, low, high).

        With ``refit=False`` the latest fit is used as is (for callers that fit in the background).
        """
        fitted = self._current(refit)
        if fitted is None:
            return None
        s = self.schedule.check_steps(np.atleast_1d(steps))
        return self._predict(fitted, self.schedule, s, self.coverage)

    def _current(self, refit: bool) -> _Fitted | None:
        if refit:
            self.refit()
        with self._lock:
            return self._fitted

    def _forecast_on(self, schedule: Schedule, step, coverage, refit: bool) -> Forecast | None:
        cov = self.coverage if coverage is None else float(coverage)
        if not 0.0 < cov < 1.0:
            raise ValueError(f"`coverage` must be in (0, 1), got {coverage!r}.")
        target = self.target_step if step is None else step
        s = schedule.check_steps([target])
        fitted = self._current(refit)
        if fitted is None:
            return None
        loss, low, high = self._predict(fitted, schedule, s, cov)
        return Forecast(
            step=int(s[0]),
            loss=float(loss[0]),
            low=float(low[0]),
            high=float(high[0]),
            coverage=cov,
            law=fitted.law.name,
            n_points=fitted.n_points,
            fit_seconds=fitted.result.seconds,
            observed_step=fitted.observed_step,
        )

    def _predict(self, fitted: _Fitted, schedule: Schedule, steps, coverage: float):
        """Point forecasts and intervals: the fit's uncertainty, the law's shape error on the
        annealing drop still to come, and the calibrated model error."""
        # One evaluation at the last observed step and at ``steps``: the annealing drop still
        # to come is the difference between the two.
        x = LawInputs.at(schedule, np.r_[fitted.observed_step, steps])
        y_all, jac = fitted.law.predict_jac(fitted.result.params, x)
        drop = fitted.law.annealing_drop(fitted.result.params, x, y_all)
        y, jac = y_all[1:], jac[1:]
        var_fit = np.einsum("ij,jk,ik->i", jac, fitted.covariance, jac)
        cal = self.priors.calibration[fitted.law.name]
        z = cal.z(coverage)
        ahead = np.maximum(schedule.area[steps] - schedule.area[fitted.observed_step], 0.0)
        horizon = ahead / max(schedule.area[steps].max(), 1e-12)
        rel = cal.scale(fitted.progress) * np.minimum(
            horizon / max(1.0 - fitted.progress, 1e-9), 1.0
        )
        shape = cal.drop_share * np.maximum(drop[1:] - drop[0], 0.0)
        half = z * np.sqrt(np.maximum(var_fit, 0.0) + (rel * y) ** 2 + shape**2)
        return y, y - half, y + half

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serialisable state: the schedule, options, observations and last fit."""
        with self._lock:
            fitted = self._fitted
            return {
                "version": STATE_VERSION,
                "lr_schedule": encode_lr(self.schedule.lr),
                "law": self.law_name,
                "target_step": self.target_step,
                "coverage": self.coverage,
                "min_points": self.min_points,
                "observations": self._obs.state_dict(),
                "n_nonfinite": self.n_nonfinite,
                "last_params": None if fitted is None else fitted.result.params.tolist(),
            }

    def load_state_dict(self, state: dict) -> None:
        """Restore observations and counters from :meth:`state_dict` output (not modified)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state has version {state.get('version')!r}, expected {STATE_VERSION}."
            )
        saved = schedule_from_state(state)
        if len(saved) != self.schedule.total_steps:
            raise ValueError(
                f"state is for a schedule of {len(saved)} steps, "
                f"this forecaster's has {self.schedule.total_steps}."
            )
        with self._lock:
            self._obs = Observations.from_state_dict(state["observations"])
            self.n_nonfinite = int(state["n_nonfinite"])
            self._fitted = None
            self._fitted_total = -1
            params = state.get("last_params")
            self._restored_params = None if params is None else np.asarray(params, dtype=float)

    @classmethod
    def from_state_dict(cls, state: dict, *, priors: Priors | None = None) -> Forecaster:
        """A forecaster rebuilt from :meth:`state_dict` output."""
        fc = cls(
            schedule_from_state(state),
            law=state["law"],
            target_step=state["target_step"],
            coverage=state["coverage"],
            min_points=state["min_points"],
            max_bins=state["observations"]["max_bins"],
            priors=priors,
        )
        fc.load_state_dict(state)
        return fc

    def __repr__(self) -> str:
        return (
            f"Forecaster(law={self.law_name!r}, total_steps={self.schedule.total_steps}, "
            f"n_points={self.n_points}, n_nonfinite={self.n_nonfinite})"
        )


def schedule_from_state(state: dict) -> NDArray[np.float64]:
    """The planned schedule saved in a :meth:`Forecaster.state_dict` (text or a plain list)."""
    saved = state["lr_schedule"]
    return decode_lr(saved) if isinstance(saved, str) else np.asarray(saved, dtype=np.float64)


def _fitted_points(
    step: NDArray[np.int64], warmup: int, min_points: int
) -> NDArray[np.bool_] | None:
    """Which bins a fit uses, or None while too few have been seen.

    Warmup and the early transient (the first third of what has been seen) are skipped, as
    fits of partial curves do best without them. A sparsely logged run keeps at least its
    last ``min_points`` bins after warmup, so every new point is fitted (else it would keep
    its old fit, and a fresh forecaster would give none). Inside warmup, the second half of
    what has been seen is used: the forecast then rests mostly on the priors.
    """
    keep = step > max(warmup, int(_SKIP_FRACTION * step[-1]))
    if keep.sum() >= min_points:
        return keep
    after = np.flatnonzero(step > warmup)
    if after.size >= min_points:
        keep = np.zeros(step.size, dtype=bool)
        keep[after[-min_points:]] = True
        return keep
    keep = step >= step[-1] // 2
    return keep if keep.sum() >= min_points else None


def _bin_noise(
    point_noise: float, count: NDArray[np.float64], min_loss: float
) -> NDArray[np.float64]:
    """Noise of each bin mean, floored so smoothed curves do not claim impossible precision."""
    floor = 2e-4 * min_loss
    return np.maximum(point_noise / np.sqrt(count), floor)


def _initial_starts(law: Law, prior, steps, loss, schedule: Schedule) -> list[NDArray[np.float64]]:
    """Starts for a first fit: the prior mean with ``A`` matched to the data, at two ``alpha``."""
    mean = np.array([prior.mean.get(p, 0.0) for p in law.params])
    area = schedule.area[steps]
    starts = []
    for alpha in (mean[law.params.index("alpha")], 0.3, 0.7):
        th = mean.copy()
        th[law.params.index("alpha")] = alpha
        l0 = min(th[0], 0.95 * float(loss.min()))
        th[0] = l0
        # A from the mean reducible loss at the mean log-area of the data
        red = max(float(np.mean(loss)) - l0, 1e-3)
        th[law.params.index("log_A")] = np.log(red) + alpha * float(np.mean(np.log(area)))
        starts.append(th)
    return starts
