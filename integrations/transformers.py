"""Hugging Face ``TrainerCallback`` that forecasts the final loss while a ``Trainer`` trains."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from lossforecast import Monitor
from lossforecast._callbacks import MonitorAccess, never_raises
from lossforecast._compute import WorldEnergy
from lossforecast._monitor import train_loss_step
from lossforecast.sinks import MetricsSink

from ._rank_energy import RankEnergy

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError:  # pragma: no cover - depends on what is installed
    TrainerCallback = None
    ExportableState = None

__all__ = ["LossForecastCallback"]

logger = logging.getLogger(__name__)

_Bases: tuple[type, ...] = tuple(
    b for b in (TrainerCallback, ExportableState) if b is not None
) or (object,)


class LossForecastCallback(MonitorAccess, *_Bases):
    """Forecast the final loss of a Hugging Face ``Trainer`` run from its planned LR schedule.

    With no arguments everything is found on the trainer: ``state.max_steps``, the full LR
    schedule (captured when training begins by simulating a copy of the trainer's
    ``lr_scheduler``, which steps once per optimizer step, gradient accumulation included)
    and the logged ``loss``. Fitting runs on a background thread.

    Parameters
    ----------
    monitor : str, optional
        ``"loss"`` (default): the training loss the Trainer logs every ``logging_steps``
        steps. It is the mean over the steps since the previous log (and across processes),
        so it is placed at the mean step of that window, not at the logging step. Any other
        logged key (e.g. ``"eval_loss"``) is taken as the value at the step it is logged.
    lr_schedule : array_like, optional
        Planned LR of every optimizer step, instead of capturing it.
    sinks : list of Sink, optional
        Where events go (``lossforecast.sinks``). Default: a
        :class:`~lossforecast.sinks.ConsoleSink`, plus a
        :class:`~lossforecast.sinks.TensorBoardSink` when ``report_to`` includes
        ``"tensorboard"``, into the folder HF's TensorBoard callback writes. ``[]``: none.
    log_to_loggers : bool, optional
        Also pass the event scalars (``lossforecast/forecast/final_loss``, ``.../low``,
        ``.../high``, ``lossforecast/seconds_to_finish``, ``lossforecast/events/warnings``,
        ...: see :class:`~lossforecast.EventScalars`) to the ``report_to`` reporters (W&B,
        MLflow, ...) with the next logs, and add them to ``logs`` and ``state.log_history``.
        Default True.
    trial : optuna.trial.Trial, optional
        Report the logged loss to this trial (the planned schedule stored once) and stop
        training when its pruner says so (use
        ``lossforecast.integrations.optuna.ForecastPruner``); :attr:`pruned` then says so
        and ``forecast_value(trial)`` gives the forecast to return from the objective.
    **options
        Passed to :class:`~lossforecast.Monitor`: its own options (``target_loss``,
        ``reference``, ``advisor``, ``auto_stop``, ``history_dir``, ``labels``, ``energy``,
        ``flops_per_step``, ``peak_flops``, ``instability``, ``probe_every``, ...) and the
        :class:`~lossforecast.Forecaster` ones (``law``, ``coverage``, ...).

    Attributes
    ----------
    forecaster : Forecaster or None
        The core forecaster, built when training begins (on the main process only).
    schedule_note : str or None
        Why the captured schedule is not the exact planned one, else None.
    events : list of Event
        The events of the run so far: a forecast event per new background fit and, at the
        end of training, one summary (see :class:`~lossforecast.Monitor`).

    Notes
    -----
    The forecast follows parameter group 0. When a new fit is ready a forecast event goes
    to the sinks. The Trainer calls its reporters before user callbacks, so the reporters
    already called for a log get the new scalars from this callback directly; TensorBoard
    gets its ``lossforecast/`` scalars from the TensorBoard sink. The TensorBoard folder is
    ``TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers < 5), else the
    newest folder under ``output_dir/runs`` (the one HF's callback has just made). At the
    end of training a summary event compares the last forecast with the loss reached and
    the sinks are closed with a bounded wait.

    The state is saved in each checkpoint's ``trainer_state.json`` under
    ``stateful_callbacks`` (``ExportableState``). A resumed run reads it back itself, so
    keep ``restore_callback_states_from_checkpoint=False`` (the default): with True the
    Trainer replaces this object by a new one and your reference stops being updated.

    Examples
    --------
    >>> from lossforecast.integrations.transformers import LossForecastCallback
    >>> cb = LossForecastCallback(coverage=0.9)
    >>> cb.state()["args"]
    {'monitor': 'loss', 'lr_schedule': None, 'log_to_loggers': True, 'coverage': 0.9}
    """

    def __init__(
        self,
        monitor: str = "loss",
        *,
        lr_schedule: Any = None,
        sinks: Any = None,
        log_to_loggers: bool = True,
        trial: Any = None,
        **forecaster_options: Any,
    ) -> None:
        if TrainerCallback is None:
            raise ImportError(
                'LossForecastCallback needs transformers: pip install "lossforecast[transformers]".'
            )
        self._configure(monitor, lr_schedule, forecaster_options, sinks, trial)
        self.log_to_loggers = bool(log_to_loggers)
        self._pending: dict[str, float] = {}  # event scalars not yet passed to the reporters
        self._reporters_before: list[Any] = []  # reporters the Trainer calls before this one
        self._last_log_step = 0
        self._last_step = -1
        self._flos = (0, 0.0)  # (step, state.total_flos) at the last log

    def state(self) -> dict:
        """``ExportableState``: constructor arguments and the forecaster state, JSON-safe."""
        args = {
            "monitor": self.monitor,
            "lr_schedule": None if self._lr_schedule is None else self._lr_schedule.tolist(),
            "log_to_loggers": self.log_to_loggers,
        }
        args.update(
            {
                k: os.fspath(v) if isinstance(v, os.PathLike) else v
                for k, v in self._options.items()
                if k != "priors"
            }
        )
        saved = None if self._monitor is None else self._monitor.state_dict()
        return {"args": args, "attributes": {"saved_state": saved}}

    # ------------------------------------------------------------------ hooks
    @never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Capture the planned schedule and build the forecaster (main process)."""
        if self._monitor is not None:
            self._monitor.close(timeout=1.0)
        self._monitor = None
        self._close_rank_energy()
        start = self._last_log_step = state.global_step
        self._last_step = -1
        self._flos = (start, state.total_flos)
        if start >= state.max_steps:
            return
        # with several processes each measures its own GPU; the sums go to the main process
        summing = args.world_size > 1 and self._options.get("energy", True)
        self._rank_energy = RankEnergy(args.device) if summing else None
        if not state.is_world_process_zero:
            return
        scheduler = kwargs.get("lr_scheduler")
        optimizer = getattr(scheduler, "optimizer", None) or kwargs.get("optimizer")
        self._monitor = Monitor.for_run(
            int(state.max_steps),
            lambda n: _capture(optimizer, scheduler, kwargs.get("model"), n),
            lr_schedule=self._lr_schedule,
            start_step=start,
            state=self._saved_state(state) if start > 0 else None,
            sinks=[*self._run_sinks(lambda: _tensorboard(args)), *self._logger_sinks()],
            run_dir=args.output_dir,
            **{
                **_compute_options(args),
                "amp": optimizer,
                **self._options,  # the user's options win
                **({"energy": False} if summing else {}),  # each process measures its own
            },
        )
        if summing:
            self._monitor.compute.energy = WorldEnergy()
        model = kwargs.get("model")
        self._start_run(getattr(model, "module", model), optimizer)

    @never_raises
    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        """Feed the monitored value; pass the new event scalars on with the logs."""
        if logs is None:
            return
        g = state.global_step
        self._note_flops(state)
        if self.monitor in logs and self._rank_energy is not None:  # every process logs it
            energy = None if self._monitor is None else self._monitor.compute.energy
            self._rank_energy.sum(_all_reduce, energy, args.world_size)
        if self.monitor in logs and self._monitor is not None:
            if self.monitor == "loss":
                step = train_loss_step(g, g - self._last_log_step)
                self._last_log_step = g
            else:
                step = g - 1  # the model after update g - 1
            if step > self._last_step:
                self._last_step = step
                self._monitor.observe(step, float(logs[self.monitor]))  # emits a new fit
                self._report_trial(step, float(logs[self.monitor]))
        if self._options.get("auto_stop") or self._trial is not None:
            self._stop_if_advised(args, state, control)
        if "train_runtime" in logs and self._monitor is not None:
            # the Trainer's last log, before on_train_end: the summary goes with it
            self._monitor.finish(step=state.global_step - 1)
        self._flush_metrics(args, state, control, logs)

    @never_raises
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Probes: gradients (clipped, so unscaled) and Adam's state, on sampled steps."""
        if self._monitor is not None:
            self._monitor.before_optimizer_step(state.global_step)

    @never_raises
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Probes: the update just made; every probe metric is checked."""
        if self._monitor is not None:
            self._monitor.after_optimizer_step(state.global_step)

    @never_raises
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remember the checkpoint, named in roll-back advice after a spike."""
        if self._monitor is not None and self._monitor.detector is not None:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._monitor.detector.note_checkpoint(state.global_step, path)

    @never_raises
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Note the optimizer step (step time, throughput)."""
        if self._monitor is not None:
            self._monitor.tick(state.global_step)

    @never_raises
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Make a last fit on all the data, emit the summary and close the sinks."""
        self._close_rank_energy()
        if self._monitor is not None:
            self._monitor.finish(step=state.global_step - 1)

    # ------------------------------------------------------------------ helpers
    def _stop_if_advised(self, args: Any, state: Any, control: Any) -> None:
        """Stop cleanly for ``auto_stop`` advice (saving a checkpoint first) or an Optuna prune.

        The main process decides; with several processes the decision is broadcast (every
        process logs at the same steps) so all of them save and stop together.
        """
        reason, pruned = self._stop_decision(lambda decision: _broadcast(decision, args))
        if control.should_training_stop or (reason is None and not pruned):
            return
        control.should_training_stop = True
        if reason is None:  # pruned: no checkpoint, the trial is over
            if state.is_world_process_zero:
                logger.info("lossforecast: %s; training stops.", self._prune_reason)
            return
        control.should_save = True  # the Trainer saves right after this log, then stops
        if state.is_world_process_zero:
            logger.warning(
                "lossforecast: stopping at step %d (auto_stop) after saving a checkpoint in %s: %s",
                state.global_step,
                args.output_dir,
                reason,
            )

    def _note_flops(self, state: Any) -> None:
        """FLOPs per step on this process from the Trainer's own count (``state.total_flos``).

        The Trainer adds ``model.floating_point_ops`` of every batch (6 x parameters x
        tokens, an estimate) summed over processes; the growth since the last log, per step
        and process, is what the monitor's MFU and FLOPs-to-finish use unless
        ``flops_per_step`` was given.
        """
        monitor, (step0, flos0) = self._monitor, self._flos
        if monitor is None or state.global_step <= step0 or state.total_flos <= flos0:
            return
        self._flos = (state.global_step, state.total_flos)
        if not self._options.get("flops_per_step"):
            per_step = (state.total_flos - flos0) / (state.global_step - step0)
            monitor.compute.flops_per_step = per_step / monitor.compute.world_size

    def _logger_sinks(self) -> list[MetricsSink]:
        """A sink that keeps event scalars for the next ``on_log`` (see :meth:`_flush_metrics`)."""
        self._pending = {}
        if not self.log_to_loggers:
            return []
        self._reporters_before = _reporters_before(self)
        return [MetricsSink(lambda metrics, step: self._pending.update(metrics))]

    def _flush_metrics(self, args: Any, state: Any, control: Any, logs: dict) -> None:
        """Add the pending event scalars to ``logs`` and ``log_history``; tell earlier reporters.

        The Trainer calls its ``report_to`` reporters before user callbacks, so the ones
        already called for these logs get the scalars from here (TensorBoard's excepted: it
        has the TensorBoard sink); those after this callback read them from ``logs``.
        """
        metrics, self._pending = self._pending, {}
        if not metrics:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        for reporter in self._reporters_before:
            try:
                reporter.on_log(args, state, control, logs=dict(metrics))
            except Exception as exc:  # a reporter failing must not stop the others
                self._reporters_before.remove(reporter)
                logger.warning(
                    "lossforecast: could not log to %s (%s: %s); it gets no more forecasts.",
                    type(reporter).__name__,
                    type(exc).__name__,
                    exc,
                )

    def _saved_state(self, state: Any) -> dict | None:
        """This callback's saved state in the resumed ``trainer_state.json``, if any."""
        entries = (state.stateful_callbacks or {}).get(type(self).__name__)
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict) and entry.get("args", {}).get("monitor") == self.monitor:
                return entry.get("attributes", {}).get("saved_state")
        return None


def _all_reduce(tensor: Any) -> Any:
    """The sum of ``tensor`` over the processes (in place; as is without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _broadcast(values: list, args: Any) -> list:
    """``values`` of the main process, on every process (as is when there is only one)."""
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(values, src=0)
    return values


def _compute_options(args: Any) -> dict[str, Any]:
    """Monitor options for throughput, MFU and energy: device, its peak FLOP/s, world size."""
    import torch

    from .flops import cuda_device_ids, device_peak_flops

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return {
        "cuda_devices": cuda_device_ids(args.device),
        "peak_flops": device_peak_flops(args.device, dtype),
        "world_size": int(args.world_size),
    }


def _reporters_before(callback: Any) -> list[Any]:
    """The ``report_to`` reporters the Trainer calls before ``callback`` (TensorBoard's excepted).

    They are found in the list of the ``CallbackHandler`` that is calling ``callback`` now
    (the caller's frame): the Trainer exposes no other way to reach them from a callback.
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and any(c is callback for c in callbacks):
            before = callbacks[: next(i for i, c in enumerate(callbacks) if c is callback)]
            return [
                c
                for c in before
                if type(c).__module__.startswith("transformers.integrations")
                and type(c).__name__ != "TensorBoardCallback"
            ]
        frame = frame.f_back
    return []


def _tensorboard(args: Any) -> dict[str, Any]:
    """``{"log_dir": ...}`` where HF's TensorBoard callback writes, if ``report_to`` has it."""
    if "tensorboard" not in (args.report_to or []):
        return {}
    folder = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
    if folder:
        return {"log_dir": os.path.expanduser(folder)}
    runs = Path(args.output_dir) / "runs"  # HF's callback made runs/<time>_<host> just before
    made = [p for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
    newest = max(made, key=lambda p: p.stat().st_mtime) if made else runs / "lossforecast"
    return {"log_dir": os.fspath(newest)}


def _capture(optimizer: Any, scheduler: Any, model: Any, n_steps: int):
    """The next ``n_steps`` LRs of group 0; the Trainer steps its scheduler every optimizer step."""
    from ._schedule_capture import capture_schedule

    captured = capture_schedule(
        optimizer, [scheduler] if scheduler is not None else [], n_steps, keep=(model,)
    )
    return captured.lr, captured.note
