"""Forecasting from a plain training loop: ``Monitor.step(loss)`` after each optimizer step."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._advice import Advisor
from ._background import BackgroundFitter
from ._compute import ComputeMeter
from ._detectors import BadBatchLog, InstabilityDetector
from ._events import Event, EventBus, forecast_event, summary_event
from ._forecaster import Forecast, Forecaster, schedule_from_state
from ._history import history_dir_from_env, history_priors, load_history, write_run_summary
from ._power import open_energy_monitor
from ._priors import Priors
from ._scorecard import Scorecard
from ._status import RunStatus, eta_text
from .sinks import ConsoleSink, Sink, TensorBoardSink

__all__ = [
    "Monitor",
    "train_loss_step",
    "join_schedule",
    "default_sinks",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

_FAILED = object()  # what a guarded call returns when it raised
_RECENT = 8  # last observations behind the smoothed loss
_RECENT_SPAN = 0.05  # ... of which those within this share of the planned steps are smoothed
_TRAJECTORY_POINTS = 32  # future steps of the predicted trajectory in a forecast event
PROBE_BUDGET = 0.01  # probes are sampled so that they take at most this share of the time


def train_loss_step(updates: int, window: int = 1) -> int:
    """Schedule step of the mean training loss of the last ``window`` batches.

    Batch ``b`` is trained on the model that updates ``0..b-1`` produced, so its loss
    measures the loss after step ``b - 1`` of the schedule (the law's ``L(s)`` is the loss
    once update ``s`` is applied). When ``updates`` optimizer steps are done, the last
    ``window`` batches are ``updates - window .. updates - 1``; their mean is placed at the
    mean of their steps, rounded down. A negative result means the window only holds the
    loss before any update (skip it).

    Examples
    --------
    >>> train_loss_step(10), train_loss_step(10, window=4)
    (8, 6)
    """
    return (2 * updates - window - 3) // 2


def join_schedule(
    saved: ArrayLike | None, start: int, future: ArrayLike
) -> tuple[NDArray[np.float64], str | None]:
    """The planned schedule of a run resumed after ``start`` steps: the past, then ``future``.

    The past comes from ``saved`` (the schedule in the saved forecaster state). Without it
    the past LR is unknown and assumed equal to ``future[0]``; the second value then says
    so, else it is None.
    """
    future = np.asarray(future, dtype=np.float64)
    if start == 0:
        return future, None
    if saved is not None and len(saved) >= start:
        return np.concatenate([np.asarray(saved, dtype=np.float64)[:start], future]), None
    note = (
        f"the LR of the {start} steps before this resumed run is unknown (no saved lossforecast "
        f"state); the forecast assumes it was {future[0]:.6g}."
    )
    return np.concatenate([np.full(start, future[0]), future]), note


def default_sinks(*, writer: Any = None, log_dir: str | os.PathLike | None = None) -> list[Sink]:
    """The sinks used when ``sinks=`` is not given: a ConsoleSink, plus TensorBoard if it can.

    TensorBoard goes into ``writer`` (a ``SummaryWriter`` that already writes the run) or
    ``log_dir``; with neither there is none. If it cannot be set up (e.g. the
    ``tensorboard`` package is missing) that is logged once and the console stays.
    """
    sinks: list[Sink] = [ConsoleSink()]
    if writer is not None or log_dir is not None:
        try:
            sinks.append(TensorBoardSink(log_dir, writer=writer))
        except (ImportError, TypeError, ValueError) as exc:
            logger.warning("lossforecast: no TensorBoard output (%s).", exc)
    return sinks


def _checked_sinks(sinks: Iterable[Sink] | None) -> list[Sink] | None:
    """``sinks`` as a list after checking each has ``write``; None stays None (the defaults)."""
    if sinks is None:
        return None
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        raise TypeError(f"`sinks` must be a list of sinks, got {type(sinks).__name__}.")
    sinks = list(sinks)
    for sink in sinks:
        if not callable(getattr(sink, "write", None)):
            raise TypeError(f"`sinks` must have a write(event) method, got {type(sink).__name__}.")
    return sinks


class Monitor:
    """Forecast the final loss from a plain PyTorch training loop.

    Call :meth:`step` with the batch loss after every ``optimizer.step()``. Losses are
    averaged over ``every_n_steps`` steps (on the loss's own device: a tensor is only read
    once per window) and fed to a :class:`~lossforecast.Forecaster`, which is refitted on a
    background thread; :meth:`forecast` returns the latest forecast without waiting. No
    error inside lossforecast reaches the training loop: it is logged once and counted in
    :attr:`n_errors`.

    Each time a new background fit is ready, a forecast event goes to the sinks (see
    :func:`~lossforecast.forecast_event`): the forecast of the final loss with its interval,
    the observed smoothed loss and the residual at the latest observed step, the predicted
    trajectory for the rest of the planned schedule (33 steps from the latest observed one
    to the last, from the latest fit: nothing is fitted on the training thread) and, once
    the step rate is known, ``seconds_to_finish`` (at the mean rate since the first
    observation). :meth:`finish` ends the run with one summary event that compares the last
    forecast with the loss reached, then closes the sinks with a bounded wait. The smoothed
    loss is the mean of the last 8 observed losses (those within 5% of the planned steps of
    the latest) moved along the fitted curve to the latest step (no moving-average lag);
    the residual is that minus the prediction there. The summary's reached loss is this
    smoothed loss at the last step, on the final fit.

    Parameters
    ----------
    lr_schedule : array_like, shape (T,), optional
        Planned LR of every optimizer step. If not given, it is captured from ``scheduler``
        (or ``optimizer``) by simulating a copy of it for ``total_steps`` steps (needs torch).
    optimizer : torch.optim.Optimizer, optional
        Optimizer whose parameter group 0 sets the LR. Defaults to ``scheduler.optimizer``.
        Without a scheduler its current LR is assumed for the whole run.
    scheduler : torch LR scheduler, optional
        Scheduler stepped once after every optimizer step. ``ReduceLROnPlateau`` (or one
        that cannot be copied) is reported once and the current LR is assumed from then on.
    total_steps : int, optional
        Planned number of optimizer steps; required unless ``lr_schedule`` is given (then
        it must equal its length).
    every_n_steps : int, optional
        Steps per averaged observation. Default 1.
    sinks : list of Sink, optional
        Where events go (``lossforecast.sinks``). Default: a
        :class:`~lossforecast.sinks.ConsoleSink`, plus a
        :class:`~lossforecast.sinks.TensorBoardSink` when ``log_dir`` is given. ``[]``: none
        (the events are still kept in :attr:`events`).
    log_dir : str or os.PathLike, optional
        Run folder for the default TensorBoard sink (needs ``tensorboard``).
    run_dir : str or os.PathLike, optional
        Folder for the files written at the end of the run (the scorecard,
        ``lossforecast_scorecard.json``); ``log_dir`` by default, none without either.
    target_loss : float, optional
        A loss you want to reach: forecast events then say at which step (and after how
        much time and energy) the forecast reaches it (``cost/target_loss_step``, ...), and
        the advice says when the run will not reach it.
    reference : float or str or os.PathLike, optional
        Best final loss of other runs (a number, or a file or folder of past run summaries):
        the advice says when this run will not beat it.
    advisor : Advisor, optional
        The early-stop advice with your own settings (``min_improvement``, cooldown shape,
        confidence, ...); by default ``Advisor(target_loss=..., reference=...)``. After each
        new fit its new advice goes to the sinks as ``"advice"`` events.
    model : torch.nn.Module, optional
        The model, for the instability probes (max attention logit per layer, output log Z,
        gradient, parameter and update norms, Adam's second moment; see
        ``lossforecast.integrations.torch.Probes``), sampled every ``probe_every`` steps.
        With ``optimizer`` too, the probes hook its ``step()`` themselves.
    probe_every : int, optional
        Steps between probe samples. Default 20; stretched to a multiple of it where a
        probe step would otherwise take more than 1% of the training time (fast steps of
        small models), so that probing never slows training noticeably.
    amp : object, optional
        Where the dynamic loss scaler is (a ``torch.amp.GradScaler``, a Lightning trainer,
        an HF accelerator): a run of skipped steps or a collapsing scale is warned about.
    instability : bool, optional
        Watch for instabilities (loss spikes against the forecast, non-finite losses,
        divergence, probe trends, stalls). Spikes and non-finite losses are also recorded
        to ``run_dir/skip_batches.json`` in the shape of Lightning's ``SpikeDetection``.
        Default True.
    auto_stop : bool, optional
        Act on stop-worthy advice (will not reach the target or beat the reference with the
        advisor's confidence, diverged): :attr:`stop_reason` is set, which the callbacks
        turn into a clean stop after a checkpoint. Default False: advice only.
    energy : bool, optional
        Measure energy: the GPUs in ``cuda_devices`` through NVML, or on a CPU run the
        RAPL counters where readable, sampled on a background thread every second. Where
        nothing can be read, one info message says why and energy figures are left out.
        Default True.
    cuda_devices : list of int or str, optional
        CUDA devices this process trains on (see
        ``lossforecast.integrations.flops.cuda_device_ids``); default every visible GPU.
    flops_per_step, tokens_per_step : float, optional
        Model FLOPs and tokens of one optimizer step on this process (e.g. from
        ``lossforecast.integrations.flops.count_flops``), for FLOP/s, tokens/s, MFU and
        FLOPs to finish. Settable later on :attr:`compute`.
    peak_flops : float, optional
        Peak FLOP/s of this process's device, for MFU (see ``lossforecast._compute.peak_flops``).
    world_size : int, optional
        Processes training alike (data parallel); totals are this process's times it.
    history_dir : str or os.PathLike, optional
        Folder of past-run summaries (default: the ``LOSSFORECAST_HISTORY`` environment
        variable, else none). The summaries of similar past runs (same ``labels`` first)
        sharpen the priors before this run's own data can; at :meth:`finish` this run
        adds its own summary. Bad files in the folder are skipped with one message.
    labels : dict of str to str, optional
        What this run is, e.g. ``{"model": "gpt-124m", "data": "owt"}``: runs with the same
        labels count most as history.
    run_name : str, optional
        Name of the run in its summary file.
    **forecaster_options
        Passed to :class:`~lossforecast.Forecaster` (``law``, ``target_step``,
        ``coverage``, ``max_bins``, ``min_points``, ``priors``).

    Attributes
    ----------
    forecaster : Forecaster
        The forecaster fed; ``forecaster.forecast()`` refits synchronously.
    schedule_note : str or None
        Why the schedule is not exactly the planned one, when it is not.
    n_errors : int
        Errors caught inside lossforecast.
    bus : EventBus
        The bus that keeps the events and feeds the sinks (e.g. to emit your own events).
    events : list of Event
        The events emitted so far.

    Raises
    ------
    ValueError
        If neither a schedule nor an optimizer or scheduler is given, if ``total_steps`` or
        ``every_n_steps`` is not a positive int, if ``sinks`` and ``log_dir`` are both
        given, or if a forecaster option is invalid.
    TypeError
        If a sink has no ``write`` method.

    Examples
    --------
    >>> import numpy as np
    >>> lr = np.r_[np.linspace(1e-4, 1e-3, 50), np.full(950, 1e-3)]
    >>> mon = Monitor(lr, every_n_steps=10, sinks=[])
    >>> for s in range(400):
    ...     mon.step(3.0 + 2.0 * (s + 1) ** -0.5)
    >>> f = mon.forecaster.forecast()
    >>> f.step, f.low < f.loss < f.high
    (999, True)
    >>> mon.close()
    True
    """

    def __init__(
        self,
        lr_schedule: ArrayLike | None = None,
        *,
        optimizer: Any = None,
        scheduler: Any = None,
        total_steps: int | None = None,
        every_n_steps: int = 1,
        sinks: Iterable[Sink] | None = None,
        log_dir: str | os.PathLike | None = None,
        run_dir: str | os.PathLike | None = None,
        target_loss: float | None = None,
        energy: bool = True,
        cuda_devices: list[int | str] | None = None,
        flops_per_step: float | None = None,
        tokens_per_step: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        reference: float | str | os.PathLike | None = None,
        advisor: Advisor | None = None,
        auto_stop: bool = False,
        model: Any = None,
        probe_every: int = 20,
        amp: Any = None,
        instability: bool = True,
        history_dir: str | os.PathLike | None = None,
        labels: dict[str, str] | None = None,
        run_name: str | None = None,
        **forecaster_options: Any,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        if total_steps is not None:
            _check_positive_int("total_steps", total_steps)
        sinks = _checked_sinks(sinks)
        if sinks is not None and log_dir is not None:
            raise ValueError(
                "`log_dir` sets up the default sinks; with `sinks=` add "
                f"TensorBoardSink({os.fspath(log_dir)!r}) to them instead."
            )
        if lr_schedule is None:
            if optimizer is None and scheduler is None:
                raise ValueError(
                    "give `lr_schedule`, or `optimizer` and/or `scheduler` with `total_steps`."
                )
            if total_steps is None:
                raise ValueError(
                    "`total_steps` is needed to capture the schedule from `optimizer`/`scheduler`."
                )
            if optimizer is None:
                optimizer = getattr(scheduler, "optimizer", None)
                if optimizer is None:
                    raise ValueError(
                        f"`scheduler` has no `.optimizer`; pass `optimizer=`, got {scheduler!r}."
                    )
            self._capture_from = (optimizer, scheduler)
            lr, self.schedule_note = self._capture(total_steps)
            if self.schedule_note is not None:
                logger.warning("lossforecast: %s", self.schedule_note)
        else:
            lr = np.asarray(lr_schedule, dtype=np.float64)
            if total_steps is not None and lr.ndim == 1 and len(lr) != total_steps:
                raise ValueError(
                    f"`total_steps` is {total_steps} but `lr_schedule` has {len(lr)} steps."
                )
            self._capture_from = None
            self.schedule_note = None
        self.every_n_steps = int(every_n_steps)
        self._options = dict(forecaster_options)
        self.history_dir = history_dir if history_dir is not None else history_dir_from_env()
        self.labels, self.run_name = labels, run_name
        if self.history_dir is not None and self._options.get("priors") is None:
            self._options["priors"] = self._history_priors(lr)
        self.forecaster = Forecaster(lr, **self._options)
        self._fitter = BackgroundFitter(self.forecaster)
        self._updates = 0
        self._window_start = 0
        self._window = LossWindow()
        self._failed: set[str] = set()
        self.n_errors = 0
        self._latest: Forecast | None = None
        self._forecast_fits = -1
        self._recent: deque[tuple[float, int, float]] = deque(maxlen=_RECENT)  # time, step, loss
        self._first_seen: tuple[float, int] | None = None  # time, step: for the step rate
        self._emitted: Forecast | None = None  # last forecast sent as an event
        self._n_forecasts = 0
        self._finished = False
        self.bus = EventBus(default_sinks(log_dir=log_dir) if sinks is None else sinks)
        self.run_dir = run_dir if run_dir is not None else log_dir
        self._scorecard = Scorecard(self.forecaster.schedule.total_steps)
        if target_loss is not None and not (
            isinstance(target_loss, (int, float)) and math.isfinite(target_loss)
        ):
            raise ValueError(f"`target_loss` must be a finite number, got {target_loss!r}.")
        self.target_loss = target_loss
        if advisor is not None and not isinstance(advisor, Advisor):
            raise TypeError(f"`advisor` must be an Advisor, got {type(advisor).__name__}.")
        if advisor is None:
            advisor = Advisor(target_loss=target_loss, reference=reference)
        elif target_loss is not None or reference is not None:
            raise ValueError("give `target_loss` and `reference` to the `advisor`, not both.")
        self.advisor = advisor
        self.auto_stop = bool(auto_stop)
        self.stop_reason: str | None = None
        self._n_warnings = 0  # warnings emitted, and the messages of the advice emitted
        self._advice_given: list[str] = []
        self.detector: InstabilityDetector | None = None
        if instability:
            spikes = None if self.run_dir is None else BadBatchLog(self.run_dir)
            self.detector = InstabilityDetector(bad_batches=spikes)
        self.probes = self._amp = None
        self._probe_metrics: dict[str, float] = {}
        self._last_tick: tuple[int, float] | None = None
        self._told_diverged = False
        if model is not None:
            self.attach_probes(model, optimizer, every_n_steps=probe_every)
        if amp is not None:
            from lossforecast.integrations.torch import AmpReader  # needs torch

            self._amp = AmpReader(amp)
        self.compute = ComputeMeter(
            flops_per_step=flops_per_step,
            tokens_per_step=tokens_per_step,
            peak_flops=peak_flops,
            world_size=world_size,
        )
        if energy:
            self.compute.energy = self._guard(
                "start energy measurement", open_energy_monitor, cuda_devices
            )
            if self.compute.energy is _FAILED:
                self.compute.energy = None

    @classmethod
    def for_run(
        cls,
        total_steps: int,
        capture: Callable[[int], tuple[ArrayLike, str | None]] | None = None,
        *,
        lr_schedule: ArrayLike | None = None,
        start_step: int = 0,
        state: dict | None = None,
        sinks: Iterable[Sink] | None = None,
        run_dir: str | os.PathLike | None = None,
        **forecaster_options: Any,
    ) -> Monitor:
        """A monitor for a run of ``total_steps`` steps that starts (or resumes) at ``start_step``.

        For framework adapters; events go to ``sinks``. The schedule is ``lr_schedule`` if
        given, else the saved past (from ``state``) followed by
        ``capture(total_steps - start_step)``, which returns the next LRs and a note (or
        None) saying why they are not exact. ``state`` (a :meth:`state_dict`) is restored
        when given; one that cannot be is logged and skipped.
        Every note is logged once as a warning and kept in :attr:`schedule_note`.
        """
        if lr_schedule is not None:
            lr, note = np.asarray(lr_schedule, dtype=np.float64), None
            if len(lr) != total_steps:
                logger.warning(
                    "lossforecast: `lr_schedule` has %d steps but the trainer plans %d.",
                    len(lr),
                    total_steps,
                )
        else:
            if capture is None:
                raise ValueError("give `lr_schedule` or `capture`.")
            future, capture_note = capture(total_steps - start_step)
            past = schedule_from_state(state["forecaster"]) if state else None
            lr, note = join_schedule(past, start_step, future)
            note = note or capture_note
        if note is not None:
            logger.warning("lossforecast: %s", note)
        monitor = cls(lr, sinks=sinks, run_dir=run_dir, **forecaster_options)
        monitor.schedule_note = note
        if state:
            try:
                monitor.load_state_dict(state)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("lossforecast: saved state not restored (%s); starting afresh.", exc)
        return monitor

    # ------------------------------------------------------------------ feeding
    def step(self, loss: Any) -> None:
        """Record the loss of the batch just trained; call once after each ``optimizer.step()``.

        ``loss`` is a float or a tensor (detached and summed on its device, read once per
        window).
        """
        self._updates += 1
        self.tick(self._updates)
        self._guard("record the loss", self._window.add, loss)
        total = self.forecaster.schedule.total_steps
        if self._updates % self.every_n_steps and self._updates != total:
            return
        mean = self._guard("read the loss", self._window.take_mean)
        window = self._updates - self._window_start
        self._window_start = self._updates
        if mean is not None and mean is not _FAILED:
            self.observe(train_loss_step(self._updates, window), mean)

    def tick(self, updates: int) -> None:
        """Note that ``updates`` optimizer steps are done (O(1); for step time and throughput).

        :meth:`step` calls it; framework callbacks call it after every optimizer step.
        """
        updates = int(updates)
        now = time.monotonic()
        if self._last_tick is not None and updates > self._last_tick[0]:
            seconds = (now - self._last_tick[1]) / (updates - self._last_tick[0])
            if self.detector is not None:
                self._warn(self.detector.observe_step_time, updates, seconds)
        self._last_tick = (updates, now)
        self._updates = max(self._updates, updates)
        self.compute.record_step(self._updates)

    def before_optimizer_step(self, step: int) -> None:
        """Probes: read gradients and Adam's state before optimizer ``step`` (sampled steps).

        Call after backward (gradients unscaled) and before ``optimizer.step()``; the
        callbacks and a ``Monitor`` given ``model`` and ``optimizer`` do it for you.
        """
        if self.probes is not None:
            self._guard("probe the gradients", self.probes.before_optimizer_step, step)

    def after_optimizer_step(self, step: int) -> None:
        """Probes: read the update of optimizer ``step`` and check every probe metric."""
        if self.probes is not None:
            metrics = self._guard("probe the model", self.probes.after_optimizer_step, step)
            if metrics and metrics is not _FAILED:
                self._probe_metrics = {_probe_tag(k): v for k, v in metrics.items()}
                if self.detector is not None:
                    self._warn(self.detector.observe_metrics, step, metrics)
        if self._amp is not None and self.detector is not None:
            read = self._guard("read the loss scale", self._amp.read)
            if read and read is not _FAILED:
                self._warn(self.detector.observe_amp, step, *read)

    def observe(self, step: int, loss: float, *, batch_idx: int | None = None) -> Forecast | None:
        """Record ``loss`` at schedule ``step`` and ask for a background refit (never raises).

        The loss is also checked for spikes against the forecast, non-finite values and
        divergence (``batch_idx``, where known, goes into the bad-batch record).

        Returns
        -------
        Forecast or None
            The latest forecast if a new background fit became ready since the last
            forecast event (it is emitted as one now), else None.
        """
        if step < 0:
            return None
        if self._guard("update the forecaster", self.forecaster.update, step, loss) is _FAILED:
            return None
        self._fitter.notify()
        value = float(loss)
        if self.detector is not None:
            self._guard("check the loss", self._check_loss, int(step), value, batch_idx)
        now = time.monotonic()
        if self._first_seen is None:
            self._first_seen = (now, int(step))
        if math.isfinite(value):
            self._recent.append((now, int(step), value))
        forecast = self.forecast()
        if forecast is None or self._finished:
            return None
        if self._emitted is not None and forecast.observed_step == self._emitted.observed_step:
            return None
        self._emitted = forecast
        self._guard("report the forecast", self._emit_forecast, forecast)
        return forecast

    @property
    def updates(self) -> int:
        """Optimizer steps seen (including those before a restored state)."""
        return self._updates

    # ------------------------------------------------------------------ reading
    def forecast(self) -> Forecast | None:
        """The latest forecast, from the last background fit (never waits, never raises)."""
        fits = self._fitter.n_fits
        if fits != self._forecast_fits:  # recompute only after a new background fit
            result = self._guard("read the forecast", self.forecaster.forecast, refit=False)
            self._latest = None if result is _FAILED else result
            self._forecast_fits = fits
        return self._latest

    def status(self) -> RunStatus:
        """Where the run stands: progress, latest forecast, time (and cost) to finish."""
        total = self.forecaster.schedule.total_steps
        cost = self._cost()
        seconds = cost.pop("seconds_to_finish", None)
        if seconds is None:
            seconds = self._seconds_to_finish(total)
        observed = self._recent[-1][1] + 1 if self._recent else 0
        return RunStatus(
            step=max(self._updates, observed),
            total_steps=total,
            forecast=self._emitted,
            seconds_to_finish=seconds,
            eta=None if seconds is None else eta_text(seconds, time.time()),
            cost=cost,
            warnings=self._n_warnings,
            advice=tuple(self._advice_given),
            stop_reason=self.stop_reason,
        )

    def emit(self, event: Event) -> None:
        """Send ``event`` to the sinks with the run's status numbers added (never raises).

        Warnings and advice carry ``progress``, ``seconds_to_finish`` and ``eta`` too, so
        every webhook payload says when the run will end.
        """
        if event.kind != "forecast":
            data = {**self.status().data(), **event.data}
            event = Event(event.kind, event.severity, event.step, event.message, data, event.time)
        if event.kind == "warning":
            self._n_warnings += 1
        elif event.kind == "advice":
            self._advice_given.append(event.message)
        self._guard("report an event", self.bus.emit, event)

    @property
    def events(self) -> list[Event]:
        """The events emitted so far (forecasts and, after :meth:`finish`, the summary)."""
        return self.bus.events

    def finish(self, timeout: float = 5.0, *, step: int | None = None) -> Forecast | None:
        """End of training: stop fitting, emit the summary, close the sinks (never raises).

        Makes one last synchronous fit, unless background fits have been failing, and
        returns its forecast. The summary event compares the last forecast event with the
        loss reached at ``step`` (the last optimizer step; by default the last one
        :meth:`step` saw, or the last observed step). Fitting and the sinks are each given
        at most ``timeout`` seconds.
        """
        if step is not None:
            self._updates = max(self._updates, int(step) + 1)
        self._fitter.close(timeout)
        self._stop_energy()
        if self._fitter.n_errors:
            final = self.forecast()
        else:
            result = self._guard("fit the final forecast", self.forecaster.forecast)
            final = None if result is _FAILED else result
        if not self._finished:
            self._finished = True
            self._guard("report the summary", self._emit_summary, step)
        self.bus.close(timeout)
        return final

    def close(self, timeout: float = 5.0) -> bool:
        """Stop background fitting and close the sinks (no summary: see :meth:`finish`).

        Waits at most ``timeout`` seconds for each; True if the fitting thread stopped.
        """
        stopped = self._fitter.close(timeout)
        self._stop_energy()
        self._finished = True
        self.bus.close(timeout)
        return stopped

    @property
    def fitter(self) -> BackgroundFitter:
        """The background fitter (its ``n_fits``, ``n_errors`` and ``fit_seconds``)."""
        return self._fitter

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-safe state: optimizer steps seen and the forecaster's state."""
        return {
            "version": STATE_VERSION,
            "updates": self._updates,
            "forecaster": self.forecaster.state_dict(),
            "advisor": self.advisor.state_dict(),
            "detector": None if self.detector is None else self.detector.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` output (not modified).

        A schedule captured from a scheduler is captured again from its current state (the
        resumed one) and joined to the saved past, so a run whose length changed on resume
        keeps a correct schedule.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state has version {state.get('version')!r}, expected {STATE_VERSION}."
            )
        updates = int(state["updates"])
        saved = state["forecaster"]
        total = self.forecaster.schedule.total_steps
        if self._capture_from is not None and 0 < updates < total:
            future, self.schedule_note = self._capture(total - updates)
            lr, _ = join_schedule(schedule_from_state(saved), updates, future)
            self._fitter.close(0.0)
            self.forecaster = Forecaster(lr, **self._options)
            self._fitter = BackgroundFitter(self.forecaster)
        self.forecaster.load_state_dict({**saved, "lr_schedule": self.forecaster.schedule.lr})
        if "advisor" in state:
            self.advisor.load_state_dict(state["advisor"])
        if state.get("detector") and self.detector is not None:
            self.detector.load_state_dict(state["detector"])
        self._updates = self._window_start = updates
        self._window = LossWindow()
        self._latest, self._forecast_fits = None, -1
        self._recent.clear()
        self._first_seen = None
        self._emitted = None

    # ------------------------------------------------------------------ events
    def _emit_forecast(self, forecast: Forecast) -> None:
        """Emit a forecast event: smoothed loss, residual, trajectory and ETA at the latest step."""
        total = self.forecaster.schedule.total_steps
        step = self._recent[-1][1] if self._recent else forecast.observed_step
        future = np.unique(np.linspace(step, total - 1, _TRAJECTORY_POINTS + 1).round())
        future = future.astype(np.int64)
        extra = {**self.status().data(), **self._probe_metrics}
        smoothed = self._smoothed(step, future)
        if smoothed is None:
            event = forecast_event(forecast, step=step, extra=extra)
        else:
            level, residual, (loss, low, high) = smoothed
            event = forecast_event(
                forecast,
                step=step,
                observed_loss=level,
                residual=residual,
                trajectory=(future, loss, low, high),
                extra=extra,
            )
        self._n_forecasts += 1
        self._scorecard.record(step, forecast)
        self.bus.emit(event)
        self._guard("give advice", self._advise, step, event.data.get("kwh_to_finish"))

    def _smoothed(self, step: int, extra_steps: NDArray[np.int64]) -> tuple | None:
        """(smoothed loss at ``step``, its residual, predictions at ``extra_steps``) or None.

        Uses the latest fit only: the mean residual of the recent observations against the
        fitted curve, added to the prediction at ``step``.
        """
        if not self._recent:
            return None
        last = self._recent[-1][1]
        span = _RECENT_SPAN * self.forecaster.schedule.total_steps
        seen = np.array([s for _, s, _ in self._recent if last - s <= span], dtype=np.int64)
        losses = np.array([v for _, s, v in self._recent if last - s <= span])
        steps = np.union1d(np.union1d(seen, extra_steps), [step])
        predicted = self.forecaster.trajectory(steps, refit=False)
        if predicted is None:
            return None
        loss, low, high = predicted
        residual = float(np.mean(losses - loss[np.searchsorted(steps, seen)]))
        level = float(loss[np.searchsorted(steps, step)]) + residual
        at = np.searchsorted(steps, extra_steps)
        return level, residual, (loss[at], low[at], high[at])

    def _check_loss(self, step: int, loss: float, batch_idx: int | None) -> None:
        """Spikes against the latest fit's prediction, non-finite losses, divergence."""
        predicted = None
        if self._emitted is not None and math.isfinite(loss):
            curve = self.forecaster.trajectory([step], refit=False)
            predicted = None if curve is None else float(curve[0][0])
        self._warn(self.detector.observe_loss, step, loss, predicted=predicted, batch_idx=batch_idx)
        if self.detector.diverged and not self._told_diverged:
            self._told_diverged = True
            reason = (
                f"the loss diverged ({loss:.4g} at step {step}; best {self.detector.best_loss:.4g})"
            )
            self._advise(step, None, diverged=reason)

    def _warn(self, check: Callable[..., list[Event]], *args: Any, **kwargs: Any) -> None:
        """Emit the warnings a detector check returns (never raises)."""
        events = self._guard("check for instabilities", check, *args, **kwargs)
        if events and events is not _FAILED:
            for event in events:
                self.emit(event)

    def attach_probes(
        self, model: Any, optimizer: Any = None, *, every_n_steps: int = 20, hook: bool = True
    ) -> None:
        """Attach the instability probes to ``model`` (needs torch; never raises).

        With ``hook`` and an ``optimizer``, its ``step()`` calls :meth:`before_optimizer_step`
        and :meth:`after_optimizer_step` (plain loops); the callbacks call them from their
        own hooks instead.
        """
        from lossforecast.integrations.torch import Probes  # needs torch

        probes = self._guard(
            "attach the probes",
            Probes,
            model,
            optimizer,
            every_n_steps=every_n_steps,
            max_overhead=PROBE_BUDGET,
        )
        if probes is _FAILED or self._guard("attach the probes", probes.attach) is _FAILED:
            return
        self.probes = probes
        if hook and optimizer is not None:
            optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step(self._updates))
            optimizer.register_step_post_hook(lambda *_: self.after_optimizer_step(self._updates))

    def _advise(self, step: int, kwh_to_finish: float | None, diverged: str | None = None) -> None:
        """Emit the advisor's new advice; with ``auto_stop``, keep the first reason to stop."""
        for advice in self.advisor.advise(
            self.forecaster, step, diverged=diverged, kwh_to_finish=kwh_to_finish
        ):
            self.emit(advice.to_event())
            if advice.stop and self.auto_stop and self.stop_reason is None:
                self.stop_reason = advice.message
                logger.warning("lossforecast: stopping the run (auto_stop): %s", advice.message)

    def _cost(self) -> dict[str, float | int]:
        """Throughput, energy and what finishing costs, from the latest fit (never fits)."""
        out: dict[str, float | int] = dict(self.compute.metrics())
        if self._recent and self._emitted is not None:
            step = self._recent[-1][1]
            cost = self.compute.cost_to_finish(self.forecaster, step, target_loss=self.target_loss)
            out.update(cost.data())
        return out

    def _seconds_to_finish(self, total: int) -> float | None:
        """Time left at the mean step rate since the first observation (None until known)."""
        if self._first_seen is None or not self._recent:
            return None
        (t0, s0), (t1, s1, _) = self._first_seen, self._recent[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return max(total - 1 - s1, 0) * (t1 - t0) / (s1 - s0)

    def _emit_summary(self, step: int | None) -> None:
        """Emit the end-of-training summary (nothing if no loss was ever observed)."""
        if not self._recent:
            return
        total = self.forecaster.schedule.total_steps
        if step is None:
            step = max(self._updates - 1, self._recent[-1][1])
        step = int(min(max(step, 0), total - 1))
        smoothed = self._smoothed(step, np.array([step], dtype=np.int64))
        reached = (
            smoothed[0] if smoothed is not None else float(np.mean([v for *_, v in self._recent]))
        )
        # the status too (time, energy, FLOPs spent and left), as every event carries it
        extra = {**self.status().data(), "reached_step": step, "forecasts": self._n_forecasts}
        extra.update(self._scorecard.data(reached, step))
        self.bus.emit(summary_event(step, reached, self._emitted, extra=extra))
        if self.run_dir is not None:
            path = self._scorecard.write(self.run_dir, reached, step)
            logger.info("lossforecast: scorecard written to %s", path)
        if self.history_dir is not None:
            self._guard("write the run summary", self._write_history, reached)

    # ------------------------------------------------------------------ helpers
    def _history_priors(self, lr: ArrayLike) -> Priors | None:
        """The shipped priors sharpened by the past runs in :attr:`history_dir` (None: shipped)."""
        summaries = load_history(self.history_dir)
        if not summaries:
            return None
        law = self._options.get("law", "multi-power")
        priors = self._guard(
            "learn from past runs",
            history_priors,
            Priors.default(),
            summaries,
            law=law,
            labels=self.labels,
            schedule=lr,
        )
        if priors is _FAILED:
            return None
        logger.info("lossforecast: priors sharpened by %d past runs.", len(summaries))
        return priors

    def _write_history(self, reached: float) -> None:
        """Add this run's summary to :attr:`history_dir` (one more fit, under a second)."""
        write_run_summary(
            self.history_dir,
            self.forecaster,
            final_loss=reached,
            labels=self.labels,
            run_name=self.run_name,
        )

    def _stop_energy(self) -> None:
        """Stop the energy sampler and detach the probes (end of the run)."""
        if self.compute.energy is not None:
            self._guard("stop energy measurement", self.compute.energy.close)
        if self.probes is not None:
            self._guard("detach the probes", self.probes.detach)

    def _capture(self, n_steps: int) -> tuple[NDArray[np.float64], str | None]:
        from lossforecast.integrations._schedule_capture import capture_schedule  # needs torch

        optimizer, scheduler = self._capture_from
        captured = capture_schedule(
            optimizer, [scheduler] if scheduler is not None else [], n_steps
        )
        return captured.lr, captured.note

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; on error log once per ``what``, count it and return ``_FAILED``."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.n_errors += 1
            if what not in self._failed:
                self._failed.add(what)
                logger.warning(
                    "lossforecast: could not %s (%s: %s); training goes on.",
                    what,
                    type(exc).__name__,
                    exc,
                )
            return _FAILED

    def __repr__(self) -> str:
        return (
            f"Monitor(updates={self._updates}, every_n_steps={self.every_n_steps}, "
            f"forecaster={self.forecaster!r})"
        )


class LossWindow:
    """Losses since the last read; tensors stay on their device until read.

    Adding is a list append (no device work on the training step); a read sums them with
    one stack.
    """

    def __init__(self) -> None:
        self._values: list[Any] = []

    @property
    def count(self) -> int:
        """Losses added since the last read."""
        return len(self._values)

    def add(self, loss: Any) -> None:
        """Add one loss (a float or a tensor, detached first)."""
        detach = getattr(loss, "detach", None)
        self._values.append(detach() if detach is not None else float(loss))

    def take_sum(self) -> tuple[Any, int]:
        """(sum, count) so far, then start over."""
        values, self._values = self._values, []
        if not values:
            return None, 0
        torch = sys.modules.get("torch")  # tensors mean torch is loaded; the core never imports it
        if torch is not None and all(isinstance(v, torch.Tensor) for v in values):
            with contextlib.suppress(RuntimeError):  # shapes or devices that do not stack
                return torch.stack(values).sum(), len(values)
        return sum(values[1:], values[0]), len(values)

    def take_mean(self) -> float | None:
        """Mean so far as a float (None if empty), then start over."""
        total, count = self.take_sum()
        return None if count == 0 else float(total) / count


def _probe_tag(name: str) -> str:
    """Event data key of a probe metric: ``probe/grad_norm``, per layer ``probe/layers/...``.

    Per-layer metrics (``grad_norm/net.0``) go under their own folder so that no tag is
    also the folder of another, which file-based trackers such as MLflow cannot store.

    Examples
    --------
    >>> _probe_tag("grad_norm"), _probe_tag("grad_norm/net.0")
    ('probe/grad_norm', 'probe/layers/grad_norm/net.0')
    """
    return f"probe/layers/{name}" if "/" in name else f"probe/{name}"


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
