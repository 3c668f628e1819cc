"""Lightning callback that forecasts the final loss while a ``Trainer`` trains.

Works with ``lightning.pytorch`` and with the standalone ``pytorch_lightning`` package (the
class subclasses whichever ``Callback`` is installed, ``lightning.pytorch`` first; both
Trainers call its hooks).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lossforecast import Monitor
from lossforecast._callbacks import MonitorAccess, never_raises
from lossforecast._compute import WorldEnergy
from lossforecast._monitor import LossWindow, train_loss_step
from lossforecast.sinks import MetricsSink

from ._rank_energy import RankEnergy

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None

__all__ = ["LossForecastCallback"]

logger = logging.getLogger(__name__)

_Callback: type = pl.Callback if pl is not None else object


class LossForecastCallback(MonitorAccess, _Callback):
    """Forecast the final loss of a Lightning run from its planned LR schedule.

    With no arguments everything is found on the trainer: the planned number of optimizer
    steps (``trainer.estimated_stepping_batches``), the full LR schedule (captured before
    training by simulating a copy of the schedulers in ``trainer.lr_scheduler_configs``,
    honouring ``interval``, ``frequency`` and gradient accumulation) and the loss returned
    by ``training_step``. Fitting runs on a background thread; the hooks only add a tensor
    and, once per window, read one number.

    Parameters
    ----------
    monitor : str, optional
        ``"train_loss"`` (default): the loss returned by ``training_step``, averaged over
        the window's batches and, under DDP, across ranks (one all-reduce of a scalar per
        window). Any other name: a metric the module logs with ``self.log``, read from
        ``trainer.callback_metrics`` after each validation run (e.g. ``"val_loss"``;
        log it with ``sync_dist=True`` to average it across ranks).
    lr_schedule : array_like, optional
        Planned LR of every optimizer step, instead of capturing it.
    every_n_steps : int, optional
        Optimizer steps per averaged observation; ``trainer.log_every_n_steps`` by default.
    sinks : list of Sink, optional
        Where events go (``lossforecast.sinks``). Default: a
        :class:`~lossforecast.sinks.ConsoleSink`, plus a
        :class:`~lossforecast.sinks.TensorBoardSink` into the experiment of the trainer's
        ``TensorBoardLogger`` (the same run folder) when it has one. ``[]``: none.
    log_to_loggers : bool, optional
        Also log the event scalars (``lossforecast/forecast/final_loss``, ``.../low``,
        ``.../high``, ``lossforecast/seconds_to_finish``, ``lossforecast/events/warnings``,
        ...: see :class:`~lossforecast.EventScalars`) to every logger of the trainer other
        than TensorBoard's (CSV, W&B, MLflow, ...), at the trainer's ``global_step``.
        Default True.
    trial : optuna.trial.Trial, optional
        Report the loss to this trial (``trial.report(loss, step)``, the planned schedule
        stored once) and stop training when its pruner says so (use
        ``lossforecast.integrations.optuna.ForecastPruner``); :attr:`pruned` then says so
        and ``forecast_value(trial)`` gives the forecast to return from the objective.
        Under DDP rank zero reports and decides.
    **options
        Passed to :class:`~lossforecast.Monitor`: its own options (``target_loss``,
        ``reference``, ``advisor``, ``auto_stop``, ``history_dir``, ``labels``, ``energy``,
        ``flops_per_step``, ``peak_flops``, ``instability``, ``probe_every``, ...) and the
        :class:`~lossforecast.Forecaster` ones (``law``, ``coverage``, ...).

    Attributes
    ----------
    forecaster : Forecaster or None
        The core forecaster, built when training starts (on global rank zero only).
    schedule_note : str or None
        Why the captured schedule is not the exact planned one (ReduceLROnPlateau, a
        scheduler that cannot be copied, a resumed run without saved state), else None.
    events : list of Event
        The events of the run so far: a forecast event per new background fit and, at the
        end of training, one summary (see :class:`~lossforecast.Monitor`).

    Notes
    -----
    The forecast follows parameter group 0 of the first optimizer. Whenever a new fit is
    ready a forecast event goes to the sinks (and its scalars to the loggers, see
    ``log_to_loggers``). At the end of training a summary event compares the last
    forecast with the loss reached and the sinks are closed with a bounded wait. Under DDP
    only global rank zero forecasts and logs. The state (observations and
    schedule) is saved in checkpoints under :attr:`state_key`; a resumed run continues the
    same forecast, with the rest of the schedule captured again from the restored
    schedulers. With manual optimization the schedulers are assumed to step once per
    optimizer step. A window open when a checkpoint is saved is not saved with it.

    Examples
    --------
    >>> from lossforecast.integrations.lightning import LossForecastCallback
    >>> cb = LossForecastCallback(every_n_steps=10)
    >>> cb.state_key
    "LossForecastCallback{'monitor': 'train_loss'}"
    """

    def __init__(
        self,
        monitor: str = "train_loss",
        *,
        lr_schedule: Any = None,
        every_n_steps: int | None = None,
        sinks: Any = None,
        log_to_loggers: bool = True,
        trial: Any = None,
        **forecaster_options: Any,
    ) -> None:
        if pl is None:
            raise ImportError(
                'LossForecastCallback needs Lightning: pip install "lossforecast[lightning]".'
            )
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"`every_n_steps` must be a positive int or None, got {every_n_steps!r}."
            )
        self._configure(monitor, lr_schedule, forecaster_options, sinks, trial)
        self.log_to_loggers = bool(log_to_loggers)
        self.every_n_steps = every_n_steps
        self._saved: dict | None = None
        self._told: set[str] = set()
        self._reset_run(0, 1, math.inf)

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint; names the monitored metric."""
        key = self.__dict__.get("_state_key")
        if key is None or key[0] != self.monitor:  # Lightning asks in every hook: cache it
            key = self.__dict__["_state_key"] = (
                self.monitor,
                self._generate_state_key(monitor=self.monitor),
            )
        return key[1]

    # ------------------------------------------------------------------ hooks
    @never_raises
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Capture the planned schedule and build the forecaster (global rank zero)."""
        total = trainer.estimated_stepping_batches
        every = self.every_n_steps or max(int(trainer.log_every_n_steps), 1)
        self._reset_run(trainer.global_step, every, total)
        if not math.isfinite(total):
            self._tell(
                "steps",
                "planned number of steps is unknown (set max_steps or max_epochs): no forecast.",
            )
            return
        start = trainer.global_step
        self._open_rank_energy(trainer, pl_module)
        # the logger's run folder; none without a logger (log_dir would be the working
        # folder). Reading it is a collective under DDP: every rank does.
        run_dir = trainer.log_dir if trainer.loggers else None
        if trainer.is_global_zero and start < total:
            self._monitor = Monitor.for_run(
                int(total),
                lambda n: _capture(trainer, pl_module, start, n),
                lr_schedule=self._lr_schedule,
                start_step=start,
                state=self._saved if start > 0 else None,
                sinks=[
                    *self._run_sinks(lambda: _tensorboard(trainer)),
                    *_logger_sinks(trainer, self.log_to_loggers),
                ],
                run_dir=run_dir,
                **{
                    **_compute_options(trainer, pl_module),
                    **self._options,  # the user's options win
                    **({"energy": False} if self._summing_energy else {}),  # ranks measure
                },
            )
            if self._summing_energy:
                self._monitor.compute.energy = WorldEnergy()
            self._start_run(pl_module, trainer.optimizers[0])

    @never_raises
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """On the first batch, count the FLOPs of a training step (once)."""
        monitor = self._monitor
        if monitor is None or self._flops_counted or monitor.compute.flops_per_step is not None:
            return
        self._flops_counted = True
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        _count_flops(monitor, pl_module, batch, scale)

    @never_raises
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Probes: gradients (already unscaled here) and Adam's state, on sampled steps."""
        if self._monitor is not None:
            self._monitor.before_optimizer_step(trainer.global_step)

    @never_raises
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add the batch loss to the window; at the window's end average it and feed it."""
        if self.monitor != "train_loss" or not math.isfinite(self._total):
            return
        loss = _batch_loss(outputs)
        if loss is None:
            self._tell(
                "no-loss", "training_step returned no loss tensor; pass monitor= a logged metric."
            )
            return
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._window.add(loss)
        step = trainer.global_step
        if step == self._last_step:
            return  # still accumulating gradients
        self._last_step = step
        if self._monitor is not None:
            self._monitor.after_optimizer_step(step - 1)
            self._monitor.tick(step)
        if step % self._every and step != self._total:
            return
        total, count = self._window.take_sum()
        # Lightning divides the returned loss by the accumulation: scale it back
        mean = trainer.strategy.reduce(total * scale / count, reduce_op="mean")  # every rank
        if self._summing_energy:
            self._sum_rank_energy(trainer, pl_module)
        window = step - self._window_start
        self._window_start = step
        self._feed(trainer, train_loss_step(step, window), mean, batch_idx)
        if self._options.get("auto_stop") or self._trial is not None:
            self._stop_if_advised(trainer)

    @never_raises
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Feed a logged validation metric (``monitor`` other than ``"train_loss"``)."""
        if self.monitor == "train_loss" or trainer.sanity_checking or self._monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            available = sorted(trainer.callback_metrics)
            self._tell(
                "missing",
                f"metric {self.monitor!r} was not logged; available metrics: {available}.",
            )
            return
        step = trainer.global_step - 1  # the model after update global_step - 1
        if step > self._last_eval_step:
            self._last_eval_step = step
            self._feed(trainer, step, value)

    @never_raises
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Log a last forecast from all the data, emit the summary and close the sinks."""
        self._close_rank_energy()
        if self._monitor is None:
            return
        self._monitor.finish(step=trainer.global_step - 1)

    @never_raises
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Stop background fitting and close the sinks without waiting long."""
        self._close_rank_energy()
        if self._monitor is not None:
            self._monitor.close(timeout=1.0)

    def state_dict(self) -> dict[str, Any]:
        """The forecaster's state (JSON-safe), saved in checkpoints."""
        if self._monitor is not None:
            return self._monitor.state_dict()
        return dict(self._saved) if self._saved else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state until training starts (the input is not modified)."""
        self._saved = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ helpers
    def _open_rank_energy(self, trainer: Any, pl_module: Any) -> None:
        """Under DDP, every rank measures its own GPU; their sums go to rank zero's monitor."""
        self._summing_energy = trainer.world_size > 1 and self._options.get("energy", True)
        self._rank_energy = RankEnergy(pl_module.device) if self._summing_energy else None

    def _sum_rank_energy(self, trainer: Any, pl_module: Any) -> None:
        """All-reduce every rank's energy and power (one small collective per window)."""
        energy = None if self._monitor is None else self._monitor.compute.energy
        self._rank_energy.sum(
            lambda t: trainer.strategy.reduce(t, reduce_op="sum"), energy, trainer.world_size
        )

    def _reset_run(self, start: int, every: int, total: float) -> None:
        self._summing_energy = False
        self._close_rank_energy()
        if self._monitor is not None:
            self._monitor.close(timeout=1.0)
        self._monitor = None
        self._window = LossWindow()
        self._window_start = self._last_step = start
        self._last_eval_step = -1
        self._flops_counted = False
        self._every = every
        self._total = total

    def _feed(self, trainer: Any, step: int, value: Any, batch_idx: int | None = None) -> None:
        if self._monitor is None:
            return
        self._monitor.observe(step, float(value), batch_idx=batch_idx)  # events of a new fit
        self._report_trial(step, float(value))

    def _stop_if_advised(self, trainer: Any) -> None:
        """Stop cleanly for ``auto_stop`` advice (after a checkpoint) or an Optuna prune.

        Rank zero decides; under DDP the decision is broadcast (every rank reaches this at
        the same window end) so all ranks save and stop together.
        """

        def broadcast(decision: list) -> list:
            return (
                trainer.strategy.broadcast(decision, src=0) if trainer.world_size > 1 else decision
            )

        reason, pruned = self._stop_decision(broadcast)
        if trainer.should_stop or (reason is None and not pruned):
            return
        trainer.should_stop = True
        if reason is None:  # pruned: no checkpoint, the trial is over
            if trainer.is_global_zero:
                logger.info("lossforecast: %s; training stops.", self._prune_reason)
            return
        path = _stop_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            logger.warning(
                "lossforecast: stopped at step %d (auto_stop), checkpoint saved to %s: %s",
                trainer.global_step,
                path,
                reason,
            )

    def _tell(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            logger.warning("lossforecast: %s", message)


def _is_tensorboard(lg: Any) -> bool:
    """Whether a logger is a ``TensorBoardLogger`` (of either Lightning namespace)."""
    return any(c.__name__ == "TensorBoardLogger" for c in type(lg).__mro__)


def _stop_checkpoint_path(trainer: Any) -> str:
    """Where ``auto_stop`` saves: the ModelCheckpoint folder, else ``<log_dir>/checkpoints``."""
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    if not folder:
        folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
    return os.path.join(folder, f"lossforecast-stop-step={trainer.global_step}.ckpt")


def _compute_options(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """Monitor options for throughput, MFU and energy: device, its peak FLOP/s, world size."""
    from .flops import cuda_device_ids, device_peak_flops

    precision = str(trainer.precision)
    dtype = "bf16" if "bf16" in precision else "fp16" if precision.startswith("16") else None
    device = pl_module.device
    if dtype is None:
        import torch

        dtype = torch.float32
    return {
        "cuda_devices": cuda_device_ids(device),
        "peak_flops": device_peak_flops(device, dtype),
        "world_size": int(trainer.world_size),
        "amp": trainer,  # its precision plugin holds the loss scaler, if any
    }


def _count_flops(monitor: Monitor, pl_module: Any, batch: Any, scale: int) -> None:
    """Count the FLOPs of ``pl_module(batch)`` (forward + backward) for the monitor's MFU.

    Lightning leaves the forward's signature to the module: a batch that is a dict is passed
    as keyword arguments, anything else as one argument. Where that does not fit the module,
    one info message says how to give the figure instead.
    """
    from .flops import count_flops

    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else ((batch,), {})
    try:
        counted = count_flops(pl_module, *args, **kwargs)
    except Exception as exc:
        logger.info(
            "lossforecast: FLOPs per step not counted (%s: %s); pass flops_per_step= for MFU.",
            type(exc).__name__,
            exc,
        )
        return
    monitor.compute.flops_per_step = counted.flops * scale
    if counted.tokens:
        monitor.compute.tokens_per_step = counted.tokens * scale
    if counted.method == "estimate":
        logger.info("lossforecast: %s", counted.note)


def _logger_sinks(trainer: Any, enabled: bool) -> list[MetricsSink]:
    """A sink that logs event scalars to every logger of the trainer except TensorBoard's.

    TensorBoard gets them from the TensorBoard sink. They are logged at the trainer's
    current ``global_step`` (the step every other metric of that moment is logged at).
    """
    loggers = [lg for lg in trainer.loggers if not _is_tensorboard(lg)]
    if not enabled or not loggers:
        return []

    def log(metrics: dict[str, float], step: int) -> None:
        for lg in loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    return [MetricsSink(log)]


def _tensorboard(trainer: Any) -> dict[str, Any]:
    """``{"writer": ...}``: the experiment of the trainer's first TensorBoardLogger, if any."""
    for lg in trainer.loggers:
        if _is_tensorboard(lg):
            return {"writer": lg.experiment}
    return {}


def _batch_loss(outputs: Any) -> Any:
    """The loss tensor in ``training_step``'s output, or None."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs if hasattr(outputs, "detach") else None


def _capture(
    trainer: Any, pl_module: Any, start: int, n_steps: int
) -> tuple[np.ndarray, str | None]:
    """The next ``n_steps`` LRs of optimizer 0, group 0, from the trainer's scheduler configs."""
    from ._schedule_capture import capture_schedule, lightning_step_mask

    optimizer = trainer.optimizers[0]
    configs = [
        c
        for c in trainer.lr_scheduler_configs
        if getattr(c.scheduler, "optimizer", None) is optimizer
    ]
    configs.sort(key=lambda c: c.interval != "step")  # Lightning steps "step" schedulers first
    masks: list[np.ndarray | None] = [
        lightning_step_mask(
            c.interval,
            c.frequency,
            start=start,
            n_steps=n_steps,
            batches_per_epoch=trainer.num_training_batches,
            accumulate=trainer.accumulate_grad_batches,
        )
        if pl_module.automatic_optimization
        else None
        for c in configs
    ]
    captured = capture_schedule(
        optimizer,
        [c.scheduler for c in configs],
        n_steps,
        step_masks=masks,
        keep=(pl_module, trainer),
    )
    return captured.lr, captured.note
