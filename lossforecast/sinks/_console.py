"""``ConsoleSink``: a compact, rate-limited live line and an end-of-training summary table."""

from __future__ import annotations

import io
import logging
import math
import sys
import time

from .._events import Event
from .._scorecard import scorecard_rows
from ._base import Sink

__all__ = ["ConsoleSink", "render_summary"]

logger = logging.getLogger(__name__)

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}
# Keys the summary table shows in its own rows; any other number is listed after them.
_SUMMARY_KEYS = frozenset(
    "final reached_loss final_loss low high coverage error rel_error inside law target_step "
    "observed_step fit_seconds n_points".split()
)


class ConsoleSink(Sink):
    """Forecasts, warnings and advice as log lines, and a summary table at the end of training.

    Lines go through :mod:`logging` (logger ``lossforecast.sinks._console``). If no handler
    is configured anywhere up that logger's chain, the sink attaches one to stderr while it is
    open, so the lines show without any logging set-up; otherwise your configuration decides.

    A forecast line looks like::

      lossforecast step 1200/9999: final loss 2.9130 ± 0.0410 (80%) ↓0.0120 · now 3.2010 · ETA 9m05s

    (the arrow: trend against the previous forecast; ``now`` and ETA when the event has
    ``observed_loss`` and ``seconds_to_finish``).

    Parameters
    ----------
    interval : float, optional
        Seconds between two forecast lines (>= 0); the forecasts in between are skipped,
        and a repeated identical warning or advice is skipped within this time too. Default 30.
    interactive : bool, optional
        Show forecast lines. Default: only when stdout is a terminal, so batch logs get just
        the warnings, the advice and the final summary.

    Raises
    ------
    ValueError
        If ``interval`` is negative or not finite.

    Examples
    --------
    >>> from lossforecast._events import Event
    >>> sink = ConsoleSink(interval=0.0, interactive=True)
    >>> sink.write(Event("advice", "info", 100, "cooling down now would reach 2.95"))
    >>> sink.close()
    """

    def __init__(self, *, interval: float = 30.0, interactive: bool | None = None) -> None:
        if not isinstance(interval, (int, float)) or not 0.0 <= interval < math.inf:
            raise ValueError(
                f"`interval` must be a finite number of seconds >= 0, got {interval!r}."
            )
        if interactive is not None and not isinstance(interactive, bool):
            raise ValueError(f"`interactive` must be True, False or None, got {interactive!r}.")
        self._interval = float(interval)
        self._interactive = _stdout_is_tty() if interactive is None else interactive
        self._last_line = -math.inf
        self._last_loss: float | None = None
        self._recent: dict[tuple[str, str], float] = {}
        self._handler: logging.Handler | None = None
        self._saved_level = logging.NOTSET
        self._glyphs = _glyphs(getattr(sys.stderr, "encoding", None))

    def write(self, event: Event) -> None:
        """Log the event if it passes the filters (forecast lines are rate-limited)."""
        now = time.monotonic()
        if event.is_summary:
            text = render_summary(event, color=self._interactive, ascii=self._glyphs[0] == "v")
            self._log(logging.INFO, text)
        elif event.kind == "forecast":
            previous, self._last_loss = self._last_loss, _number(event.data.get("final_loss"))
            if self._interactive and now - self._last_line >= self._interval:
                self._last_line = now
                self._log(logging.INFO, self._forecast_line(event, previous))
        else:
            key = (event.kind, event.message)
            if now - self._recent.get(key, -math.inf) < self._interval:
                return
            self._recent[key] = now
            self._log(
                _LEVELS[event.severity],
                f"lossforecast {event.kind} at step {event.step}: {event.message}",
            )

    def _forecast_line(self, event: Event, previous: float | None) -> str:
        data, (down, up, flat, pm) = event.data, self._glyphs
        loss, low, high = (_number(data.get(k)) for k in ("final_loss", "low", "high"))
        target = data.get("target_step")
        head = f"lossforecast step {event.step}" + (f"/{target}" if target is not None else "")
        if loss is None:
            return f"{head}: {event.message}"
        line = f"{head}: final loss {loss:.4f}"
        if low is not None and high is not None:
            line += f" {pm} {(high - low) / 2:.4f}"
        coverage = _number(data.get("coverage"))
        if coverage is not None:
            line += f" ({coverage:.0%})"
        if previous is not None:
            delta = loss - previous
            arrow = flat if abs(delta) <= 1e-4 * abs(previous) else (down if delta < 0 else up)
            line += f" {arrow}{abs(delta):.4f}"
        observed = _number(data.get("observed_loss"))
        if observed is not None:
            line += f" · now {observed:.4f}"
        seconds = _number(data.get("seconds_to_finish"))
        if seconds is not None:
            line += f" · ETA {duration(seconds)}"
        return line

    def _log(self, level: int, message: str) -> None:
        if self._handler is None and not logger.hasHandlers():
            self._handler = logging.StreamHandler(sys.stderr)
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(self._handler)
            self._saved_level = logger.level
            logger.setLevel(logging.INFO)
        logger.log(level, message)

    def close(self, timeout: float | None = None) -> None:
        """Detach the stderr handler this sink attached, if any."""
        if self._handler is not None:
            logger.removeHandler(self._handler)
            logger.setLevel(self._saved_level)
            self._handler = None

    def __repr__(self) -> str:
        return f"ConsoleSink(interval={self._interval}, interactive={self._interactive})"


def render_summary(event: Event, *, color: bool = False, ascii: bool = False) -> str:
    """The end-of-training summary as a table (``rich`` when installed, plain text otherwise).

    Parameters
    ----------
    event : Event
        A summary event (:func:`~lossforecast._events.summary_event`).
    color : bool, optional
        Keep terminal colours (rich only). Default False.
    ascii : bool, optional
        Draw the table with ASCII characters only (rich only). Default False.

    Returns
    -------
    str
        The table, with the event's message as its title line.
    """
    rows = _summary_rows(event)
    title = f"lossforecast summary: {event.message}"
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(k) for k, _ in rows)
        return "\n".join([title] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
    table = Table(box=box.ASCII if ascii else box.ROUNDED, show_header=False, padding=(0, 1))
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=color, no_color=not color).print(table)
    return title + "\n" + out.getvalue().rstrip("\n")


def _summary_rows(event: Event) -> list[tuple[str, str]]:
    data = event.data
    rows = [("final loss reached", _fmt(data.get("reached_loss")))]
    if "final_loss" in data:
        coverage = _number(data.get("coverage"))
        label = f"{coverage:.0%} interval" if coverage is not None else "interval"
        rows += [
            ("forecast", _fmt(data["final_loss"])),
            (label, f"{_fmt(data.get('low'))} - {_fmt(data.get('high'))}"),
        ]
        error, rel = _number(data.get("error")), _number(data.get("rel_error"))
        if error is not None:
            rows.append(("error", f"{error:+.4f}" + (f" ({rel:+.2%})" if rel is not None else "")))
        if "inside" in data:
            rows.append(("inside the interval", "yes" if data["inside"] else "no"))
        rows.append(("forecast made at step", _fmt(data.get("observed_step"))))
        rows.append(("law", _fmt(data.get("law"))))
    rows += scorecard_rows(data)
    rows += [
        (k, _fmt(v))
        for k, v in data.items()
        if k not in _SUMMARY_KEYS and not k.startswith("scorecard/")
    ]
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def duration(seconds: float) -> str:
    """Compact duration: ``'9m05s'``, ``'1h02m'``."""
    s = round(max(seconds, 0.0))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _glyphs(encoding: str | None) -> tuple[str, str, str, str]:
    """Trend arrows and the plus-minus sign, in ASCII when the stream cannot encode them."""
    try:
        "↓↑→±".encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "v", "^", "=", "+/-"
    return "↓", "↑", "→", "±"


def _stdout_is_tty() -> bool:
    try:
        return bool(sys.stdout is not None and sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False
