"""``TensorBoardSink``: forecast scalars, a band chart and the predicted trajectory."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from .._backtest import Trajectory
from .._events import SCALAR_PREFIX, Event, EventScalars
from ._base import Sink

__all__ = ["TensorBoardSink", "LAYOUT", "TRAJECTORY_RUN"]

logger = logging.getLogger(__name__)

#: Sub-folder of the run that holds one sub-run per written trajectory.
TRAJECTORY_RUN = "lossforecast_trajectory"
#: Custom-scalars layout, in the ``add_custom_scalars`` format of torch / tensorboardX writers.
LAYOUT = {
    "lossforecast": {
        "final loss forecast (band: interval)": [
            "Margin",
            [
                SCALAR_PREFIX + "forecast/final_loss",
                SCALAR_PREFIX + "forecast/low",
                SCALAR_PREFIX + "forecast/high",
            ],
        ],
        "predicted trajectory vs observed loss": [
            "Multiline",
            [f"^{SCALAR_PREFIX}observed/smoothed_loss$", f"^{SCALAR_PREFIX}trajectory$"],
        ],
    }
}
_INSTALL = 'TensorBoardSink needs the tensorboard package: pip install "lossforecast[tensorboard]"'


class TensorBoardSink(Sink):
    """Write forecasts to TensorBoard: scalars, a custom-scalars layout and trajectories.

    Scalars (all under ``lossforecast/``, at the event's training step): those of
    :class:`~lossforecast.EventScalars` (``forecast/final_loss``, ``forecast/low``,
    ``forecast/high``, ``observed/smoothed_loss``, ``forecast/residual``, every
    ``*_to_finish`` number and namespaced metric, ``events/warnings`` and ``events/advice``
    running counts, and ``summary/reached_loss`` / ``summary/error`` at the end). The plain scalars
    stand alone; the custom-scalars layout (written once, with the first event) adds two charts
    in the *Custom Scalars* tab:

    * a Margin chart: the final-loss forecast as a line with its interval as the band;
    * a Multiline chart: the observed smoothed loss with the predicted trajectories.

    Trajectories: TensorBoard cannot overwrite a series, so each trajectory written goes to
    its own sub-run ``<run>/lossforecast_trajectory/step_<step>`` as the scalar
    ``lossforecast/trajectory`` (and ``trajectory_low`` / ``trajectory_high``) at the future
    steps it predicts. Every sub-run shares the tag, so both the Scalars tab and the
    Multiline chart overlay them: a fan of predictions that narrows onto the observed curve.
    To keep the run list short, a trajectory is written with the first forecast that carries
    one and then only after the run advanced by ``trajectory_every`` of its target step.

    Parameters
    ----------
    log_dir : str or os.PathLike, optional
        Run folder to write to with TensorBoard's own writer (no torch needed).
    writer : object, optional
        A writer that already writes the run, e.g. ``torch.utils.tensorboard.SummaryWriter``
        (Lightning's ``TensorBoardLogger.experiment``, HF's TensorBoard callback writer) or
        anything with ``add_scalar(tag, value, step)``; the layout goes through its
        ``add_custom_scalars`` (or ``file_writer.add_summary``). It is flushed, not closed,
        by :meth:`close`. Exactly one of ``log_dir`` and ``writer`` must be given.
    trajectory_every : float, optional
        Fraction of the target step between two written trajectories, in (0, 1]. Default 0.1.
    flush_secs : float, optional
        How often the own writer flushes to disk, > 0. Default 10.

    Raises
    ------
    ValueError
        If neither or both of ``log_dir`` and ``writer`` are given, or an option is out of range.
    TypeError
        If ``writer`` has no ``add_scalar`` method.
    ImportError
        If ``log_dir`` is used and the ``tensorboard`` package is not installed.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        *,
        writer=None,
        trajectory_every: float = 0.1,
        flush_secs: float = 10.0,
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of `log_dir` and `writer`.")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"`writer` must have an add_scalar method, got {type(writer).__name__}."
            )
        if not 0.0 < trajectory_every <= 1.0:
            raise ValueError(f"`trajectory_every` must be in (0, 1], got {trajectory_every!r}.")
        if not 0.0 < flush_secs < math.inf:
            raise ValueError(f"`flush_secs` must be a positive number, got {flush_secs!r}.")
        if log_dir is not None:
            _require_tensorboard()
        self._writer = writer
        self._owns_writer = writer is None
        self.log_dir = os.fspath(log_dir) if log_dir is not None else _writer_dir(writer)
        self._trajectory_every = float(trajectory_every)
        self._flush_secs = float(flush_secs)
        self._layout_written = False
        self._last_trajectory: int | None = None
        self._scalars = EventScalars()
        self._lock = threading.Lock()

    @property
    def writer(self):
        """The writer in use (the own one is created with the first event)."""
        if self._writer is None:
            self._writer = _EventWriter(self.log_dir, flush_secs=self._flush_secs)
        return self._writer

    def write(self, event: Event) -> None:
        """Write the event's scalars (and the layout the first time, a trajectory when due)."""
        with self._lock:
            if not self._layout_written:
                self._layout_written = True
                _write_layout(self.writer)
            for tag, value in self._scalars(event).items():
                self.writer.add_scalar(tag, value, event.step)
            if event.trajectory is not None and self._trajectory_due(event):
                self._last_trajectory = event.step
                self._write_trajectory(event.step, event.trajectory)

    def _trajectory_due(self, event: Event) -> bool:
        if self._last_trajectory is None:
            return True
        target = event.data.get("target_step")
        span = (
            target
            if isinstance(target, (int, float)) and target > 0
            else event.trajectory.steps[-1]
        )
        return event.step - self._last_trajectory >= self._trajectory_every * span

    def _write_trajectory(self, step: int, trajectory: Trajectory) -> None:
        if self.log_dir is None:  # said once: no trajectory is due after this
            logger.info(
                "lossforecast: the TensorBoard writer has no log_dir; trajectories are off."
            )
            self._last_trajectory = math.inf
            return
        folder = os.path.join(self.log_dir, TRAJECTORY_RUN, f"step_{step:08d}")
        sub = _EventWriter(folder, flush_secs=self._flush_secs)
        try:
            for s, loss, low, high in zip(
                trajectory.steps, trajectory.loss, trajectory.low, trajectory.high, strict=True
            ):
                sub.add_scalar(SCALAR_PREFIX + "trajectory", loss, s)
                sub.add_scalar(SCALAR_PREFIX + "trajectory_low", low, s)
                sub.add_scalar(SCALAR_PREFIX + "trajectory_high", high, s)
        finally:
            sub.close()

    def close(self, timeout: float | None = None) -> None:
        """Flush; close the writer only if this sink created it."""
        with self._lock:
            if self._writer is None:
                return
            if self._owns_writer:
                self._writer.close()
                self._writer = None
            elif callable(getattr(self._writer, "flush", None)):
                self._writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoardSink(log_dir={self.log_dir!r})"


def _write_layout(writer) -> None:
    if callable(getattr(writer, "add_custom_scalars", None)):
        writer.add_custom_scalars(LAYOUT)
    elif callable(getattr(getattr(writer, "file_writer", None), "add_summary", None)):
        writer.file_writer.add_summary(_layout_summary(LAYOUT))
    else:
        logger.info(
            "lossforecast: %s cannot write a custom-scalars layout; writing plain scalars only.",
            type(writer).__name__,
        )


def _writer_dir(writer) -> str | None:
    """Run folder of a torch / tensorboardX writer (``log_dir`` or ``get_logdir()``)."""
    folder = getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
    if folder is None and callable(getattr(writer, "get_logdir", None)):
        folder = writer.get_logdir()
    return os.fspath(folder) if folder is not None else None


def _require_tensorboard() -> None:
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc


def _layout_summary(layout: dict):
    """The custom-scalars layout as a ``Summary`` proto (what ``add_custom_scalars`` writes)."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    categories = []
    for category, charts in layout.items():
        protos = []
        for title, (kind, tags) in charts.items():
            if kind == "Margin":
                series = layout_pb2.MarginChartContent.Series(
                    value=tags[0], lower=tags[1], upper=tags[2]
                )
                protos.append(
                    layout_pb2.Chart(
                        title=title, margin=layout_pb2.MarginChartContent(series=[series])
                    )
                )
            else:
                content = layout_pb2.MultilineChartContent(tag=tags)
                protos.append(layout_pb2.Chart(title=title, multiline=content))
        categories.append(layout_pb2.Category(title=category, chart=protos))
    tensor = tensor_pb2.TensorProto(
        dtype="DT_STRING",
        string_val=[layout_pb2.Layout(category=categories).SerializeToString()],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
    )
    value = summary_pb2.Summary.Value(
        tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=metadata.create_summary_metadata()
    )
    return summary_pb2.Summary(value=[value])


class _EventWriter:
    """Minimal writer on TensorBoard's own event-file writer (no torch): scalars and layout."""

    def __init__(self, log_dir: str, *, flush_secs: float) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.file_writer = self
        self._events = EventFileWriter(log_dir, flush_secs=flush_secs)

    def add_summary(self, summary, global_step: int | None = None) -> None:
        from tensorboard.compat.proto import event_pb2

        event = event_pb2.Event(summary=summary, wall_time=time.time())
        if global_step is not None:
            event.step = int(global_step)
        self._events.add_event(event)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        value_pb = summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        self.add_summary(summary_pb2.Summary(value=[value_pb]), step)

    def add_custom_scalars(self, layout: dict) -> None:
        self.add_summary(_layout_summary(layout))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()
