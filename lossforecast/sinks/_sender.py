"""One background HTTP sender for JSON webhooks, and ``HttpSink``, the sink built on it.

``SlackSink`` and ``WebhookSink`` are ``HttpSink`` with a fixed payload-formatting function and
environment variable; the sending (queue, retries, backoff, 429, de-duplication, flush) lives
only here. The webhook URL is a secret: it is never printed, logged or shown in a ``repr``;
messages name only its host.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping

from .._events import Event, redact_urls
from ._base import Sink

__all__ = ["HttpSink", "Sender", "PayloadFormatter"]

logger = logging.getLogger(__name__)

#: ``format(event, run_name) -> JSON-safe dict`` builds the body posted for one event.
PayloadFormatter = Callable[[Event, "str | None"], Mapping]
KINDS = ("forecast", "warning", "advice", "summary")
#: What ``HttpSink`` posts by default, every time / once per fraction of the run.
DEFAULT_KINDS = ("warning", "advice", "summary")
DEFAULT_MILESTONES = (0.25, 0.5, 0.75)
_MAX_RETRY_AFTER = 300.0


def _where(url: str) -> str:
    """The part of ``url`` safe to show: its host (and port)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def _check_url(url: str, arg: str) -> str:
    """Validate a webhook URL without ever echoing it (it is a secret)."""
    if not isinstance(url, str):
        raise TypeError(f"`{arg}` must be a str, got {type(url).__name__}.")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"`{arg}` must be an http(s) URL with a host, got one with {shown}.")
    return url.strip()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), capped at 300."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


class Sender:
    """POST JSON bodies to one URL from a daemon thread; never raises into or blocks the caller.

    :meth:`submit` queues a body and returns at once. The thread posts bodies in order with a
    ``timeout`` per request; a timeout, a refused connection, a 5xx or a 408 is retried up to
    ``max_retries`` times after ``backoff * 2**attempt`` seconds (at most ``max_backoff``); a
    429 is retried after its ``Retry-After`` (at most 300 s); any other 4xx is not retried. A
    full queue drops the new body and counts it; a body whose ``key`` was submitted within
    ``dedup_window`` seconds is skipped and counted.

    Parameters
    ----------
    url : str
        http(s) URL to post to (kept secret: messages show only its host).
    name : str, optional
        Label for log messages, e.g. ``"SlackSink"``. Default ``"Sender"``.
    timeout : float, optional
        Seconds per request (connect and each read), > 0. Default 5.
    max_retries : int, optional
        Retries per body after the first try, >= 0. Default 3.
    backoff, max_backoff : float, optional
        First retry delay and its cap, in seconds (>= 0). Defaults 1 and 30.
    max_queue : int, optional
        Bodies waiting at most, >= 1. Default 100.
    dedup_window : float, optional
        Seconds during which a repeated key is skipped, >= 0 (0 turns it off). Default 600.

    Attributes
    ----------
    stats : dict of str to int
        ``sent``, ``failed`` (given up), ``dropped`` (queue full), ``deduplicated``,
        ``retries`` and ``unsent`` (still queued when :meth:`close` gave up).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "Sender",
        timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_queue: int = 100,
        dedup_window: float = 600.0,
    ) -> None:
        url = _check_url(url, "url")
        for arg, value, low in (
            ("timeout", timeout, 0.0),
            ("backoff", backoff, 0.0),
            ("max_backoff", max_backoff, 0.0),
            ("dedup_window", dedup_window, 0.0),
        ):
            if not isinstance(value, (int, float)) or not low <= value < math.inf:
                raise ValueError(f"`{arg}` must be a finite number >= {low:g}, got {value!r}.")
        if timeout <= 0:
            raise ValueError(f"`timeout` must be positive, got {timeout!r}.")
        for arg, value, low in (("max_retries", max_retries, 0), ("max_queue", max_queue, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{arg}` must be an int >= {low}, got {value!r}.")
        self._url = url
        self.name = f"{name}({_where(url)})"
        self._timeout = float(timeout)
        self._max_retries = max_retries
        self._backoff = float(backoff)
        self._max_backoff = float(max_backoff)
        self._max_queue = max_queue
        self._dedup_window = float(dedup_window)
        self.stats = dict.fromkeys(
            ("sent", "failed", "dropped", "deduplicated", "retries", "unsent"), 0
        )
        self._items: deque[bytes] = deque()
        self._pending = 0  # queued plus in flight
        self._seen: dict[Hashable, float] = {}
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ caller side
    def submit(self, payload: Mapping, *, key: Hashable | None = None) -> bool:
        """Queue ``payload`` (JSON-safe) for posting; False if skipped, dropped or closed."""
        try:
            body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            self._count("failed")
            self._warn_once("json", "a message is not JSON (%s: %s).", type(exc).__name__, exc)
            return False
        now = time.monotonic()
        with self._cond:
            if self._closed:
                return False
            if key is not None and self._dedup_window > 0:
                self._seen = {k: t for k, t in self._seen.items() if now - t < self._dedup_window}
                if key in self._seen:
                    self.stats["deduplicated"] += 1
                    return False
            if len(self._items) >= self._max_queue:
                self.stats["dropped"] += 1
                self._warn_once(
                    "dropped", "queue full (%d waiting); dropping messages.", self._max_queue
                )
                return False
            if key is not None and self._dedup_window > 0:
                self._seen[key] = now
            self._items.append(body)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"lossforecast-{self.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return True

    def flush(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for every queued body to be sent or given up."""
        deadline = time.monotonic() + max(float(timeout), 0.0)
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float) -> bool:
        """Flush with a bounded wait, then stop; bodies still queued are counted as ``unsent``."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self.stats["unsent"] += len(self._items)
            self._items.clear()
            self._cond.notify_all()
        self._abort.set()
        if not done:
            self._warn_once("unsent", "gave up waiting at close; messages left unsent.")
        if any(self.stats[k] for k in ("failed", "dropped", "unsent")):
            logger.warning("lossforecast: %s: %s.", self.name, self._stats_text())
        elif self.stats["sent"]:
            logger.info("lossforecast: %s: %s.", self.name, self._stats_text())
        return done

    def _stats_text(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.stats.items() if v or k == "sent")

    # ------------------------------------------------------------------ sender thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                body = self._items.popleft()
            try:
                self._deliver(body)
            except Exception as exc:  # never let the thread die with an item in flight
                self._count("failed")
                self._warn_once("crash", "unexpected %s: %s", type(exc).__name__, self._redact(exc))
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _deliver(self, body: bytes) -> None:
        for attempt in range(self._max_retries + 1):
            delay, reason = self._post(body, attempt)
            if delay is None:
                if reason is None:
                    self._count("sent")
                else:
                    self._count("failed")
                    self._warn_once(reason, "%s; not retried.", reason)
                return
            if attempt == self._max_retries:
                break
            self._count("retries")
            logger.debug("lossforecast: %s: %s; retrying in %.1f s.", self.name, reason, delay)
            if self._abort.wait(delay):
                break
        self._count("failed")
        self._warn_once("gave-up", "giving up on a message after %s.", reason)

    def _post(self, body: bytes, attempt: int) -> tuple[float | None, str | None]:
        """One try: ``(None, None)`` sent, ``(None, why)`` failed, ``(delay, why)`` retry later."""
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "lossforecast"},
        )
        backoff = min(self._backoff * 2.0**attempt, self._max_backoff)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                response.read()
            return None, None
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            if exc.code == 429:
                after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                return (backoff if after is None else after), reason
            if exc.code >= 500 or exc.code == 408:
                return backoff, reason
            return None, reason
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            return backoff, f"{type(exc).__name__}: {self._redact(exc)}"

    # ------------------------------------------------------------------ helpers
    def _count(self, key: str) -> None:
        with self._cond:
            self.stats[key] += 1

    def _redact(self, exc: BaseException) -> str:
        return redact_urls(str(exc).replace(self._url, _where(self._url)))

    def _warn_once(self, key: str, message: str, *args) -> None:
        """Log a problem the first time it happens (later ones go to debug)."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, "lossforecast: %s: " + message, self.name, *args)

    def __repr__(self) -> str:
        return f"Sender({self.name})"


class HttpSink(Sink):
    """Post selected events as JSON to a webhook, through a background :class:`Sender`.

    Posts warnings, advice and the end-of-training summary, plus one forecast when the run
    first passes each of ``milestones`` (as a fraction of the forecast's target step), or every
    forecast if ``"forecast"`` is in ``kinds``. Repeated alerts (same kind and message) within
    ``dedup_window`` are sent once. Without a URL (argument or ``env_var``) the sink logs one
    info message and does nothing.

    Parameters
    ----------
    url : str, optional
        Webhook URL; if None, read from the environment variable ``env_var``.
    format : callable
        ``format(event, run_name) -> dict``: the JSON body for one event.
    env_var : str, optional
        Environment variable holding the URL. Default ``"LOSSFORECAST_WEBHOOK_URL"``.
    run_name : str, optional
        Label of the run, shown in messages.
    kinds : iterable of {'forecast', 'warning', 'advice', 'summary'}, optional
        What to post every time. Default ``('warning', 'advice', 'summary')``.
    milestones : iterable of float, optional
        Fractions of the run in (0, 1] at which one forecast is posted. Default (0.25, 0.5, 0.75).
    **options
        Passed to :class:`Sender` (``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``max_queue``, ``dedup_window``).

    Attributes
    ----------
    enabled : bool
        False when no URL was found.
    stats : dict of str to int
        The sender's counts (empty when disabled).

    Raises
    ------
    ValueError
        If the URL is not an http(s) URL (the message does not echo it), or an option is out
        of range.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        format: PayloadFormatter,
        env_var: str = "LOSSFORECAST_WEBHOOK_URL",
        run_name: str | None = None,
        kinds: Iterable[str] = DEFAULT_KINDS,
        milestones: Iterable[float] = DEFAULT_MILESTONES,
        _url_arg: str = "url",
        **options,
    ) -> None:
        if not callable(format):
            raise TypeError(f"`format` must be callable, got {type(format).__name__}.")
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"`kinds` must be among {KINDS}, got {bad[0]!r}.")
        milestones = tuple(sorted(float(m) for m in milestones))
        if any(not 0.0 < m <= 1.0 for m in milestones):
            raise ValueError(f"`milestones` must be fractions in (0, 1], got {milestones!r}.")
        if run_name is not None and not isinstance(run_name, str):
            raise TypeError(f"`run_name` must be a str, got {type(run_name).__name__}.")
        source = _url_arg
        if url is None:
            url, source = os.environ.get(env_var) or None, env_var
        self._format = format
        self.run_name = run_name
        self.kinds = kinds
        self.milestones = milestones
        self._next_milestone = 0
        self._sender: Sender | None = None
        if url is None:
            logger.info(
                "lossforecast: %s is off: no URL (pass `%s=` or set %s).",
                type(self).__name__,
                _url_arg,
                env_var,
            )
            return
        self._sender = Sender(_check_url(url, source), name=type(self).__name__, **options)

    @property
    def enabled(self) -> bool:
        return self._sender is not None

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._sender.stats) if self._sender is not None else {}

    def write(self, event: Event) -> None:
        """Queue the event if it is one to post; returns at once."""
        if self._sender is None or not self._wanted(event):
            return
        kind = "summary" if event.is_summary else event.kind
        self._sender.submit(self._format(event, self.run_name), key=(kind, event.message))

    def _wanted(self, event: Event) -> bool:
        if event.is_summary:
            return "summary" in self.kinds
        if event.kind != "forecast":
            return event.kind in self.kinds
        passed = self._passed_milestone(event)
        return "forecast" in self.kinds or passed

    def _passed_milestone(self, event: Event) -> bool:
        """True once for the first forecast at or past each milestone not yet posted."""
        target = event.data.get("target_step")
        if not isinstance(target, (int, float)) or target <= 0:
            return False
        progress = event.step / target
        passed = False
        while (
            self._next_milestone < len(self.milestones)
            and progress >= self.milestones[self._next_milestone]
        ):
            self._next_milestone += 1
            passed = True
        return passed

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait at most ``timeout`` seconds for queued messages; True if all were handled."""
        return True if self._sender is None else self._sender.flush(timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Flush with a bounded wait, then stop the sender (log its counts if any)."""
        if self._sender is not None:
            self._sender.close(5.0 if timeout is None else timeout)

    def __repr__(self) -> str:
        where = self._sender.name if self._sender is not None else f"{type(self).__name__}(off)"
        return f"<{where} kinds={self.kinds}>"
