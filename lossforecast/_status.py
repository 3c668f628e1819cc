"""Where a run stands: progress, latest forecast and what is left, as one snapshot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ._forecaster import Forecast

__all__ = ["RunStatus", "eta_text"]


def eta_text(seconds_to_finish: float, now: float) -> str:
    """The wall-clock time ``seconds_to_finish`` after Unix time ``now``, ISO 8601 in UTC.

    Examples
    --------
    >>> eta_text(90.0, 0.0)
    '1970-01-01T00:01:30Z'
    """
    moment = datetime.fromtimestamp(now + seconds_to_finish, tz=timezone.utc)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class RunStatus:
    """A snapshot of a monitored run (``Monitor.status()``, ``callback.status()``).

    Attributes
    ----------
    step : int
        Optimizer steps done.
    total_steps : int
        Planned optimizer steps.
    forecast : Forecast or None
        The latest forecast of the final loss.
    seconds_to_finish : float or None
        Time left at the recent step rate; None until it is known.
    eta : str or None
        When the run should end, ISO 8601 UTC.
    cost : dict of str to float
        What finishing will still cost, where known (``joules_to_finish``,
        ``kwh_to_finish``, ``flops_to_finish``, ...).
    warnings : int
        Warnings emitted so far.
    advice : tuple of str
        Messages of the advice emitted so far, oldest first.
    stop_reason : str or None
        Why lossforecast asked the trainer to stop (``auto_stop``), else None.
    """

    step: int
    total_steps: int
    forecast: Forecast | None = None
    seconds_to_finish: float | None = None
    eta: str | None = None
    cost: dict[str, float] = field(default_factory=dict)
    warnings: int = 0
    advice: tuple[str, ...] = ()
    stop_reason: str | None = None

    @property
    def progress(self) -> float:
        """Share of the planned steps done, in [0, 1]."""
        return min(max(self.step / self.total_steps, 0.0), 1.0)

    def data(self) -> dict[str, float | int | str]:
        """The flat numbers every event carries (so every webhook payload has the ETA).

        Examples
        --------
        >>> RunStatus(250, 1000, seconds_to_finish=60.0, eta="2026-01-01T00:01:00Z").data()
        {'progress': 0.25, 'seconds_to_finish': 60.0, 'eta': '2026-01-01T00:01:00Z'}
        """
        out: dict[str, float | int | str] = {"progress": self.progress}
        if self.seconds_to_finish is not None and math.isfinite(self.seconds_to_finish):
            out["seconds_to_finish"] = self.seconds_to_finish
        if self.eta is not None:
            out["eta"] = self.eta
        out.update(self.cost)
        return out
