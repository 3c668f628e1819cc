"""The ``Sink`` interface: where events go."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .._events import Event

__all__ = ["Sink"]


class Sink(ABC):
    """Receives every event an :class:`~lossforecast._events.EventBus` emits.

    :meth:`write` is called by the bus, on the thread that emitted the event (the training
    thread or a fitting thread), so it must be quick: queue slow I/O. The event is frozen;
    keep it as is. An exception raised by :meth:`write` disables the sink for the run (the
    bus logs it once), so a sink should handle its own expected failures.

    Examples
    --------
    >>> class Collect(Sink):
    ...     def __init__(self):
    ...         self.seen = []
    ...     def write(self, event):
    ...         self.seen.append(event.message)
    >>> sink = Collect()
    >>> sink.write(Event("advice", "info", 5, "cool down now"))
    >>> sink.seen
    ['cool down now']
    """

    @abstractmethod
    def write(self, event: Event) -> None:
        """Handle one event."""

    def close(self, timeout: float | None = None) -> None:  # noqa: B027 (optional hook)
        """Flush and release resources, waiting at most ``timeout`` seconds; a no-op by default."""
