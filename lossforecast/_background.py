"""Fit a forecaster on a daemon thread, so the training loop never waits on a fit."""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

__all__ = ["BackgroundFitter"]

logger = logging.getLogger(__name__)


class _Refittable(Protocol):
    def refit(self) -> bool: ...


class BackgroundFitter:
    """Run ``forecaster.refit()`` on a daemon thread whenever :meth:`notify` is called.

    Signals that arrive while a fit runs are merged into one more fit, so at most one fit is
    in flight and the fit never falls behind by more than one round. :meth:`notify` only sets
    a flag: the caller never blocks. An exception raised by ``refit`` is caught, counted in
    :attr:`n_errors` and logged once (later ones at debug level), and the thread goes on.

    Parameters
    ----------
    forecaster : object with ``refit() -> bool``
        Usually a :class:`~lossforecast.Forecaster`; its ``refit`` must be thread-safe.
    max_duty : float, optional
        Largest fraction of wall time spent fitting, in (0, 1]. After a fit of ``t`` seconds
        the next one starts at least ``t * (1 / max_duty - 1)`` seconds later, so fitting
        takes at most this share of one core from training. Default 0.02.
    name : str, optional
        Name of the thread. Default ``"lossforecast-fit"``.

    Raises
    ------
    ValueError
        If ``max_duty`` is outside (0, 1].

    Examples
    --------
    >>> import threading
    >>> class Stub:
    ...     fitted = threading.Event()
    ...     def refit(self):
    ...         self.fitted.set()
    ...         return True
    >>> stub = Stub()
    >>> fitter = BackgroundFitter(stub)
    >>> fitter.notify()
    >>> stub.fitted.wait(timeout=5.0)
    True
    >>> fitter.close(timeout=5.0), fitter.n_fits, fitter.n_errors
    (True, 1, 0)
    """

    def __init__(
        self, forecaster: _Refittable, *, max_duty: float = 0.02, name: str = "lossforecast-fit"
    ) -> None:
        if not 0.0 < max_duty <= 1.0:
            raise ValueError(f"`max_duty` must be in (0, 1], got {max_duty!r}.")
        self._forecaster = forecaster
        self._max_duty = float(max_duty)
        self._name = name
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.n_fits = 0
        self.n_errors = 0
        self.last_error: str | None = None
        self.fit_seconds = 0.0

    def notify(self) -> None:
        """Ask for a fit; returns at once. Signals before the fit starts are merged."""
        if self._closing.is_set():
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread, waiting at most ``timeout`` seconds for a running fit; True if it ended.

        A fit already running is let finish (its result is kept); a pending signal is dropped.
        """
        self._closing.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._closing.is_set():
                return
            self._wake.clear()
            start = time.perf_counter()
            try:
                self._forecaster.refit()
                self.n_fits += 1
            except Exception as exc:  # a failing fit must never reach the training loop
                self._record_error(exc)
            spent = time.perf_counter() - start
            self.fit_seconds += spent
            # Keep the fitting share of wall time under max_duty; wakes at once on close().
            if self._closing.wait(spent * (1.0 / self._max_duty - 1.0)):
                return

    def _record_error(self, exc: Exception) -> None:
        self.n_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.n_errors == 1:
            logger.warning(
                "lossforecast: a background fit raised %s; training goes on and later errors are "
                "logged at debug level.",
                self.last_error,
                exc_info=exc,
            )
        else:
            logger.debug("lossforecast: background fit raised %s", self.last_error)
