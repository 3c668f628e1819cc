"""Tests for lossforecast.sinks._webhook and the shared sender, against a real HTTP server.

The sending contract (retries, 429, timeouts, refused connections, overflow, de-duplication,
bounded flush, no URL in the logs) runs for both sinks built on the sender.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import pytest

from lossforecast._events import Event, EventBus
from lossforecast.sinks import HttpSink, SlackSink, WebhookSink, json_payload
from lossforecast.sinks._sender import Sender, _retry_after

FAST = {"backoff": 0.02, "max_backoff": 0.2, "timeout": 2.0}


@pytest.fixture(params=[WebhookSink, SlackSink], ids=["webhook", "slack"])
def sink_cls(request):
    return request.param


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.DEBUG, logger="lossforecast")
    return caplog


def assert_no_secret(caplog, sink) -> None:
    text = caplog.text + repr(sink) + str(sink.stats)
    assert "SECRET" not in text and "/services/" not in text


def alert(step: int, message: str | None = None) -> Event:
    return Event("warning", "warning", step, message or f"loss spike at step {step}", {"loss": 4.0})


# ---------------------------------------------------------------------------- contract
def test_200_delivers_each_alert_once_in_order(hook, sink_cls, caplog):
    sink = sink_cls(hook.url, **FAST)
    start = time.monotonic()
    for step in (10, 20, 30):
        sink.write(alert(step))
    assert time.monotonic() - start < 0.1  # write only queues
    assert sink.flush(5.0)
    assert [r["path"] for r in hook.requests] == ["/services/T0SECRET/B0SECRET/xoxSECRETTOKEN"] * 3
    assert all(r["headers"]["Content-Type"] == "application/json" for r in hook.requests)
    texts = [b["text"] for b in hook.bodies]
    assert [("step 10" in t, "step 20" in t, "step 30" in t) for t in texts] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    sink.close(1.0)
    assert sink.stats == {
        "sent": 3,
        "failed": 0,
        "dropped": 0,
        "deduplicated": 0,
        "retries": 0,
        "unsent": 0,
    }
    assert "3 sent" in caplog.text
    assert_no_secret(caplog, sink)


def test_429_waits_for_retry_after(hook, sink_cls, caplog):
    hook.script.append((429, {"Retry-After": "1"}))
    sink = sink_cls(hook.url, **FAST)
    sink.write(alert(1))
    assert sink.flush(5.0)
    assert len(hook.requests) == 2 and hook.bodies[0] == hook.bodies[1]
    gap = hook.requests[1]["time"] - hook.requests[0]["time"]
    assert 0.95 <= gap < 2.0  # Retry-After, not the 0.02 s backoff
    assert sink.stats["sent"] == 1 and sink.stats["retries"] == 1
    assert_no_secret(caplog, sink)


def test_500_is_retried_with_exponential_backoff(hook, sink_cls, caplog):
    hook.script.extend([(500, {}), (500, {}), (500, {})])
    sink = sink_cls(hook.url, backoff=0.1, max_retries=3, timeout=2.0)
    sink.write(alert(1))
    assert sink.flush(5.0)
    times = [r["time"] for r in hook.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 4 and sink.stats["sent"] == 1 and sink.stats["retries"] == 3
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4  # 0.1, 0.2, 0.4
    assert gaps[2] > gaps[0]
    assert_no_secret(caplog, sink)


def test_500_forever_gives_up_after_max_retries_and_logs_once(hook, sink_cls, caplog):
    hook.script.extend([(500, {})] * 20)
    sink = sink_cls(hook.url, max_retries=2, **FAST)
    sink.write(alert(1))
    sink.write(alert(2))
    assert sink.flush(5.0)
    assert len(hook.requests) == 6
    assert sink.stats["failed"] == 2 and sink.stats["sent"] == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "giving up on a message after HTTP 500" in warnings[0].getMessage()
    )
    assert f"127.0.0.1:{hook.server.server_address[1]}" in warnings[0].getMessage()
    sink.close(1.0)
    assert "2 failed" in caplog.text
    assert_no_secret(caplog, sink)


def test_4xx_is_not_retried(hook, sink_cls, caplog):
    hook.script.append((404, {}))
    sink = sink_cls(hook.url, **FAST)
    sink.write(alert(1))
    assert sink.flush(5.0)
    assert len(hook.requests) == 1 and sink.stats["failed"] == 1 and sink.stats["retries"] == 0
    assert "HTTP 404; not retried" in caplog.text
    assert_no_secret(caplog, sink)


def test_slow_server_times_out_retries_then_recovers(hook, sink_cls, caplog):
    hook.script.extend([("slow", 1.0), ("slow", 1.0)])
    sink = sink_cls(hook.url, timeout=0.2, max_retries=1, backoff=0.01)
    start = time.monotonic()
    sink.write(alert(1))
    sink.write(alert(2))
    assert sink.flush(3.0)
    assert time.monotonic() - start < 1.5  # two timeouts of 0.2 s, not two slow answers
    assert sink.stats["failed"] == 1 and sink.stats["sent"] == 1
    assert len(hook.requests) == 3  # try + retry of the first, then the second at once
    assert [("step 1" in b["text"], "step 2" in b["text"]) for b in hook.bodies] == [
        (True, False),
        (True, False),
        (False, True),
    ]
    assert "timed out" in caplog.text
    assert_no_secret(caplog, sink)


def test_connection_refused_fails_quietly(refused_url, sink_cls, caplog):
    sink = sink_cls(refused_url, max_retries=2, **FAST)
    sink.write(alert(1))
    assert sink.flush(3.0)
    assert sink.stats["failed"] == 1 and sink.stats["retries"] == 2
    assert "Connection refused" in caplog.text or "URLError" in caplog.text
    assert_no_secret(caplog, sink)


def test_flush_and_close_are_bounded_while_the_server_hangs(hook, sink_cls, caplog):
    hook.script.extend([("slow", 3.0)] * 3)
    sink = sink_cls(hook.url, timeout=5.0, max_retries=0)
    for step in (1, 2, 3):
        sink.write(alert(step))
    start = time.monotonic()
    assert sink.flush(0.3) is False
    assert 0.25 <= time.monotonic() - start < 0.8
    start = time.monotonic()
    sink.close(0.2)
    assert time.monotonic() - start < 0.6
    assert sink.stats["unsent"] == 2  # one in flight, two never sent
    assert "messages left unsent" in caplog.text
    sink.write(alert(4))  # after close: ignored, no raise
    assert_no_secret(caplog, sink)


def test_overflow_drops_and_counts(hook, sink_cls, caplog):
    hook.script.append(("slow", 0.5))
    sink = sink_cls(hook.url, max_queue=2, **FAST)
    sink.write(alert(0))
    hook.wait_for(1)  # the first is in flight, the queue is empty
    for step in range(1, 6):
        sink.write(alert(step))
    assert sink.flush(5.0)
    assert sink.stats["dropped"] == 3 and sink.stats["sent"] == 3
    assert len(hook.requests) == 3
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("queue full" in r.getMessage() for r in warned) == 1
    assert_no_secret(caplog, sink)


def test_a_body_that_is_not_json_is_counted_not_raised(hook, caplog):
    sink = WebhookSink(hook.url, format=lambda event, run: {"loss": math.nan}, **FAST)
    sink.write(alert(1))
    sink.write(alert(2))
    assert sink.flush(1.0) and hook.requests == []
    assert sink.stats["failed"] == 2
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "not JSON" in warned[0].getMessage()


def test_a_dropped_alert_is_not_remembered_as_sent(hook, sink_cls):
    hook.script.append(("slow", 0.3))
    sink = sink_cls(hook.url, max_queue=1, **FAST)
    sink.write(alert(0))
    hook.wait_for(1)
    sink.write(alert(1, "queued"))
    sink.write(alert(2, "dropped"))
    assert sink.flush(5.0)
    sink.write(alert(3, "dropped"))  # same kind and message as the dropped one: sent now
    assert sink.flush(5.0)
    assert sink.stats["dropped"] == 1 and sink.stats["deduplicated"] == 0
    assert len(hook.requests) == 3


def test_repeated_alerts_are_sent_once_within_the_window(hook, sink_cls):
    sink = sink_cls(hook.url, **FAST)
    for step in (1, 2, 3):
        sink.write(alert(step, "loss is NaN"))
    sink.write(alert(4, "loss spike"))
    assert sink.flush(5.0)
    assert len(hook.requests) == 2 and sink.stats["deduplicated"] == 2
    no_window = sink_cls(hook.url, dedup_window=0.0, **FAST)
    for step in (1, 2):
        no_window.write(alert(step, "loss is NaN"))
    assert no_window.flush(5.0) and len(hook.requests) == 4


def test_never_raises_into_the_bus_and_closes_in_time(hook, sink_cls):
    hook.script.extend([("slow", 3.0)] * 2)
    sink = sink_cls(hook.url, timeout=5.0)
    bus = EventBus([sink])
    bus.emit(alert(1))
    bus.emit(alert(2))
    start = time.monotonic()
    bus.close(timeout=0.3)
    assert time.monotonic() - start < 0.8 and bus.disabled == []


def test_selects_warnings_advice_milestones_and_the_summary(hook, sink_cls, events):
    sink = sink_cls(hook.url, **FAST)
    for event in events:
        sink.write(event)
    assert sink.flush(5.0)
    # forecasts at steps 200..900 of 999: milestones 0.25, 0.5, 0.75 first passed at 300, 500, 800
    texts = [b["text"] for b in hook.bodies]
    assert len(texts) == 6
    for text, words in zip(
        texts, ["step 300", "step 400", "step 500", "step 700", "step 800", "step 999"], strict=True
    ):
        assert words in text


# ---------------------------------------------------------------------------- construction
def test_missing_url_is_one_info_and_inert(monkeypatch, caplog, sink_cls):
    monkeypatch.delenv("LOSSFORECAST_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("LOSSFORECAST_SLACK_WEBHOOK", raising=False)
    sink = sink_cls()
    sink.write(alert(1))
    sink.close()
    assert not sink.enabled and sink.stats == {} and sink.flush(0.1)
    infos = [r.getMessage() for r in caplog.records if r.name.startswith("lossforecast")]
    assert len(infos) == 1 and f"{sink_cls.__name__} is off: no URL" in infos[0]


def test_url_from_the_environment(hook, monkeypatch):
    monkeypatch.setenv("LOSSFORECAST_WEBHOOK_URL", hook.url)
    sink = WebhookSink(**FAST)
    sink.write(alert(1))
    assert sink.enabled and sink.flush(5.0) and len(hook.requests) == 1


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://files.example.com/SECRET", "got one with scheme 'ftp'"),
        ("hooks.example.com/SECRET", "got one with no scheme"),
        ("https:///SECRET", "with a host"),
    ],
)
def test_bad_url_is_rejected_without_echoing_it(url, match, sink_cls):
    with pytest.raises(ValueError, match=match) as info:
        sink_cls(url)
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kinds": ("warning", "alert")}, r"`kinds` must be among .*, got 'alert'"),
        ({"milestones": (0.5, 1.5)}, r"`milestones` must be fractions in \(0, 1\]"),
        ({"timeout": 0}, "`timeout` must be positive, got 0"),
        ({"backoff": -1}, "`backoff` must be a finite number >= 0, got -1"),
        ({"max_retries": -1}, "`max_retries` must be an int >= 0, got -1"),
        ({"max_queue": 0}, "`max_queue` must be an int >= 1, got 0"),
        ({"dedup_window": math.inf}, "`dedup_window` must be a finite number"),
    ],
)
def test_rejects(kwargs, match, sink_cls):
    with pytest.raises(ValueError, match=match):
        sink_cls("https://hooks.example.com/x", **kwargs)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), ("0.5", 0.5), ("-3", 0.0), ("9999", 300.0), ("soon", None), (None, None)],
)
def test_retry_after_parsing(header, seconds):
    assert _retry_after(header) == seconds


def test_retry_after_http_date():
    from email.utils import formatdate

    assert 8.0 <= _retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10.0


def test_both_sinks_are_the_one_http_sink_and_sender():
    assert SlackSink.__mro__[1] is HttpSink and WebhookSink.__mro__[1] is HttpSink
    for cls in (SlackSink, WebhookSink):
        assert isinstance(cls("https://hooks.example.com/x")._sender, Sender)


# ---------------------------------------------------------------------------- webhook payload
def test_generic_json_body(hook, events):
    sink = WebhookSink(hook.url, run_name="gpt-small", kinds=("forecast", "summary"), **FAST)
    for event in events:
        sink.write(event)
    assert sink.flush(5.0)
    bodies = hook.bodies
    # every forecast whose text differs from the last posted one (de-duplication), and the summary
    distinct = {e.message for e in events if e.kind == "forecast" and not e.is_summary}
    assert len(distinct) >= 5 and len(bodies) == len(distinct) + 1
    first, last = bodies[0], bodies[-1]
    assert first == {
        "source": "lossforecast",
        "run": "gpt-small",
        "text": first["text"],
        **events[0].to_dict(),
    }
    assert first["text"] == f"lossforecast gpt-small forecast at step 200: {events[0].message}"
    assert first["trajectory"]["steps"] == list(events[0].trajectory.steps)
    assert last["data"]["final"] == 1 and last["text"].startswith("lossforecast gpt-small summary")


def test_non_finite_numbers_become_null(hook):
    sink = WebhookSink(hook.url, **FAST)
    sink.write(Event("warning", "critical", 5, "loss is NaN", {"loss": math.nan}))
    assert sink.flush(5.0)
    assert hook.bodies[0]["data"] == {"loss": None}


def test_any_schema_by_a_format_function(hook):
    def discord(event, run_name):
        return {"content": f"[{run_name}] {event.message}"}

    sink = WebhookSink(hook.url, format=discord, run_name="r1", **FAST)
    sink.write(alert(3, "loss spike"))
    assert sink.flush(5.0)
    assert hook.bodies == [{"content": "[r1] loss spike"}]


def test_json_payload_is_pure():
    e = Event("advice", "info", 800, "cool down now")
    assert json_payload(e) == {
        "source": "lossforecast",
        "run": None,
        "text": "lossforecast advice at step 800: cool down now",
        **e.to_dict(),
    }
