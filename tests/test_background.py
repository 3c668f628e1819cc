"""Tests for the background fitter: coalescing, never blocking, bounded close, errors."""

from __future__ import annotations

import threading
import time

import pytest

from lossforecast._background import BackgroundFitter


class GatedFit:
    """A refit that waits for a gate, counting calls."""

    def __init__(self, fail=False):
        self.calls = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail = fail

    def refit(self):
        self.calls += 1
        self.started.set()
        self.gate.wait(10.0)
        if self.fail:
            raise RuntimeError("fit exploded")
        return True


@pytest.mark.parametrize("max_duty", [0.0, -0.1, 1.5])
def test_rejects_max_duty(max_duty):
    with pytest.raises(ValueError, match="`max_duty`"):
        BackgroundFitter(GatedFit(), max_duty=max_duty)


def test_signals_during_a_fit_coalesce_into_one_more_fit():
    fit = GatedFit()
    fitter = BackgroundFitter(fit, max_duty=1.0)
    fitter.notify()
    assert fit.started.wait(5.0)
    for _ in range(50):  # all while the first fit is running: never blocks
        fitter.notify()
    fit.gate.set()
    deadline = time.monotonic() + 5.0
    while fitter.n_fits < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert fitter.close(5.0)
    assert (fit.calls, fitter.n_fits) == (2, 2)


def test_notify_never_waits_for_a_running_fit():
    fit = GatedFit()
    fitter = BackgroundFitter(fit)
    fitter.notify()
    assert fit.started.wait(5.0)
    start = time.perf_counter()
    for _ in range(1000):
        fitter.notify()
    assert time.perf_counter() - start < 1.0  # the fit is still blocked on its gate
    fit.gate.set()
    assert fitter.close(5.0)


def test_close_waits_a_bounded_time_for_a_stuck_fit():
    fit = GatedFit()
    fitter = BackgroundFitter(fit)
    fitter.notify()
    assert fit.started.wait(5.0)
    assert fitter.close(timeout=0.05) is False and fitter.running
    fit.gate.set()
    assert fitter.close(timeout=5.0) and not fitter.running
    fitter.notify()  # ignored once closed
    assert not fitter.running


def test_errors_are_counted_and_logged_once(caplog):
    fit = GatedFit(fail=True)
    fit.gate.set()
    fitter = BackgroundFitter(fit, max_duty=1.0)
    with caplog.at_level("DEBUG", logger="lossforecast"):
        for _ in range(3):
            fit.started.clear()
            fitter.notify()
            assert fit.started.wait(5.0)
            deadline = time.monotonic() + 5.0
            while fitter.n_errors < fit.calls and time.monotonic() < deadline:
                time.sleep(0.005)
        assert fitter.close(5.0)
    assert fitter.n_errors == fit.calls == 3 and fitter.n_fits == 0
    assert "RuntimeError: fit exploded" in fitter.last_error
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "fit exploded" in warnings[0].getMessage()


def test_duty_cycle_spaces_fits_out():
    class Slow:
        calls = 0

        def refit(self):
            self.calls += 1
            time.sleep(0.02)
            return True

    slow = Slow()
    fitter = BackgroundFitter(slow, max_duty=0.1)  # a 20 ms fit, then at least 180 ms of rest
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        fitter.notify()
        time.sleep(0.005)
    assert fitter.close(5.0)
    assert 1 <= slow.calls <= 3


def test_close_without_any_fit_returns_at_once():
    assert BackgroundFitter(GatedFit()).close(0.0)
