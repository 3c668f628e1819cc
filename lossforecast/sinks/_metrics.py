"""``MetricsSink``: event scalars to any ``log(metrics, step)`` function (a trainer's loggers)."""

from __future__ import annotations

from collections.abc import Callable

from .._events import Event, EventScalars
from ._base import Sink

__all__ = ["MetricsSink"]


class MetricsSink(Sink):
    """Pass each event's ``lossforecast/...`` scalars to ``log(metrics, step)``.

    This is how the framework callbacks reach every tracker a user already has: Lightning's
    ``trainer.loggers`` (CSV, W&B, MLflow, ...) and the reporters of a Hugging Face
    ``Trainer``'s ``report_to``. The scalars are those of
    :class:`~lossforecast.EventScalars`, the same names TensorBoard gets, so an alert set on
    ``lossforecast/forecast/final_loss`` or ``lossforecast/events/warnings`` in W&B or MLflow
    works without code.

    Parameters
    ----------
    log : callable
        ``log(metrics: dict[str, float], step: int)``, called on the thread that emitted the
        event; an event with no scalars is not passed on.

    Examples
    --------
    >>> seen = []
    >>> sink = MetricsSink(lambda metrics, step: seen.append((step, metrics)))
    >>> sink.write(Event("advice", "info", 7, "cool down now"))
    >>> seen
    [(7, {'lossforecast/events/advice': 1.0})]
    """

    def __init__(self, log: Callable[[dict[str, float], int], None]) -> None:
        if not callable(log):
            raise TypeError(f"`log` must be callable, got {type(log).__name__}.")
        self._log = log
        self._scalars = EventScalars()

    def write(self, event: Event) -> None:
        """Log the event's scalars at its step."""
        metrics = self._scalars(event)
        if metrics:
            self._log(metrics, event.step)

    def __repr__(self) -> str:
        return f"MetricsSink(log={getattr(self._log, '__qualname__', type(self._log).__name__)})"
