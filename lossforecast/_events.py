"""Events (forecasts, warnings, advice, the end-of-run summary) and the bus that feeds sinks.

Everything a user sees from lossforecast is an :class:`Event`. Producers (the callbacks,
``Monitor``, detectors) build events with :func:`forecast_event`, :func:`summary_event` or the
:class:`Event` constructor and hand them to an :class:`EventBus`, which keeps them in
:attr:`EventBus.events` and passes each one to every sink (``lossforecast.sinks``). A sink
only implements ``write(event)``; adding one touches no core code.

Wiring, for a callback or ``Monitor``::

    bus = EventBus(sinks)                       # sinks=[...] from the user
    traj = (s, *fc.trajectory(s))               # s: future steps of the planned schedule
    bus.emit(forecast_event(f, observed_loss=smoothed, residual=r, trajectory=traj))
    bus.emit(Event("warning", "warning", step, "loss spike: 4.1 vs 2.9 expected", {"loss": 4.1}))
    bus.emit(summary_event(step, reached_loss, forecast))    # once, at the end of training
    bus.close(timeout=5.0)                      # flushes TensorBoard / Slack with a bounded wait

The end-of-training summary is a ``"forecast"`` event whose ``data["final"] == 1``
(:attr:`Event.is_summary`); it carries the last forecast and the loss actually reached
(keys ``reached_loss``, ``final_loss``, ``low``, ``high``, ``error``, ``rel_error``, ``inside``).

Data keys written by the helpers (sinks read these names):

=================  ==========================================================
``final_loss``     point forecast of the loss at ``target_step``
``low``, ``high``  interval with probability ``coverage``
``target_step``    step forecast (the end of the planned schedule by default)
``observed_loss``  smoothed observed loss at ``step`` (when given)
``residual``       observed minus predicted loss at ``step`` (when given)
``*_to_finish``    e.g. ``seconds_to_finish``, ``joules_to_finish`` (via ``extra``)
``final``          1 on the end-of-training summary
=================  ==========================================================
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike

from ._backtest import Trajectory

if TYPE_CHECKING:
    from ._forecaster import Forecast
    from .sinks import Sink

__all__ = ["Event", "EventBus", "EventScalars", "forecast_event", "summary_event"]

logger = logging.getLogger(__name__)

EventKind = Literal["forecast", "warning", "advice"]
Severity = Literal["info", "warning", "critical"]
KINDS = ("forecast", "warning", "advice")
SEVERITIES = ("info", "warning", "critical")

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


def redact_urls(text: str) -> str:
    """``text`` with every URL replaced by ``<url>`` (error messages must never leak a webhook)."""
    return _URL.sub("<url>", text)


@dataclass(frozen=True)
class Event:
    """One thing worth telling the user: a forecast update, a warning or an advice.

    Parameters
    ----------
    kind : {'forecast', 'warning', 'advice'}
        What happened. The end-of-training summary is a ``'forecast'`` event with
        ``data["final"] == 1``.
    severity : {'info', 'warning', 'critical'}
        How loud sinks should be about it.
    step : int
        Training step (optimizer steps, >= 0) the event refers to.
    message : str
        Short human sentence, non-empty.
    data : dict of str to float, int or str, optional
        The numbers behind the message (copied; see the module docstring for the names).
    time : float, optional
        Unix time the event was created; now by default.
    trajectory : Trajectory, optional
        Predicted loss for the rest of the schedule (forecast events only), stored as a
        read-only copy. Kept out of ``data`` so that ``data`` stays flat scalars.

    Raises
    ------
    ValueError
        If an argument is out of its allowed values.
    TypeError
        If ``data`` has a key that is not a str or a value that is not a float, int or str.

    Examples
    --------
    >>> e = Event("warning", "warning", 120, "loss spike", {"loss": 4.2})
    >>> e.kind, e.step, e.data["loss"], e.is_summary
    ('warning', 120, 4.2, False)
    """

    kind: EventKind
    severity: Severity
    step: int
    message: str
    data: dict[str, float | int | str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    trajectory: Trajectory | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}.")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, np.integer)):
            raise ValueError(f"`step` must be a non-negative int, got {self.step!r}.")
        if self.step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {self.step!r}.")
        if not isinstance(self.message, str) or not self.message.strip():
            raise ValueError(f"`message` must be a non-empty str, got {self.message!r}.")
        if not isinstance(self.data, Mapping):
            raise TypeError(f"`data` must be a dict, got {type(self.data).__name__}.")
        clean: dict[str, float | int | str] = {}
        for key, value in self.data.items():
            if not isinstance(key, str):
                raise TypeError(f"`data` keys must be str, got {key!r}.")
            clean[key] = _scalar(key, value)
        if not math.isfinite(float(self.time)):
            raise ValueError(f"`time` must be a finite Unix time, got {self.time!r}.")
        if self.trajectory is not None:
            if not isinstance(self.trajectory, Trajectory):
                raise TypeError(
                    f"`trajectory` must be a Trajectory, got {type(self.trajectory).__name__}."
                )
            object.__setattr__(self, "trajectory", _checked_trajectory(*_fields(self.trajectory)))
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(self, "data", clean)
        object.__setattr__(self, "time", float(self.time))

    @property
    def is_summary(self) -> bool:
        """True for the end-of-training summary: a forecast event with ``data['final'] == 1``."""
        return self.kind == "forecast" and self.data.get("final") == 1

    def to_dict(self) -> dict:
        """JSON-safe builtins (non-finite numbers become ``None``), e.g. for a webhook body."""
        out = {
            "kind": self.kind,
            "severity": self.severity,
            "step": self.step,
            "message": self.message,
            "data": {k: _json_number(v) for k, v in self.data.items()},
            "time": self.time,
        }
        if self.trajectory is not None:
            out["trajectory"] = {
                name: [_json_number(v) for v in values.tolist()]
                for name, values in zip(_TRAJECTORY_FIELDS, _fields(self.trajectory), strict=True)
            }
        return out


_TRAJECTORY_FIELDS = ("steps", "loss", "low", "high")


def _fields(trajectory: Trajectory) -> tuple:
    return tuple(getattr(trajectory, name) for name in _TRAJECTORY_FIELDS)


def _checked_trajectory(
    steps: ArrayLike, loss: ArrayLike, low: ArrayLike, high: ArrayLike
) -> Trajectory:
    """A validated :class:`~lossforecast.Trajectory` holding read-only 1-d copies."""
    s = np.array(steps)
    if s.ndim != 1 or s.size == 0 or not np.all(np.mod(s, 1) == 0):
        raise ValueError("`trajectory` steps must be a non-empty 1-d sequence of integers.")
    if np.any(np.diff(s) <= 0):
        raise ValueError("`trajectory` steps must be strictly increasing.")
    arrays = [s.astype(np.int64)]
    for name, values in zip(_TRAJECTORY_FIELDS[1:], (loss, low, high), strict=True):
        a = np.array(values, dtype=np.float64).ravel()
        if a.size != s.size:
            raise ValueError(f"`trajectory` {name} has {a.size} values for {s.size} steps.")
        arrays.append(a)
    for a in arrays:
        a.flags.writeable = False
    return Trajectory(*arrays)


def _scalar(key: str, value: object) -> float | int | str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TypeError(f"`data[{key!r}]` must be a float, int or str, got {type(value).__name__}.")


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _forecast_data(forecast: Forecast) -> dict[str, float | int | str]:
    return {
        "final_loss": forecast.loss,
        "low": forecast.low,
        "high": forecast.high,
        "coverage": forecast.coverage,
        "target_step": forecast.step,
        "law": forecast.law,
        "n_points": forecast.n_points,
        "fit_seconds": forecast.fit_seconds,
        "observed_step": forecast.observed_step,
    }


def forecast_event(
    forecast: Forecast,
    *,
    step: int | None = None,
    observed_loss: float | None = None,
    residual: float | None = None,
    trajectory: Trajectory | Sequence[ArrayLike] | None = None,
    extra: Mapping[str, float | int | str] | None = None,
) -> Event:
    """A ``'forecast'`` event for a new forecast of the final loss.

    Parameters
    ----------
    forecast : Forecast
        The forecast (``Forecaster.forecast()``).
    step : int, optional
        Training step the event is for; ``forecast.observed_step`` by default.
    observed_loss : float, optional
        Smoothed observed loss at ``step``.
    residual : float, optional
        Observed minus predicted loss at ``step``.
    trajectory : Trajectory or (steps, loss, low, high), optional
        Predicted loss for the rest of the schedule, e.g. ``(s, *forecaster.trajectory(s))``.
    extra : dict, optional
        More numbers for ``data``, e.g. ``{"seconds_to_finish": 812.0}``.

    Returns
    -------
    Event
        ``kind='forecast'``, ``severity='info'``, data as in the module docstring.

    Examples
    --------
    >>> from lossforecast import Forecast
    >>> f = Forecast(999, 2.91, 2.87, 2.95, 0.8, "multi-power", 40, 0.01, 400)
    >>> e = forecast_event(f, observed_loss=3.2)
    >>> e.step, e.data["final_loss"], e.message
    (400, 2.91, 'final loss 2.91 [2.87, 2.95] at step 999 (80%)')
    """
    data = _forecast_data(forecast)
    for key, value in (("observed_loss", observed_loss), ("residual", residual)):
        if value is not None:
            data[key] = float(value)
    data.update(extra or {})
    if trajectory is not None and not isinstance(trajectory, Trajectory):
        trajectory = _checked_trajectory(*trajectory)
    message = (
        f"final loss {forecast.loss:.4g} [{forecast.low:.4g}, {forecast.high:.4g}] "
        f"at step {forecast.step} ({forecast.coverage:.0%})"
    )
    at = forecast.observed_step if step is None else step
    return Event("forecast", "info", at, message, data, trajectory=trajectory)


def summary_event(
    step: int,
    reached_loss: float,
    forecast: Forecast | None = None,
    *,
    extra: Mapping[str, float | int | str] | None = None,
) -> Event:
    """The end-of-training summary: the forecast against the loss actually reached.

    Parameters
    ----------
    step : int
        Last training step.
    reached_loss : float
        Loss reached at the end (smoothed, as the forecast targets).
    forecast : Forecast, optional
        The forecast to compare with; ``None`` if none was ever made.
    extra : dict, optional
        More numbers for ``data`` (e.g. ``{"forecasts": 52}``).

    Returns
    -------
    Event
        ``kind='forecast'``, ``data['final'] == 1``; with a forecast, data also holds its fields
        plus ``error`` (forecast minus reached), ``rel_error`` and ``inside`` (1 if the reached
        loss lies in the interval).

    Examples
    --------
    >>> from lossforecast import Forecast
    >>> f = Forecast(999, 2.91, 2.87, 2.95, 0.8, "multi-power", 40, 0.01, 900)
    >>> e = summary_event(999, 2.90, f)
    >>> e.is_summary, e.data["inside"]
    (True, 1)
    >>> e.message
    'finished at step 999: loss 2.9, forecast 2.91 [2.87, 2.95] (+0.34%, inside the 80% interval)'
    """
    reached = float(reached_loss)
    data: dict[str, float | int | str] = {"final": 1, "reached_loss": reached}
    if forecast is None:
        message = f"finished at step {step}: loss {reached:.4g} (no forecast was made)"
    else:
        data.update(_forecast_data(forecast))
        error = forecast.loss - reached
        rel = error / abs(reached) if reached else math.inf
        inside = forecast.low <= reached <= forecast.high
        data.update(error=error, rel_error=rel, inside=int(inside))
        message = (
            f"finished at step {step}: loss {reached:.4g}, forecast {forecast.loss:.4g} "
            f"[{forecast.low:.4g}, {forecast.high:.4g}] ({rel:+.2%}, "
            f"{'inside' if inside else 'outside'} the {forecast.coverage:.0%} interval)"
        )
    data.update(extra or {})
    return Event("forecast", "info", step, message, data)


#: Prefix of every scalar lossforecast writes to TensorBoard or a trainer's loggers.
SCALAR_PREFIX = "lossforecast/"
# data key -> scalar name (after the prefix), for forecast events and the summary
_FORECAST_TAGS = {
    "final_loss": "forecast/final_loss",
    "low": "forecast/low",
    "high": "forecast/high",
    "observed_loss": "observed/smoothed_loss",
    "residual": "forecast/residual",
}
_SUMMARY_TAGS = {"reached_loss": "summary/reached_loss", "error": "summary/error"}


class EventScalars:
    """Turns events into the ``lossforecast/...`` scalars every metric sink writes.

    Forecast events give ``forecast/final_loss``, ``forecast/low``, ``forecast/high``,
    ``observed/smoothed_loss``, ``forecast/residual``, every ``*_to_finish`` number and every
    data key that already holds a ``/`` (namespaced metrics such as ``compute/mfu``); the
    summary gives ``summary/reached_loss`` and ``summary/error``; warnings and advice give the
    running counts ``events/warnings`` and ``events/advice`` (so a tracker can alert on them).

    Examples
    --------
    >>> to_scalars = EventScalars()
    >>> to_scalars(Event("warning", "warning", 5, "loss spike"))
    {'lossforecast/events/warnings': 1.0}
    """

    def __init__(self) -> None:
        self.counts = {"warning": 0, "advice": 0}

    def __call__(self, event: Event) -> dict[str, float]:
        data = event.data
        if event.kind != "forecast":
            self.counts[event.kind] += 1
            name = "events/warnings" if event.kind == "warning" else "events/advice"
            return {SCALAR_PREFIX + name: float(self.counts[event.kind])}
        tags = _SUMMARY_TAGS if event.is_summary else _FORECAST_TAGS
        pairs = [(tag, data[key]) for key, tag in tags.items() if key in data]
        pairs += [(k, v) for k, v in data.items() if k.endswith("_to_finish") or "/" in k]
        return {
            SCALAR_PREFIX + tag: float(v)
            for tag, v in pairs
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }


def _close(sink: Sink, timeout: float) -> None:
    """Call ``sink.close``, passing ``timeout`` when it takes one (duck-typed sinks may not)."""
    close = getattr(sink, "close", None)
    if close is None:
        return
    try:
        takes_timeout = "timeout" in inspect.signature(close).parameters
    except (TypeError, ValueError):
        takes_timeout = False
    if takes_timeout:
        close(timeout=timeout)
    else:
        close()


class EventBus:
    """Keeps the events emitted so far and passes each one to every sink.

    A sink that raises is logged once (with its class name) and disabled; the caller never
    sees the error. :meth:`emit` is thread-safe (forecasts may come from a fitting thread).

    Parameters
    ----------
    sinks : iterable of Sink, optional
        Where events go. Default none (events are only kept).
    max_events : int, optional
        Most events kept in :attr:`events`; past it, the oldest plain forecast update is
        dropped (warnings, advice and the summary are kept). Default 10000.

    Attributes
    ----------
    sinks : list of Sink
        The sinks, in call order.
    events : list of Event
        Events emitted so far (for programmatic use).
    disabled : list of Sink
        Sinks turned off after raising.

    Examples
    --------
    >>> bus = EventBus()
    >>> bus.emit(Event("advice", "info", 10, "cool down now"))
    >>> [e.message for e in bus.events]
    ['cool down now']
    >>> bus.close()
    """

    def __init__(self, sinks: Iterable[Sink] = (), *, max_events: int = 10_000) -> None:
        sinks = list(sinks)
        for sink in sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(
                    f"`sinks` must have a write(event) method, got {type(sink).__name__}."
                )
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"`max_events` must be a positive int, got {max_events!r}.")
        self.sinks: list[Sink] = sinks
        self.events: list[Event] = []
        self.disabled: list[Sink] = []
        self.max_events = max_events
        self._lock = threading.RLock()
        self._closed = False

    def emit(self, event: Event) -> None:
        """Record ``event`` and write it to every active sink; never raises for a sink's failure."""
        if not isinstance(event, Event):
            raise TypeError(f"`event` must be an Event, got {type(event).__name__}.")
        with self._lock:
            if self._closed:
                return
            self.events.append(event)
            if len(self.events) > self.max_events:
                self._drop_oldest()
            for sink in self.sinks:
                if sink in self.disabled:
                    continue
                try:
                    sink.write(event)
                except Exception as exc:  # a sink must never break training
                    self.disabled.append(sink)
                    logger.warning(
                        "lossforecast: sink %s failed (%s: %s); it is disabled for this run.",
                        type(sink).__name__,
                        type(exc).__name__,
                        redact_urls(str(exc)),
                    )

    def _drop_oldest(self) -> None:
        for i, e in enumerate(self.events):
            if e.kind == "forecast" and not e.is_summary:
                del self.events[i]
                return
        del self.events[0]

    def close(self, timeout: float = 5.0) -> None:
        """Close every sink (flushing them), waiting at most ``timeout`` seconds in total.

        Sinks are closed one after another in a daemon thread, each given the time left; a
        sink still closing at the deadline is logged and left behind.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + max(float(timeout), 0.0)
        current: list[Sink] = []

        def close_all() -> None:
            for sink in self.sinks:
                current[:] = [sink]
                try:
                    _close(sink, max(deadline - time.monotonic(), 0.0))
                except Exception as exc:
                    logger.warning(
                        "lossforecast: closing sink %s failed (%s: %s).",
                        type(sink).__name__,
                        type(exc).__name__,
                        redact_urls(str(exc)),
                    )
            current.clear()

        thread = threading.Thread(target=close_all, name="lossforecast-close", daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            names = ", ".join(type(s).__name__ for s in current) or "a sink"
            logger.warning(
                "lossforecast: %s did not close within %.1f s; giving up on it.", names, timeout
            )

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EventBus(sinks={[type(s).__name__ for s in self.sinks]}, events={len(self.events)})"
        )
