"""The forecast-vs-outcome scorecard: the forecasts made at 10/25/50/75/90% of a run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ._forecaster import Forecast

__all__ = ["Scorecard", "scorecard_rows", "MILESTONES", "SCORECARD_FILE"]

#: Shares of the planned steps at which the forecast in effect is kept.
MILESTONES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Name of the scorecard file written into the run folder.
SCORECARD_FILE = "lossforecast_scorecard.json"


def _label(milestone: float) -> str:
    return f"{milestone * 100:g}pct"


class Scorecard:
    """Keeps, for each milestone, the forecast a user saw when training crossed it.

    :meth:`record` is called with every forecast as it is reported (O(number of milestones));
    the forecast kept for milestone ``m`` is the last one reported at a step
    ``<= m * (total_steps - 1)``. :meth:`data` gives the flat numbers for the summary event
    (``scorecard/forecast_at_25pct``, ``scorecard/low_at_25pct``, ``scorecard/high_at_25pct``,
    ``scorecard/step_at_25pct``, and with the loss reached ``scorecard/error_at_25pct``, the
    relative error), :meth:`to_dict` the JSON document.

    Examples
    --------
    >>> card = Scorecard(1000)
    >>> card.record(90, Forecast(999, 3.1, 3.0, 3.2, 0.8, "multi-power", 9, 0.01, 90))
    >>> card.record(240, Forecast(999, 2.95, 2.9, 3.0, 0.8, "multi-power", 24, 0.01, 240))
    >>> card.data(reached_loss=3.0)["scorecard/error_at_10pct"]
    0.0333...
    >>> sorted(card.to_dict(3.0)["milestones"][1])
    ['coverage', 'forecast', 'high', 'inside', 'low', 'milestone', 'rel_error', 'step']
    """

    def __init__(self, total_steps: int, milestones: Iterable[float] = MILESTONES) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}.")
        milestones = tuple(sorted(float(m) for m in milestones))
        if not milestones or not all(0.0 < m < 1.0 for m in milestones):
            raise ValueError(f"`milestones` must be shares in (0, 1), got {milestones!r}.")
        self.total_steps = total_steps
        self.milestones = milestones
        self._at: dict[float, tuple[int, Forecast]] = {}

    def record(self, step: int, forecast: Forecast) -> None:
        """Note ``forecast`` as reported at training ``step``."""
        for m in self.milestones:
            if step <= m * (self.total_steps - 1):
                self._at[m] = (int(step), forecast)

    def _rows(self, reached_loss: float | None, reached_step: int | None) -> list[dict]:
        rows = []
        end = self.total_steps - 1 if reached_step is None else reached_step
        for m in self.milestones:
            if m * (self.total_steps - 1) > end:
                continue  # training stopped before this milestone
            row: dict = {"milestone": m}
            if m in self._at:
                step, f = self._at[m]
                row.update(step=step, forecast=f.loss, low=f.low, high=f.high)
                row["coverage"] = f.coverage
                if reached_loss is not None and math.isfinite(reached_loss) and reached_loss:
                    row["rel_error"] = (f.loss - reached_loss) / abs(reached_loss)
                    row["inside"] = bool(f.low <= reached_loss <= f.high)
            rows.append(row)
        return rows

    def data(
        self, reached_loss: float | None = None, reached_step: int | None = None
    ) -> dict[str, float | int]:
        """Flat numbers for the summary event.

        Milestones without a forecast, or past ``reached_step`` (the last step trained, the
        end of the plan by default), are left out.
        """
        out: dict[str, float | int] = {}
        for row in self._rows(reached_loss, reached_step):
            if "forecast" not in row:
                continue
            label = _label(row["milestone"])
            out[f"scorecard/step_at_{label}"] = row["step"]
            for key in ("forecast", "low", "high"):
                out[f"scorecard/{key}_at_{label}"] = row[key]
            if "rel_error" in row:
                out[f"scorecard/error_at_{label}"] = row["rel_error"]
        return out

    def to_dict(
        self, reached_loss: float | None = None, reached_step: int | None = None, **extra: object
    ) -> dict:
        """The JSON document: the milestones' forecasts next to the loss reached."""
        return {
            "kind": "lossforecast-scorecard",
            "version": 1,
            "total_steps": self.total_steps,
            "reached_loss": reached_loss,
            "reached_step": reached_step,
            "milestones": self._rows(reached_loss, reached_step),
            **extra,
        }

    def write(
        self,
        folder: str | os.PathLike,
        reached_loss: float | None,
        reached_step: int | None = None,
        **extra: object,
    ) -> Path:
        """Write :meth:`to_dict` to ``folder/lossforecast_scorecard.json`` (atomically)."""
        path = Path(folder) / SCORECARD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        doc = self.to_dict(reached_loss, reached_step, **extra)
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def scorecard_rows(data: Mapping[str, object]) -> list[tuple[str, str]]:
    """(label, text) rows for the scorecard in a summary event's data, for console and Slack.

    Examples
    --------
    >>> scorecard_rows({"scorecard/step_at_25pct": 240, "scorecard/forecast_at_25pct": 2.95,
    ...                 "scorecard/low_at_25pct": 2.9, "scorecard/high_at_25pct": 3.0,
    ...                 "scorecard/error_at_25pct": -0.0167})
    [('forecast at 25% (step 240)', '2.9500 [2.9000, 3.0000] -1.67%')]
    """
    rows = []
    for m in MILESTONES:
        label = _label(m)
        forecast = data.get(f"scorecard/forecast_at_{label}")
        if not isinstance(forecast, (int, float)):
            continue
        text = (
            f"{forecast:.4f} [{data.get(f'scorecard/low_at_{label}', math.nan):.4f}, "
            f"{data.get(f'scorecard/high_at_{label}', math.nan):.4f}]"
        )
        error = data.get(f"scorecard/error_at_{label}")
        if isinstance(error, (int, float)):
            text += f" {error:+.2%}"
        rows.append((f"forecast at {m:.0%} (step {data.get(f'scorecard/step_at_{label}')})", text))
    return rows
