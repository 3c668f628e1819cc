"""Tests for lossforecast.sinks._slack: what reaches a (real, local) Slack-style webhook.

The sending contract shared with WebhookSink (200/429/500/slow/refused, overflow, dedup,
bounded flush, no URL in logs) is in test_webhook.py and runs for SlackSink too.
"""

from __future__ import annotations

import logging

import pytest

from lossforecast._events import Event, summary_event
from lossforecast.sinks import SlackSink, slack_payload

FAST = {"backoff": 0.02, "max_backoff": 0.2, "timeout": 2.0}


def test_default_posts_warning_advice_milestones_and_one_summary(hook, events):
    sink = SlackSink(hook.url, run_name="gpt-small", **FAST)
    for event in events:
        sink.write(event)
    sink.close(5.0)
    titles = [b["blocks"][0]["text"]["text"].split("*")[1] for b in hook.bodies]
    assert titles == [
        "Forecast at 30% of the run (step 300)",
        "Warning at step 400",
        "Forecast at 50% of the run (step 500)",
        "Advice at step 700",
        "Forecast at 80% of the run (step 800)",
        "Training finished",
    ]
    assert all("(lossforecast · gpt-small)" in b["blocks"][0]["text"]["text"] for b in hook.bodies)


def test_summary_message_compares_forecast_with_the_loss_reached(hook, events):
    sink = SlackSink(hook.url, kinds=("summary",), milestones=(), **FAST)
    for event in events:
        sink.write(event)
    assert sink.flush(5.0)
    (body,) = hook.bodies
    data = events[-1].data
    fields = [f["text"] for f in body["blocks"][1]["fields"]]
    assert fields == [
        f"*Loss reached*\n{data['reached_loss']:.4f}",
        f"*Forecast final loss*\n{data['final_loss']:.4f}",
        f"*80% interval*\n{data['low']:.4f} - {data['high']:.4f}",
        f"*Error*\n{data['error']:+.4f} ({data['rel_error']:+.2%})",
        "*Forecast made at step*\n900",
    ]
    assert (
        body["text"] == f":checkered_flag: lossforecast · Training finished: {events[-1].message}"
    )


@pytest.mark.parametrize(
    ("kinds", "milestones", "expected"),
    [
        (("warning",), (), 1),  # only the warning
        (("forecast",), (), None),  # every forecast update (repeated texts de-duplicated)
        ((), (0.5,), 1),  # one forecast, at half-way
        ((), (1.0,), 0),  # never reached by a forecast (the summary is not a forecast update)
    ],
)
def test_kinds_and_milestones_choose_what_is_posted(hook, events, kinds, milestones, expected):
    sink = SlackSink(hook.url, kinds=kinds, milestones=milestones, **FAST)
    for event in events:
        sink.write(event)
    assert sink.flush(5.0)
    if expected is None:
        expected = len({e.message for e in events if e.kind == "forecast" and not e.is_summary})
        assert expected >= 5
    assert len(hook.requests) == expected


def test_url_from_the_environment_and_never_in_logs(hook, monkeypatch, caplog):
    monkeypatch.setenv("LOSSFORECAST_SLACK_WEBHOOK", hook.url)
    caplog.set_level(logging.DEBUG, logger="lossforecast")
    sink = SlackSink(**FAST)
    sink.write(Event("warning", "critical", 9, "loss is NaN"))
    sink.close(5.0)
    assert len(hook.requests) == 1
    assert "SECRET" not in caplog.text + repr(sink) and "127.0.0.1" in repr(sink)


def test_payload_blocks_escape_slack_markup():
    body = slack_payload(Event("advice", "info", 7, "loss <2.9 & falling", {"gain": 0.1}))
    section, fields, context = body["blocks"]
    assert section == {
        "type": "section",
        "text": {
            "type": "mrkdwn",
            "text": ":bulb: *Advice at step 7* (lossforecast)\nloss &lt;2.9 &amp; falling",
        },
    }
    assert fields == {"type": "section", "fields": [{"type": "mrkdwn", "text": "*gain*\n0.1000"}]}
    assert context["elements"][0]["text"] == "advice · info · step 7"
    assert body["text"] == ":bulb: lossforecast · Advice at step 7: loss <2.9 & falling"


@pytest.mark.parametrize(
    ("event", "icon", "title"),
    [
        (Event("warning", "critical", 3, "NaN"), ":rotating_light:", "Critical at step 3"),
        (Event("warning", "warning", 3, "spike"), ":warning:", "Warning at step 3"),
        (summary_event(10, 2.5), ":checkered_flag:", "Training finished"),
    ],
)
def test_icons_and_titles(event, icon, title):
    assert slack_payload(event)["text"].startswith(f"{icon} lossforecast · {title}: ")


def test_no_fields_block_without_numbers():
    body = slack_payload(Event("advice", "info", 7, "extend the run"))
    assert [b["type"] for b in body["blocks"]] == ["section", "context"]


def test_summary_shows_the_scorecard():
    card = {
        "scorecard/step_at_25pct": 250,
        "scorecard/forecast_at_25pct": 2.95,
        "scorecard/low_at_25pct": 2.9,
        "scorecard/high_at_25pct": 3.0,
        "scorecard/error_at_25pct": -0.0167,
    }
    body = slack_payload(summary_event(999, 3.0, extra=card))
    (text,) = [
        b["text"]["text"] for b in body["blocks"] if "scorecard" in str(b) or "25%" in str(b)
    ]
    assert text == "forecast at 25% (step 250): 2.9500 [2.9000, 3.0000] -1.67%"
