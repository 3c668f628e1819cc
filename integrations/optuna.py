"""Optuna pruning on the forecast final loss: ``ForecastPruner``, ``TrialReporter`` and helpers.

A trial reports its loss as usual with ``trial.report(loss, step)`` and stores its planned LR
schedule once with :func:`set_schedule`. :class:`ForecastPruner` fits the loss law of
:class:`lossforecast.Forecaster` to the reported values and prunes the trial only when its
forecast *final* loss is, with probability at least ``confidence``, worse than the best
finished trial's. A warmup-stable-decay run whose loss is still high before its cooldown is
therefore kept, where a rule on the current loss (``MedianPruner``) cuts it.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lossforecast import Forecast, Forecaster, Priors, Schedule
from lossforecast._schedule import decode_lr, encode_lr

try:
    import optuna
    from optuna.pruners import BasePruner
    from optuna.study import StudyDirection
    from optuna.trial import FrozenTrial, TrialState
except ImportError:  # pragma: no cover - depends on what is installed
    optuna = None
    BasePruner = object

__all__ = [
    "ForecastPruner",
    "TrialReporter",
    "forecast_value",
    "set_schedule",
    "SCHEDULE_KEY",
    "FORECAST_KEY",
    "PRUNED_KEY",
]

logger = logging.getLogger(__name__)

#: User attribute holding the planned LR schedule (as text, see ``encode_lr``).
SCHEDULE_KEY = "lossforecast_lr_schedule"
#: User attribute holding the forecast final loss of a trial the pruner pruned.
FORECAST_KEY = "lossforecast_forecast"
#: User attribute set to ``True`` on every trial the pruner pruned.
PRUNED_KEY = "lossforecast_pruned"
#: Longest text stored in one user attribute; longer schedules are split over several
#: (MySQL's ``TEXT`` column, which Optuna's RDB storage uses, holds 65,535 bytes).
_CHUNK = 60_000
#: Default spacing of the pruner's checks, as a share of the trial's planned steps.
_INTERVAL = 0.02


def _require_optuna(what: str) -> None:
    if optuna is None:
        raise ImportError(f'{what} needs Optuna: pip install "lossforecast[optuna]".')


# ---------------------------------------------------------------------- schedule attributes
def set_schedule(trial: Any, lr_schedule: ArrayLike) -> None:
    """Store a trial's planned LR schedule on it (once, before the first report).

    The schedule is kept exactly (float64) and compactly (zlib + base64) in the user
    attribute ``lossforecast_lr_schedule``; one over 60,000 characters (e.g. a cosine of
    more than ~6k steps) is split over ``lossforecast_lr_schedule_1``, ``_2``, … so it fits
    every RDB backend. Constant and warmup-stable-decay schedules of a million steps take a
    few kB.

    Parameters
    ----------
    trial : optuna.trial.Trial
        The running trial.
    lr_schedule : array_like, shape (T,)
        Planned LR of every optimizer step ``0..T-1``, the steps ``trial.report`` uses.

    Raises
    ------
    ValueError
        If the schedule is invalid (empty, NaN, negative, no positive entry).
    """
    lr = Schedule(lr_schedule).lr  # validates
    text = encode_lr(lr)
    parts = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)]
    trial.set_user_attr(SCHEDULE_KEY, parts[0])
    if len(parts) > 1:
        trial.set_user_attr(f"{SCHEDULE_KEY}_parts", len(parts))
        for i, part in enumerate(parts[1:], start=1):
            trial.set_user_attr(f"{SCHEDULE_KEY}_{i}", part)


def _schedule_from_attrs(attrs: dict[str, Any]) -> np.ndarray | None:
    """The schedule :func:`set_schedule` stored, or None if there is none."""
    first = attrs.get(SCHEDULE_KEY)
    if first is None:
        return None
    n = int(attrs.get(f"{SCHEDULE_KEY}_parts", 1))
    text = first + "".join(attrs[f"{SCHEDULE_KEY}_{i}"] for i in range(1, n))
    return decode_lr(text)


# ---------------------------------------------------------------------- the storage, isolated
def _write_user_attrs(study: Any, trial: Any, attrs: dict[str, Any]) -> None:
    """Write user attributes of the trial a pruner was handed.

    ``BasePruner.prune`` gets a :class:`~optuna.trial.FrozenTrial` copy, whose
    ``set_user_attr`` changes only the copy, so the pruner writes through the study's
    storage. The only private Optuna attributes this module reads (``Study._storage``,
    ``FrozenTrial._trial_id``, ``Trial._trial_id``) are in this helper and the next; with
    RDB storage the write is a committed row that every process sees.
    """
    storage = study._storage
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial._trial_id, key, value)


def _fresh_user_attrs(trial: Any) -> dict[str, Any]:
    """A trial's user attributes as stored now (a live ``Trial`` caches its own copy)."""
    if optuna is not None and isinstance(trial, FrozenTrial):
        return dict(trial.user_attrs)
    storage = getattr(trial, "storage", None)
    if storage is not None and hasattr(trial, "_trial_id"):
        return dict(storage.get_trial_user_attrs(trial._trial_id))
    return dict(trial.user_attrs)


def forecast_value(trial: Any) -> float | None:
    """The forecast final loss :class:`ForecastPruner` stored when it pruned ``trial``.

    Return it from the objective instead of raising ``optuna.TrialPruned`` so that samplers
    learn from the pruned trial. Optuna has no value for a pruned trial: TPE ranks pruned
    trials only by the step they reached, after every finished one, and
    ``study.tell(trial, state=TrialState.PRUNED)`` drops a value. A trial that *returns*
    the forecast is finished with it as its value, so TPE ranks it with the others, the
    workaround Optuna's own ``WilcoxonPruner`` documents. Such a trial keeps
    ``user_attrs["lossforecast_pruned"] = True``, :class:`ForecastPruner` never uses it as
    its reference, and it never becomes ``study.best_trial`` (the forecast it returns is
    worse than the best finished value, or the pruner would not have pruned it).

    Parameters
    ----------
    trial : optuna.trial.Trial or optuna.trial.FrozenTrial
        A running trial (read from the storage, so a value written by the pruner is seen)
        or a finished one from ``study.trials``.

    Returns
    -------
    float or None
        The forecast, or None if the pruner stored none (not pruned by
        :class:`ForecastPruner`, or pruned because its loss was not finite).

    Examples
    --------
    The recipe inside an objective::

        reporter = TrialReporter(trial, lr_schedule)
        for step in range(len(lr_schedule)):
            loss = train_one_step()
            if reporter.report(step, loss):
                value = forecast_value(trial)
                if value is None:
                    raise optuna.TrialPruned()
                return value  # finished with the forecast: TPE learns from it
        return final_loss

    With ask-and-tell: ``study.tell(trial, forecast_value(trial))``, or
    ``study.tell(trial, state=optuna.trial.TrialState.PRUNED)`` when it is None.
    """
    value = _fresh_user_attrs(trial).get(FORECAST_KEY)
    return None if value is None else float(value)


# ---------------------------------------------------------------------- the pruner
@dataclass
class _TrialCache:
    """What the pruner keeps for one running trial between calls."""

    forecaster: Forecaster | None
    n_fed: int = 0
    last_bucket: int = -1
    strikes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


class ForecastPruner(BasePruner):
    """Prune a trial whose forecast final loss is very likely worse than the best trial's.

    At each check the pruner adds the trial's new intermediate values to a
    :class:`lossforecast.Forecaster` built from the schedule the trial stored with
    :func:`set_schedule` (one per running trial, so a call costs the new points plus one
    refit), forecasts the loss at the schedule's last step and prunes if the lower end of
    the forecast's central ``2 * confidence - 1`` interval, its ``1 - confidence`` quantile,
    is above the reference.

    The reference is the best value of the trials that *finished* with a measured value:
    ``COMPLETE`` trials, except those that returned a forecast (``lossforecast_pruned``).
    Forecasts of pruned trials are not used: the rule then reads "prune only what is
    unlikely to beat any run that really finished", and a wrong forecast cannot lower the
    bar for every later trial. The objective's value must therefore be the final value of
    the loss the trial reports (e.g. the last logged loss, or the mean of the last few).

    When it prunes, the pruner writes user attributes on the trial:
    ``lossforecast_forecast`` (point forecast of the final loss), ``lossforecast_forecast_low``,
    ``lossforecast_forecast_high``, ``lossforecast_forecast_coverage`` (the interval and its
    probability), ``lossforecast_forecast_step`` (the step forecast),
    ``lossforecast_observed_step``, ``lossforecast_reference`` (the best value it was worse
    than), ``lossforecast_pruned`` (``True``) and ``lossforecast_reason`` (``"forecast"``,
    or ``"diverged"`` when the last reported loss was NaN or infinite: such a trial is
    pruned at once and stores no forecast). :func:`forecast_value` reads the forecast.

    Works with any storage; with RDB storage each process holds its own pruner, and the
    attributes it writes are seen by all. Only ``direction="minimize"`` studies make sense
    (the value is a loss); a trial without a stored schedule is never pruned (logged once).

    Parameters
    ----------
    confidence : float, optional
        Probability, in (0.5, 1), that the trial's final loss is worse than the reference
        before it is pruned. Default 0.9.
    n_startup_trials : int, optional
        Pruning is off until this many trials have finished with a measured value (at
        least one always is needed, as the reference). Default 1.
    n_warmup_steps : int, optional
        Pruning is off while the trial's last step is below this. Default 0.
    interval_steps : int, optional
        Steps between checks, counted from ``n_warmup_steps`` as in ``MedianPruner``; a check
        falls on the first report in each interval. Default: 2% of the trial's planned
        steps. Each check is one refit (milliseconds), and fewer, spaced checks also keep
        the chance of a wrong prune down: every check is another chance for one forecast
        to be off.
    min_progress : float, optional
        Pruning is off until this share of the trial's planned steps is done, in [0, 1).
        Default 0.25: earlier forecasts can be off by more than their interval says (at
        20%, one synthetic cosine run was forecast above its 90% bound).
    patience : int, optional
        Prune only when this many checks in a row found the trial worse (checks, not
        steps: keep them spaced with ``interval_steps``). Default 2: right
        after a sudden LR drop a fit sees only the first points of the drop's response and
        its interval can be too narrow for one check (a two-stage run of the real curves
        was cut that way); a second check one interval later has more of the response.
    law : {'multi-power', 'lr-annealing'}, optional
        Law the forecaster fits. Default ``'multi-power'``.
    priors : lossforecast.Priors, optional
        Priors and interval calibration; the shipped ones by default.

    Raises
    ------
    ImportError
        If Optuna is not installed.
    ValueError
        If an argument is out of range; from :meth:`prune`, if the study maximizes.

    Examples
    --------
    >>> import numpy as np, optuna
    >>> from lossforecast.integrations.optuna import ForecastPruner, TrialReporter
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> lr = np.r_[np.linspace(1e-4, 1e-3, 50), np.full(450, 1e-3)]
    >>> def objective(trial):
    ...     scale = trial.suggest_float("scale", 0.5, 2.0)
    ...     reporter = TrialReporter(trial, lr)
    ...     for step in range(50, 500, 10):
    ...         loss = 2.0 + scale * (step / 500) ** -0.3
    ...         if reporter.report(step, loss):
    ...             raise optuna.TrialPruned()
    ...     return loss
    >>> study = optuna.create_study(
    ...     pruner=ForecastPruner(), sampler=optuna.samplers.RandomSampler(seed=0)
    ... )
    >>> study.optimize(objective, n_trials=4)
    >>> len(study.trials)
    4
    """

    def __init__(
        self,
        confidence: float = 0.9,
        n_startup_trials: int = 1,
        n_warmup_steps: int = 0,
        interval_steps: int | None = None,
        *,
        min_progress: float = 0.25,
        patience: int = 2,
        law: str = "multi-power",
        priors: Priors | None = None,
    ) -> None:
        _require_optuna("ForecastPruner")
        if not (isinstance(confidence, (int, float)) and 0.5 < confidence < 1.0):
            raise ValueError(f"`confidence` must be in (0.5, 1), got {confidence!r}.")
        n_startup_trials = _check_int("n_startup_trials", n_startup_trials, 0)
        n_warmup_steps = _check_int("n_warmup_steps", n_warmup_steps, 0)
        if interval_steps is not None:
            interval_steps = _check_int("interval_steps", interval_steps, 1)
        if not (isinstance(min_progress, (int, float)) and 0.0 <= min_progress < 1.0):
            raise ValueError(f"`min_progress` must be in [0, 1), got {min_progress!r}.")
        patience = _check_int("patience", patience, 1)
        # Fail on a bad law name now, not at the first check inside a training run.
        Forecaster(np.ones(2), law=law)
        self._confidence = float(confidence)
        self._n_startup_trials = n_startup_trials
        self._n_warmup_steps = n_warmup_steps
        self._interval_steps = interval_steps
        self._min_progress = float(min_progress)
        self._patience = patience
        self._law = law
        self._priors = priors
        self._cache: dict[tuple[str, int], _TrialCache] = {}
        self._lock = threading.Lock()
        self._failed = False

    def __repr__(self) -> str:
        return (
            f"ForecastPruner(confidence={self._confidence}, "
            f"n_startup_trials={self._n_startup_trials}, n_warmup_steps={self._n_warmup_steps}, "
            f"interval_steps={self._interval_steps}, min_progress={self._min_progress}, "
            f"patience={self._patience})"
        )

    def prune(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether to prune ``trial`` now (called by ``Trial.should_prune``).

        Never raises for a failure of its own: it logs once and keeps the trial.
        """
        if study.direction != StudyDirection.MINIMIZE:
            raise ValueError(
                "ForecastPruner forecasts a loss and needs a study with "
                f"direction='minimize', got {study.direction.name.lower()!r}."
            )
        try:
            return self._prune(study, trial)
        except Exception as exc:  # a forecasting failure must never end the user's trial
            if not self._failed:
                self._failed = True
                logger.warning(
                    "lossforecast: ForecastPruner failed on trial %d (%s: %s); "
                    "the trial is not pruned.",
                    trial.number,
                    type(exc).__name__,
                    exc,
                )
            return False

    # The rule reads as a run of early ``return False`` guards, then one comparison.
    def _prune(self, study: Any, trial: Any) -> bool:
        step = trial.last_step
        if step is None:
            return False
        cache = self._trial_cache(study, trial)
        with cache.lock:
            if cache.forecaster is None:
                return False
            fc = cache.forecaster
            self._feed(cache, trial)
            last = trial.intermediate_values[step]
            if not math.isfinite(last):
                self._mark_pruned(study, trial, None, None, reason="diverged")
                return True
            if step < self._n_warmup_steps:
                return False
            interval = self._interval_steps or max(int(_INTERVAL * fc.schedule.total_steps), 1)
            bucket = (step - self._n_warmup_steps) // interval
            if bucket <= cache.last_bucket:
                return False
            if (step + 1) / fc.schedule.total_steps < self._min_progress:
                return False
            reference = self._reference(study)
            if reference is None:
                return False
            cache.last_bucket = bucket
            forecast = fc.forecast(coverage=2.0 * self._confidence - 1.0)
            if forecast is None or not forecast.low > reference:
                cache.strikes = 0
                return False
            cache.strikes += 1
            if cache.strikes < self._patience:
                return False
            self._mark_pruned(study, trial, forecast, reference, reason="forecast")
            return True

    def _trial_cache(self, study: Any, trial: Any) -> _TrialCache:
        key = (study.study_name, trial.number)
        with self._lock:
            cache = self._cache.get(key)
            if cache is not None:
                return cache
        lr = _schedule_from_attrs(trial.user_attrs)
        if lr is None:
            logger.warning(
                "lossforecast: trial %d stored no LR schedule (call "
                "lossforecast.integrations.optuna.set_schedule(trial, lr_schedule) or use "
                "TrialReporter); ForecastPruner never prunes it.",
                trial.number,
            )
            fc = None
        else:
            fc = Forecaster(lr, law=self._law, priors=self._priors)
        with self._lock:
            return self._cache.setdefault(key, _TrialCache(fc))

    def _feed(self, cache: _TrialCache, trial: Any) -> None:
        """Add the intermediate values reported since the last call (in report order)."""
        values = trial.intermediate_values
        fc = cache.forecaster
        for step, loss in itertools.islice(values.items(), cache.n_fed, None):
            last = fc.last_step
            if step >= fc.schedule.total_steps or (last is not None and step <= last):
                logger.debug("lossforecast: trial %d: step %d skipped", trial.number, step)
                continue
            fc.update(step, loss)
        cache.n_fed = len(values)

    def _reference(self, study: Any) -> float | None:
        """Best measured value of the finished trials; forget finished trials' caches."""
        finished = study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        )
        values = [
            t.value
            for t in finished
            if t.state == TrialState.COMPLETE
            and t.value is not None
            and math.isfinite(t.value)
            and not t.user_attrs.get(PRUNED_KEY, False)
        ]
        with self._lock:
            for t in finished:
                self._cache.pop((study.study_name, t.number), None)
        if not values or len(values) < self._n_startup_trials:
            return None
        return min(values)

    def _mark_pruned(
        self,
        study: Any,
        trial: Any,
        forecast: Forecast | None,
        reference: float | None,
        *,
        reason: str,
    ) -> None:
        attrs: dict[str, Any] = {PRUNED_KEY: True, "lossforecast_reason": reason}
        if forecast is not None:
            attrs.update(
                {
                    FORECAST_KEY: forecast.loss,
                    f"{FORECAST_KEY}_low": forecast.low,
                    f"{FORECAST_KEY}_high": forecast.high,
                    f"{FORECAST_KEY}_coverage": forecast.coverage,
                    f"{FORECAST_KEY}_step": forecast.step,
                    "lossforecast_observed_step": forecast.observed_step,
                    "lossforecast_reference": reference,
                }
            )
            logger.info(
                "lossforecast: pruning trial %d at step %d: forecast final loss %.4g "
                "[%.4g, %.4g] (%.0f%%) is worse than the best finished %.4g.",
                trial.number,
                trial.last_step,
                forecast.loss,
                forecast.low,
                forecast.high,
                100 * forecast.coverage,
                reference,
            )
        else:
            logger.info(
                "lossforecast: pruning trial %d at step %d: the loss is not finite.",
                trial.number,
                trial.last_step,
            )
        try:
            _write_user_attrs(study, trial, attrs)
        except Exception as exc:  # the decision stands even if the storage refuses the note
            logger.warning(
                "lossforecast: could not store the forecast on trial %d (%s: %s).",
                trial.number,
                type(exc).__name__,
                exc,
            )


# ---------------------------------------------------------------------- for training loops
class TrialReporter:
    """Report a training run's loss to an Optuna trial and say when to stop.

    Stores the planned schedule on the trial once (:func:`set_schedule`), then
    :meth:`report` reports ``loss`` at ``step`` and returns ``trial.should_prune()``. For a
    training loop or a framework callback; under DDP call it on rank zero only and
    broadcast the answer.

    Parameters
    ----------
    trial : optuna.trial.Trial
        The running trial.
    lr_schedule : array_like, shape (T,)
        Planned LR of every optimizer step.
    every : int, optional
        Report only steps that are a multiple of this (each report is one storage write;
        with RDB storage, reporting every step of a long run is slow). Default 1.

    Raises
    ------
    ImportError
        If Optuna is not installed.
    ValueError
        If the schedule is invalid or ``every`` is not a positive int.
    """

    def __init__(self, trial: Any, lr_schedule: ArrayLike, *, every: int = 1) -> None:
        _require_optuna("TrialReporter")
        self.every = _check_int("every", every, 1)
        set_schedule(trial, lr_schedule)
        self.trial = trial
        self.last_step: int | None = None
        #: True once :meth:`report` returned True.
        self.pruned = False

    def report(self, step: int, loss: float) -> bool:
        """Report ``loss`` at optimizer step ``step``; True if the trial should stop now.

        Steps that are not a multiple of ``every``, or not after the last reported one,
        are not reported and return False.
        """
        step = int(step)
        if step % self.every or (self.last_step is not None and step <= self.last_step):
            return False
        self.trial.report(float(loss), step)
        self.last_step = step
        self.pruned = bool(self.trial.should_prune())
        return self.pruned

    @property
    def forecast(self) -> float | None:
        """The forecast final loss stored when the trial was pruned (:func:`forecast_value`)."""
        return forecast_value(self.trial)
