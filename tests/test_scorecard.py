"""The scorecard: forecasts kept at the milestones, flat summary numbers, the JSON file."""

from __future__ import annotations

import json
import math

import pytest

from lossforecast import Forecast
from lossforecast._scorecard import SCORECARD_FILE, Scorecard, scorecard_rows


def _f(loss: float, step: int) -> Forecast:
    return Forecast(999, loss, loss - 0.1, loss + 0.1, 0.8, "multi-power", 10, 0.01, step)


def test_each_milestone_keeps_the_last_forecast_reported_before_it():
    card = Scorecard(1000)
    for step, loss in [(50, 3.5), (99, 3.4), (100, 3.3), (400, 3.2), (600, 3.1), (950, 3.05)]:
        card.record(step, _f(loss, step))
    assert "scorecard/forecast_at_90pct" not in card.data(3.0, reached_step=800)
    data = card.data(reached_loss=3.0)
    # 10% of steps 0..999 is step 99.9: the forecast at step 99 is the last one before it
    assert data["scorecard/forecast_at_10pct"] == 3.4 and data["scorecard/step_at_10pct"] == 99
    assert data["scorecard/forecast_at_25pct"] == 3.3
    assert data["scorecard/forecast_at_50pct"] == 3.2
    assert data["scorecard/forecast_at_75pct"] == 3.1
    assert data["scorecard/forecast_at_90pct"] == 3.1  # step 950 is past 90%
    assert data["scorecard/error_at_50pct"] == pytest.approx(0.2 / 3.0)


def test_milestones_before_the_first_forecast_are_left_out_and_shown_empty():
    card = Scorecard(1000)
    card.record(600, _f(3.1, 600))
    data = card.data(3.0)
    assert "scorecard/forecast_at_50pct" not in data and "scorecard/forecast_at_75pct" in data
    rows = card.to_dict(3.0)["milestones"]
    assert rows[0] == {"milestone": 0.1} and rows[3]["inside"] is True
    assert [label for label, _ in scorecard_rows(data)] == [
        "forecast at 75% (step 600)",
        "forecast at 90% (step 600)",
    ]


def test_write_is_json_with_the_reached_loss(tmp_path):
    card = Scorecard(100)
    card.record(20, _f(2.5, 20))
    path = card.write(tmp_path / "run", 2.4, 99)
    assert path.name == SCORECARD_FILE and not list(path.parent.glob("*.tmp"))
    doc = json.loads(path.read_text())
    assert doc["kind"] == "lossforecast-scorecard" and doc["reached_step"] == 99
    assert math.isclose(doc["milestones"][1]["rel_error"], 0.1 / 2.4)


@pytest.mark.parametrize(
    ("args", "match"),
    [((0,), "total_steps"), ((10, [0.5, 1.0]), "milestones"), ((10, []), "milestones")],
)
def test_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        Scorecard(*args)
