"""lossforecast: forecast the final loss of a training run while it trains.

The core is pure numpy/scipy; framework adapters live in ``lossforecast.integrations``.
"""

from ._fit import FitResult, FitStatus
from ._forecaster import Forecast, Forecaster
from ._laws import LRAnnealingLaw, MultiPowerLaw
from ._priors import Priors
from ._schedule import Schedule

__all__ = [
    "Forecast",
    "Forecaster",
    "FitResult",
    "FitStatus",
    "LRAnnealingLaw",
    "MultiPowerLaw",
    "Priors",
    "Schedule",
]

__version__ = "0.1.0"
