"""Tests for lossforecast.sinks._console: the live line, rate limiting, quiet logs, the summary."""

from __future__ import annotations

import logging
import re
import sys

import pytest

from lossforecast import Forecast
from lossforecast._events import Event, EventBus, forecast_event, summary_event
from lossforecast.sinks import ConsoleSink
from lossforecast.sinks._console import render_summary

NAME = "lossforecast.sinks._console"


def forecast(loss: float, step: int, **extra) -> Event:
    f = Forecast(999, loss, loss - 0.04, loss + 0.04, 0.8, "multi-power", 10, 0.01, step)
    return forecast_event(f, observed_loss=3.2, extra=extra)


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NAME]


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.INFO, logger=NAME)
    return caplog


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interval": -1.0}, "`interval` must be a finite number of seconds >= 0, got -1.0"),
        ({"interval": float("inf")}, "`interval` must be a finite number"),
        ({"interactive": "yes"}, "`interactive` must be True, False or None, got 'yes'"),
    ],
)
def test_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsoleSink(**kwargs)


def test_live_line_has_forecast_interval_trend_and_eta(caplog):
    sink = ConsoleSink(interval=0.0, interactive=True)
    sink.write(forecast(2.9000, 100, seconds_to_finish=545.0))
    sink.write(forecast(2.8880, 200, seconds_to_finish=3725.0))
    sink.write(forecast(2.8990, 300))
    sink.write(forecast(2.8990, 400))
    assert lines(caplog) == [
        "lossforecast step 100/999: final loss 2.9000 ± 0.0400 (80%) · now 3.2000 · ETA 9m05s",
        "lossforecast step 200/999: final loss 2.8880 ± 0.0400 (80%) ↓0.0120 · now 3.2000"
        " · ETA 1h02m",
        "lossforecast step 300/999: final loss 2.8990 ± 0.0400 (80%) ↑0.0110 · now 3.2000",
        "lossforecast step 400/999: final loss 2.8990 ± 0.0400 (80%) →0.0000 · now 3.2000",
    ]


def test_forecast_lines_are_rate_limited_but_alerts_are_not(caplog, make_warning):
    sink = ConsoleSink(interval=3600.0, interactive=True)
    for step in range(100, 600, 100):
        sink.write(forecast(2.9, step))
    sink.write(make_warning(610, "loss spike A"))
    sink.write(make_warning(620, "loss spike B"))
    sink.write(Event("advice", "info", 630, "cool down now"))
    got = lines(caplog)
    assert len(got) == 4
    assert got[0].startswith("lossforecast step 100/999")
    assert got[1:] == [
        "lossforecast warning at step 610: loss spike A",
        "lossforecast warning at step 620: loss spike B",
        "lossforecast advice at step 630: cool down now",
    ]


def test_repeated_identical_alert_is_not_repeated_within_interval(caplog, make_warning):
    sink = ConsoleSink(interval=3600.0, interactive=False)
    for step in (10, 20, 30):
        sink.write(make_warning(step))
    assert len(lines(caplog)) == 1


def test_levels_follow_severity(caplog):
    sink = ConsoleSink(interval=0.0, interactive=False)
    sink.write(Event("warning", "critical", 1, "loss is NaN"))
    sink.write(Event("warning", "warning", 2, "spike"))
    sink.write(Event("advice", "info", 3, "extend"))
    levels = [r.levelno for r in caplog.records if r.name == NAME]
    assert levels == [logging.ERROR, logging.WARNING, logging.INFO]


def test_non_interactive_logs_only_alerts_and_the_summary(caplog, monkeypatch, events):
    class NotATerminal:
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdout", NotATerminal())
    sink = ConsoleSink(interval=0.0)  # default: follows stdout
    for event in events:
        sink.write(event)
    got = lines(caplog)
    assert len(got) == 3
    assert got[0].startswith("lossforecast warning at step 400")
    assert got[1].startswith("lossforecast advice at step 700")
    assert got[2].startswith("lossforecast summary: finished at step 999")


def test_interactive_default_follows_a_terminal(caplog, monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    ConsoleSink(interval=0.0).write(forecast(2.9, 100))
    assert len(lines(caplog)) == 1


def cells(text: str) -> dict[str, str]:
    """Label -> value of each table row, from the rich table or the plain-text one."""
    rows = {}
    for line in text.splitlines()[1:]:
        parts = [p.strip() for p in re.split(r"[│|]| {2,}", line) if p.strip()]
        if len(parts) == 2:
            rows[parts[0]] = parts[1]
    return rows


def test_summary_table_compares_forecast_with_outcome(events):
    text = render_summary(events[-1])
    data = events[-1].data
    assert text.splitlines()[0] == f"lossforecast summary: {events[-1].message}"
    assert cells(text) == {
        "final loss reached": f"{data['reached_loss']:.4f}",
        "forecast": f"{data['final_loss']:.4f}",
        "80% interval": f"{data['low']:.4f} - {data['high']:.4f}",
        "error": f"{data['error']:+.4f} ({data['rel_error']:+.2%})",
        "inside the interval": "no",
        "forecast made at step": "900",
        "law": "multi-power",
        "forecasts": "8",
    }
    assert "╭" in text and "\x1b[" not in text  # rich's table, no colour codes unless asked
    assert "╭" not in render_summary(events[-1], ascii=True)


def test_summary_falls_back_to_plain_text_without_rich(monkeypatch, events):
    with_rich = render_summary(events[-1])
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    plain = render_summary(events[-1])
    assert "│" not in plain and plain.splitlines()[1] == "  final loss reached     2.0827"
    assert cells(plain) == cells(with_rich)


def test_summary_without_a_forecast():
    text = render_summary(summary_event(50, 3.5))
    assert "final loss reached" in text and "3.5000" in text and "interval" not in text


def test_colour_only_when_asked(events):
    assert "\x1b[" in render_summary(events[-1], color=True)


def test_attaches_a_stderr_handler_only_without_logging_config(monkeypatch, capsys):
    monkeypatch.setattr(logging.root, "handlers", [])
    logger = logging.getLogger(NAME)
    sink = ConsoleSink(interval=0.0, interactive=True)
    sink.write(Event("advice", "info", 3, "cool down now"))
    assert capsys.readouterr().err == "lossforecast advice at step 3: cool down now\n"
    assert len(logger.handlers) == 1
    sink.close()
    assert logger.handlers == [] and logger.level == logging.NOTSET


def test_runs_on_the_bus_with_every_event(caplog, events):
    bus = EventBus([ConsoleSink(interval=0.0, interactive=True)])
    for event in events:
        bus.emit(event)
    bus.close()
    assert bus.disabled == []
    assert len(lines(caplog)) == len(events)


def test_summary_table_has_one_row_per_scorecard_milestone():
    card = {"scorecard/step_at_50pct": 500, "scorecard/forecast_at_50pct": 3.1}
    card.update({"scorecard/low_at_50pct": 3.0, "scorecard/high_at_50pct": 3.2})
    text = render_summary(summary_event(999, 3.05, extra=card), ascii=True)
    assert "forecast at 50% (step 500)" in text and "3.1000 [3.0000, 3.2000]" in text
    assert "scorecard/" not in text
