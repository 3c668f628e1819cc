"""Shared parts of the framework callbacks: options, read access to their Monitor, guards."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ._events import Event
from ._forecaster import Forecast, Forecaster
from ._monitor import Monitor, _checked_sinks, default_sinks
from ._priors import Priors
from ._schedule import Schedule
from ._status import RunStatus
from .sinks import Sink

__all__ = ["MonitorAccess", "never_raises", "check_options"]

logger = logging.getLogger(__name__)


def never_raises(hook: Callable[..., Any]) -> Callable[..., None]:
    """Wrap an adapter hook so an error inside lossforecast is logged once per hook and swallowed.

    The warning names the hook; training goes on.
    """

    @functools.wraps(hook)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception as exc:
            failed = self.__dict__.setdefault("_failed_hooks", set())
            if hook.__name__ not in failed:
                failed.add(hook.__name__)
                logger.warning(
                    "lossforecast: %s failed (%s: %s); training goes on.",
                    hook.__name__,
                    type(exc).__name__,
                    exc,
                )

    return wrapper


def check_options(options: dict[str, Any]) -> None:
    """Raise now, not when training starts, if ``options`` would not build a Monitor.

    ``options`` are the keywords a callback passes on to :class:`Monitor` (its own options
    such as ``target_loss`` and the :class:`~lossforecast.Forecaster` ones); ``target_step``
    is checked against the schedule only once the schedule is known.

    Raises
    ------
    TypeError
        If an option is not a Monitor or Forecaster keyword.
    ValueError
        If an option is out of range.
    """
    probe = {k: v for k, v in options.items() if k != "target_step"}
    probe.setdefault("priors", Priors.default())  # given priors: no history folder is read
    target = options.get("target_step")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0
    ):
        raise ValueError(f"`target_step` must be a non-negative int, got {target!r}.")
    Monitor(np.ones(2), sinks=[], **{**probe, "energy": False}).close(timeout=0.0)


class MonitorAccess:
    """Shared part of the framework callbacks: their options and read access to their Monitor.

    The callback builds its :class:`Monitor` (``self._monitor``) when training starts, on
    the process that forecasts; before that and elsewhere these read None (``events``: an
    empty list). The Monitor owns the run's :class:`~lossforecast.EventBus`.
    """

    _monitor: Monitor | None = None
    _sinks: list[Sink] | None = None
    _trial: Any = None
    _reporter: Any = None
    _prune_reason: str | None = None
    _rank_energy: Any = None  # this process's energy under data parallelism (integrations)

    def _close_rank_energy(self) -> None:
        """Stop this process's own energy sampler, if it has one."""
        if self._rank_energy is not None:
            self._rank_energy.close()
            self._rank_energy = None

    def _configure(
        self,
        monitor: str,
        lr_schedule: ArrayLike | None,
        options: dict[str, Any],
        sinks: Iterable[Sink] | None = None,
        trial: Any = None,
    ) -> None:
        """Validate and keep the options every callback takes."""
        if trial is not None and not callable(getattr(trial, "should_prune", None)):
            raise TypeError(f"`trial` must be an optuna Trial, got {type(trial).__name__}.")
        self._trial = trial
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}.")
        self._lr_schedule = None if lr_schedule is None else Schedule(lr_schedule).lr
        self._sinks = _checked_sinks(sinks)
        check_options(options)
        self.monitor = monitor
        self._options = dict(options)
        self._monitor = None

    def _run_sinks(self, tensorboard: Callable[[], dict[str, Any]]) -> list[Sink]:
        """The sinks of a new run: the user's, or :func:`default_sinks`.

        ``tensorboard()`` is only called for the defaults; it returns ``{"writer": w}`` or
        ``{"log_dir": d}`` where the trainer already writes TensorBoard, else ``{}``.
        """
        if self._sinks is not None:
            return list(self._sinks)
        return default_sinks(**tensorboard())

    @property
    def events(self) -> list[Event]:
        """The events of the current (or last) run so far; empty before training starts."""
        return [] if self._monitor is None else self._monitor.events

    @property
    def forecaster(self) -> Forecaster | None:
        """The core forecaster (None before training starts and off the forecasting process)."""
        return None if self._monitor is None else self._monitor.forecaster

    @property
    def schedule_note(self) -> str | None:
        """Why the schedule is not exactly the planned one, when it is not."""
        return None if self._monitor is None else self._monitor.schedule_note

    @property
    def pruned(self) -> bool:
        """Whether the Optuna trial (``trial=``) was pruned and training stopped for it."""
        return self._prune_reason is not None

    def _start_run(self, model: Any, optimizer: Any) -> None:
        """After the run's Monitor is built: store the schedule on the Optuna trial (if any)
        and attach the instability probes (unless ``instability=False``)."""
        self._reporter, self._prune_reason = None, None
        if self._monitor is None:
            return
        if self._trial is not None:
            from lossforecast.integrations.optuna import TrialReporter  # needs optuna

            self._reporter = TrialReporter(self._trial, self._monitor.forecaster.schedule.lr)
        if self._options.get("instability", True) and model is not None:
            every = self._options.get("probe_every", 20)
            self._monitor.attach_probes(model, optimizer, every_n_steps=every, hook=False)

    def _report_trial(self, step: int, loss: float) -> None:
        """``trial.report`` the observed loss; remember why if the pruner says prune."""
        if self._reporter is None or self._prune_reason is not None:
            return
        if step < 0 or not math.isfinite(loss):
            return  # the loss before any update, or a non-finite one (the detectors see it)
        if self._reporter.report(step, loss):
            value = self._reporter.forecast
            shown = "" if value is None else f" (forecast final loss {value:.4g})"
            self._prune_reason = f"the Optuna pruner pruned trial {self._trial.number}{shown}"

    def _stop_decision(self, broadcast: Callable[[list], list]) -> tuple[str | None, bool]:
        """(reason to stop for ``auto_stop`` advice or None, whether the trial was pruned).

        The forecasting process decides; ``broadcast`` sends its decision to every process
        (identity on one process) so all of them stop together.
        """
        advised = None if self._monitor is None else self._monitor.stop_reason
        decision = [advised if self._options.get("auto_stop") else None, self._prune_reason]
        reason, self._prune_reason = broadcast(decision)
        return reason, self._prune_reason is not None

    def forecast(self) -> Forecast | None:
        """The latest forecast from the background fit (never waits)."""
        return None if self._monitor is None else self._monitor.forecast()

    def status(self) -> RunStatus | None:
        """Where the run stands: progress, forecast, ETA and cost to finish (None before)."""
        return None if self._monitor is None else self._monitor.status()
