"""Tests for lossforecast._events: the Event model, its helpers and the EventBus."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time

import numpy as np
import pytest

from lossforecast import Forecast, Forecaster, Trajectory
from lossforecast._events import Event, EventBus, forecast_event, summary_event
from lossforecast.sinks import Sink

FORECAST = Forecast(999, 2.91, 2.87, 2.95, 0.8, "multi-power", 40, 0.01, 400)


class Collect(Sink):
    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.closed_with: float | None = None

    def write(self, event: Event) -> None:
        self.seen.append(event)

    def close(self, timeout: float | None = None) -> None:
        self.closed_with = timeout


class Broken(Sink):
    def __init__(self) -> None:
        self.calls = 0

    def write(self, event: Event) -> None:
        self.calls += 1
        raise RuntimeError("cannot reach https://hooks.example.com/services/T1/B2/SECRET")


# ---------------------------------------------------------------------------- Event
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": "alert"}, ValueError, "`kind` must be one of"),
        ({"severity": "debug"}, ValueError, "`severity` must be one of"),
        ({"step": -1}, ValueError, "`step` must be a non-negative int, got -1"),
        ({"step": 1.5}, ValueError, "`step` must be a non-negative int, got 1.5"),
        ({"step": True}, ValueError, "`step` must be a non-negative int, got True"),
        ({"message": "  "}, ValueError, "`message` must be a non-empty str"),
        ({"data": [1]}, TypeError, "`data` must be a dict, got list"),
        ({"data": {1: 2.0}}, TypeError, "`data` keys must be str, got 1"),
        ({"data": {"x": [1.0]}}, TypeError, r"`data\['x'\]` must be a float, int or str, got list"),
        ({"data": {"x": None}}, TypeError, "got NoneType"),
        ({"time": math.nan}, ValueError, "`time` must be a finite Unix time"),
        ({"trajectory": (1, 2)}, TypeError, "`trajectory` must be a Trajectory, got tuple"),
    ],
)
def test_event_rejects(kwargs, error, match):
    args = {"kind": "warning", "severity": "warning", "step": 3, "message": "m"} | kwargs
    with pytest.raises(error, match=match):
        Event(**args)


def test_event_is_frozen_and_copies_data():
    data = {"loss": 4.2}
    e = Event("warning", "warning", np.int64(7), "spike", data)
    data["loss"] = 0.0
    assert e.data == {"loss": 4.2}
    assert type(e.step) is int and e.step == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.step = 8


def test_event_data_becomes_builtins():
    e = Event(
        "advice", "info", 0, "m", {"a": np.float32(1.5), "b": np.int64(3), "c": True, "d": "x"}
    )
    assert e.data == {"a": 1.5, "b": 3, "c": 1, "d": "x"}
    assert [type(v) for v in e.data.values()] == [float, int, int, str]


def test_event_defaults_time_to_now():
    before = time.time()
    e = Event("advice", "info", 0, "m")
    assert before <= e.time <= time.time()
    assert e.data == {} and e.trajectory is None and not e.is_summary


def test_to_dict_is_strict_json():
    traj = Trajectory(np.array([10, 20]), np.array([2.0, math.inf]), [1.9, 1.8], (2.1, 2.2))
    e = Event("forecast", "info", 5, "m", {"x": math.nan, "y": 1}, time=12.5, trajectory=traj)
    out = json.loads(json.dumps(e.to_dict(), allow_nan=False))
    assert out == {
        "kind": "forecast",
        "severity": "info",
        "step": 5,
        "message": "m",
        "data": {"x": None, "y": 1},
        "time": 12.5,
        "trajectory": {
            "steps": [10, 20],
            "loss": [2.0, None],
            "low": [1.9, 1.8],
            "high": [2.1, 2.2],
        },
    }


# ---------------------------------------------------------------------------- Trajectory
@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], [], [], []), "non-empty 1-d sequence of integers"),
        (([1, 2], [1.0], [1.0, 1.0], [1.0, 1.0]), "loss has 1 values for 2 steps"),
        (([2, 2], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]), "strictly increasing"),
        (([1.5, 2], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]), "non-empty 1-d sequence of integers"),
    ],
)
def test_trajectory_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        forecast_event(FORECAST, trajectory=args)
    with pytest.raises(ValueError, match=match):
        Event("forecast", "info", 1, "m", trajectory=Trajectory(*args))


def test_trajectory_is_a_read_only_copy():
    steps = np.array([10, 20])
    e = forecast_event(FORECAST, trajectory=(steps, [2.0, 1.9], [1.9, 1.8], [2.1, 2.0]))
    steps[0] = 0
    assert isinstance(e.trajectory, Trajectory) and e.trajectory.steps.tolist() == [10, 20]
    with pytest.raises(ValueError, match="read-only"):
        e.trajectory.loss[0] = 0.0


# ---------------------------------------------------------------------------- helpers
def test_forecast_event_from_a_real_forecaster():
    lr = np.r_[np.linspace(0, 1e-3, 100), np.full(900, 1e-3)]
    fc = Forecaster(lr)
    for s in range(100, 500, 10):
        fc.update(s, 3.0 + 2.0 * (s / 1000) ** -0.5)
    f = fc.forecast()
    steps = np.array([490, 700, 999])
    e = forecast_event(
        f,
        observed_loss=5.9,
        residual=-0.01,
        trajectory=(steps, *fc.trajectory(steps)),
        extra={"seconds_to_finish": 60.0},
    )
    assert (e.kind, e.severity, e.step) == ("forecast", "info", f.observed_step)
    assert e.data["final_loss"] == f.loss and e.data["low"] == f.low and e.data["high"] == f.high
    assert e.data["target_step"] == 999 and e.data["law"] == f.law
    assert e.data["observed_loss"] == 5.9 and e.data["residual"] == -0.01
    assert e.data["seconds_to_finish"] == 60.0
    assert e.trajectory.steps.tolist() == [490, 700, 999]
    assert e.trajectory.loss[-1] == pytest.approx(f.loss)
    assert e.message == f"final loss {f.loss:.4g} [{f.low:.4g}, {f.high:.4g}] at step 999 (80%)"


def test_forecast_event_step_override_and_no_optional_keys():
    e = forecast_event(FORECAST, step=410)
    assert e.step == 410
    assert "observed_loss" not in e.data and "residual" not in e.data and e.trajectory is None


@pytest.mark.parametrize(
    ("reached", "inside", "words"),
    [(2.90, 1, "+0.34%, inside the 80% interval"), (3.00, 0, "-3.00%, outside the 80% interval")],
)
def test_summary_event_compares_with_the_outcome(reached, inside, words):
    e = summary_event(999, reached, FORECAST, extra={"forecasts": 12})
    assert e.is_summary and e.kind == "forecast" and e.step == 999
    assert e.data["reached_loss"] == reached and e.data["inside"] == inside
    assert e.data["error"] == pytest.approx(2.91 - reached)
    assert e.data["rel_error"] == pytest.approx((2.91 - reached) / reached)
    assert e.data["forecasts"] == 12
    assert e.message.endswith(f"({words})")


def test_summary_event_without_forecast():
    e = summary_event(50, 3.5)
    assert e.is_summary and e.data == {"final": 1, "reached_loss": 3.5}
    assert "no forecast" in e.message


# ---------------------------------------------------------------------------- EventBus
def test_bus_keeps_events_and_writes_every_sink_in_order():
    a, b = Collect(), Collect()
    bus = EventBus([a, b])
    events = [Event("advice", "info", i, f"m{i}") for i in range(3)]
    for e in events:
        bus.emit(e)
    assert bus.events == events and a.seen == events and b.seen == events


def test_bus_disables_a_failing_sink_once_and_never_raises(caplog):
    bad, good = Broken(), Collect()
    bus = EventBus([bad, good])
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            bus.emit(Event("advice", "info", i, "m"))
    assert bad.calls == 1 and len(good.seen) == 3
    assert bus.disabled == [bad]
    records = [r for r in caplog.records if "Broken" in r.getMessage()]
    assert len(records) == 1
    assert "RuntimeError" in records[0].getMessage()
    assert "SECRET" not in caplog.text and "hooks.example.com" not in caplog.text


def test_bus_close_passes_a_bounded_timeout_and_stops_emitting():
    sink = Collect()
    bus = EventBus([sink])
    bus.close(timeout=2.0)
    assert 0.0 < sink.closed_with <= 2.0
    bus.emit(Event("advice", "info", 1, "late"))
    assert sink.seen == [] and bus.events == []


def test_bus_close_is_bounded_even_if_a_sink_hangs(caplog):
    release = threading.Event()

    class Hangs(Collect):
        def close(self, timeout=None):
            release.wait(10)

    after = Collect()
    bus = EventBus([Hangs(), after])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        bus.close(timeout=0.3)
    assert time.monotonic() - start < 1.0
    assert "Hangs did not close within 0.3 s" in caplog.text
    release.set()


def test_bus_closes_duck_typed_sinks_without_timeout():
    class Duck:
        closed = False

        def write(self, event):
            pass

        def close(self):
            Duck.closed = True

    EventBus([Duck()]).close()
    assert Duck.closed


def test_bus_drops_oldest_plain_forecast_first():
    bus = EventBus(max_events=3)
    warn = Event("warning", "warning", 0, "w")
    f1, f2, f3 = (forecast_event(FORECAST, step=s) for s in (1, 2, 3))
    for e in (warn, f1, f2, f3):
        bus.emit(e)
    assert bus.events == [warn, f2, f3]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_events": 0}, ValueError, "`max_events` must be a positive int, got 0"),
        ({"sinks": [object()]}, TypeError, "`sinks` must have a write"),
    ],
)
def test_bus_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        EventBus(**kwargs)


def test_bus_emit_rejects_non_events():
    with pytest.raises(TypeError, match="`event` must be an Event, got dict"):
        EventBus().emit({"kind": "forecast"})


def test_bus_emit_is_thread_safe():
    sink = Collect()
    bus = EventBus([sink])

    def work(k):
        for i in range(200):
            bus.emit(Event("advice", "info", i, f"t{k}"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(bus.events) == len(sink.seen) == 800
