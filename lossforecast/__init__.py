"""lossforecast: forecast the final loss of a training run while it trains.

The core is pure numpy/scipy; framework adapters live in ``lossforecast.integrations``.
"""

from ._advice import Advice, Advisor
from ._backtest import BacktestPoint, Trajectory, backtest
from ._compute import ComputeMeter, CostForecast, cost_to_finish, peak_flops
from ._cooldown import cooldown_schedule
from ._events import Event, EventBus, EventScalars, forecast_event, summary_event
from ._fit import FitResult, FitStatus
from ._forecaster import Forecast, Forecaster
from ._history import RunSummary, history_priors, load_history, write_run_summary
from ._io import (
    Curve,
    RebuiltSchedule,
    Run,
    load_runs,
    read_curve_csv,
    read_schedule_csv,
    read_tensorboard,
    schedule_from_curve,
)
from ._laws import LRAnnealingLaw, MultiPowerLaw
from ._monitor import Monitor
from ._power import EnergyMonitor, open_energy_monitor
from ._priors import Priors
from ._schedule import Schedule
from ._status import RunStatus

__all__ = [
    "BacktestPoint",
    "Curve",
    "Event",
    "EventBus",
    "EventScalars",
    "RebuiltSchedule",
    "Run",
    "Trajectory",
    "backtest",
    "forecast_event",
    "summary_event",
    "load_runs",
    "read_curve_csv",
    "read_schedule_csv",
    "read_tensorboard",
    "schedule_from_curve",
    "Forecast",
    "Forecaster",
    "FitResult",
    "FitStatus",
    "LRAnnealingLaw",
    "Monitor",
    "MultiPowerLaw",
    "Priors",
    "Schedule",
    "ComputeMeter",
    "CostForecast",
    "cost_to_finish",
    "peak_flops",
    "EnergyMonitor",
    "open_energy_monitor",
    "RunStatus",
    "RunSummary",
    "history_priors",
    "load_history",
    "write_run_summary",
    "Advice",
    "Advisor",
    "cooldown_schedule",
]

__version__ = "0.1.0"
