"""Sink test fixtures: a real webhook server on 127.0.0.1 and events from a real forecaster."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lossforecast import Forecaster
from lossforecast._events import Event, forecast_event, summary_event

SECRET_PATH = "/services/T0SECRET/B0SECRET/xoxSECRETTOKEN"


class Hook:
    """A real HTTP server that records every POST and answers from a script.

    ``script`` holds the answers to the next requests, in order: ``(status, headers)`` or
    ``("slow", seconds)`` (sleep, then 200). With the script empty the answer is 200.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: deque = deque()
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hook._lock:
                    hook.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "json": json.loads(body),
                            "time": time.monotonic(),
                        }
                    )
                    answer = hook.script.popleft() if hook.script else (200, {})
                if answer[0] == "slow":
                    time.sleep(answer[1])
                    answer = (200, {})
                status, headers = answer
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client timed out and left
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def bodies(self) -> list[dict]:
        with self._lock:
            return [r["json"] for r in self.requests]

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        """Wait until ``n`` requests arrived."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook(monkeypatch):
    """A running :class:`Hook`; proxies are bypassed for 127.0.0.1."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = Hook()
    yield server
    server.close()


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 whose port has no listener (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{SECRET_PATH}"


def warning(step: int, message: str = "loss spike: 4.10 vs 2.90 expected") -> Event:
    return Event("warning", "warning", step, message, {"loss": 4.1, "expected": 2.9})


def run_events(total: int = 1000, every: int = 100, seed: int = 0) -> list[Event]:
    """Events of a small synthetic run (WSD schedule) forecast with the real ``Forecaster``.

    Forecast events (with trajectories) every ``every`` steps from step 200, one warning, one
    advice, and the end-of-training summary.
    """
    rng = np.random.default_rng(seed)
    lr = np.r_[
        np.linspace(1e-4, 1e-3, 50), np.full(total - 250, 1e-3), np.linspace(1e-3, 1e-5, 200)
    ]
    area = np.cumsum(lr / lr.max())
    deficit = np.cumsum(np.where(np.arange(total) > 50, lr.max() - lr, 0.0)) / lr.max()
    clean = 2.0 + 3.0 * area**-0.35 - 0.3 * (1.0 - (1.0 + deficit / 20.0) ** -0.6)
    loss = clean + rng.normal(0, 0.01, total)
    fc = Forecaster(lr)
    events: list[Event] = []
    last = None
    for step in range(0, total, 5):
        fc.update(step, loss[step])
        if step >= 200 and step % every == 0:
            f = fc.forecast()
            if f is None:
                continue
            last = f
            future = np.unique(np.linspace(step, total - 1, 24).astype(int))
            predicted = fc.trajectory(future)
            events.append(
                forecast_event(
                    f,
                    step=step,
                    observed_loss=float(loss[step - 20 : step + 1].mean()),
                    residual=float(loss[step] - fc.trajectory([step])[0][0]),
                    trajectory=(future, *predicted),
                    extra={"seconds_to_finish": float(total - step) * 0.5},
                )
            )
        if step == 400:
            events.append(warning(step))
        if step == 700:
            events.append(Event("advice", "info", step, "cooling down now would reach 2.20"))
    events.append(summary_event(total - 1, float(clean[-1]), last, extra={"forecasts": 8}))
    return events


@pytest.fixture(scope="session")
def events() -> list[Event]:
    """The events of :func:`run_events` (built once per session)."""
    return run_events()


@pytest.fixture
def make_warning():
    """``make_warning(step, message=...)``: a warning event."""
    return warning
