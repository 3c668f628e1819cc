"""Energy accounting from sampled readings: a wrapping energy counter, or integrated power.

Pure Python, no I/O: the samplers in ``_power.py`` read NVML or RAPL and feed the readings
here, so the accounting is tested on recorded streams (counter wrap, driver reset, missing
samples, gaps) without a GPU.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["EnergyTotal", "CounterAccumulator", "PowerIntegrator"]

#: Largest plausible mean power of one counter, in watts. A counter that moves faster than
#: this between two samples (or backwards, without a wrap that explains it) was reset.
DEFAULT_MAX_WATTS = 10_000.0


@dataclass(frozen=True)
class EnergyTotal:
    """Energy accumulated from one stream of readings (or the sum of several).

    Attributes
    ----------
    joules : float
        Energy counted so far.
    seconds : float
        Time between the first and the last valid sample.
    n_samples : int
        Valid samples used.
    n_missing : int
        Samples that were missing (``None``, non-finite, negative or out of time order) and
        were skipped.
    n_wraps : int
        Counter wraps accounted for (a counter with a modulus, such as RAPL's).
    n_resets : int
        Counter resets (the counter jumped back or implausibly far): the accounting
        restarted from the new value and lost at most the one interval in which it happened.
    n_gaps : int
        Gaps between power samples longer than the allowed maximum, bridged by the mean
        power of their ends.
    gap_seconds : float
        Total length of those gaps.
    """

    joules: float = 0.0
    seconds: float = 0.0
    n_samples: int = 0
    n_missing: int = 0
    n_wraps: int = 0
    n_resets: int = 0
    n_gaps: int = 0
    gap_seconds: float = 0.0

    @property
    def watts(self) -> float | None:
        """Mean power over :attr:`seconds` (None before two samples)."""
        return self.joules / self.seconds if self.seconds > 0 else None

    def __add__(self, other: EnergyTotal) -> EnergyTotal:
        """Sum of two totals (e.g. of several devices); ``seconds`` is the longer span."""
        if not isinstance(other, EnergyTotal):
            return NotImplemented
        return EnergyTotal(
            joules=self.joules + other.joules,
            seconds=max(self.seconds, other.seconds),
            n_samples=self.n_samples + other.n_samples,
            n_missing=self.n_missing + other.n_missing,
            n_wraps=self.n_wraps + other.n_wraps,
            n_resets=self.n_resets + other.n_resets,
            n_gaps=self.n_gaps + other.n_gaps,
            gap_seconds=self.gap_seconds + other.gap_seconds,
        )


def _valid(value: float | None) -> float | None:
    """``value`` as a float if it is a finite, non-negative reading, else None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0.0 else None


class _Stream:
    """What both accumulators keep: the joules, the last valid sample and the counts."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._last_time: float | None = None
        self._first_time: float | None = None
        self._joules = 0.0
        self._n_samples = self._n_missing = 0

    def _total(self, **counts: float) -> EnergyTotal:
        span = 0.0
        if self._first_time is not None and self._last_time is not None:
            span = self._last_time - self._first_time
        return EnergyTotal(
            joules=self._joules,
            seconds=span,
            n_samples=self._n_samples,
            n_missing=self._n_missing,
            **counts,
        )


class CounterAccumulator(_Stream):
    """Energy from a monotonically increasing counter that may wrap or be reset.

    Feed each reading with :meth:`add`. The energy is the sum of the differences between
    successive valid readings, times ``scale``:

    * **wrap**: with a ``modulus`` (RAPL's ``max_energy_range_uj``), a reading below the
      previous one is a wrap when ``value + modulus - previous`` is plausible (at most half
      the modulus, and at most ``max_watts`` over the time between the samples); that
      difference is counted and :attr:`EnergyTotal.n_wraps` goes up.
    * **reset**: any other step back (a driver reload restarts NVML's counter near zero),
      or a jump up faster than ``max_watts``, restarts the accounting from the new reading;
      the energy of that one interval is lost and :attr:`EnergyTotal.n_resets` goes up.
    * **missing**: ``None``, non-finite or negative readings, and samples whose time is not
      after the previous one, are skipped and counted; the next valid reading is taken
      against the last valid one, so a counter loses no energy across missing samples.

    Parameters
    ----------
    scale : float, optional
        Joules per counter unit, > 0: ``1e-3`` for NVML's millijoules, ``1e-6`` for RAPL's
        microjoules. Default 1 (the counter is in joules).
    modulus : float, optional
        Range of the counter in counter units (it wraps to 0 at this value), > 0. Default
        None: the counter does not wrap (NVML's is 64-bit).
    max_watts : float, optional
        Largest plausible mean power, > 0. Default 10,000 W.

    Raises
    ------
    ValueError
        If ``scale``, ``modulus`` or ``max_watts`` is not a positive finite number.

    Examples
    --------
    >>> acc = CounterAccumulator(scale=1e-6, modulus=1_000_000)   # RAPL-like, wraps at 1 J
    >>> for t, uj in enumerate([900_000, 950_000, None, 100_000, 300_000]):
    ...     _ = acc.add(uj, float(t))
    >>> r = acc.total()
    >>> round(r.joules, 6), r.n_wraps, r.n_missing
    (0.4, 1, 1)
    """

    def __init__(
        self,
        *,
        scale: float = 1.0,
        modulus: float | None = None,
        max_watts: float = DEFAULT_MAX_WATTS,
    ) -> None:
        _check_positive("scale", scale)
        if modulus is not None:
            _check_positive("modulus", modulus)
        _check_positive("max_watts", max_watts)
        self.scale = float(scale)
        self.modulus = None if modulus is None else float(modulus)
        self.max_watts = float(max_watts)
        super().__init__()
        self._n_wraps = self._n_resets = 0

    def add(self, value: float | None, time: float | None = None) -> float:
        """Add one reading (counter units) taken at ``time`` (seconds, monotonic; optional).

        Returns
        -------
        float
            Joules added by this reading (0 for the first, a missing one, or a reset).
        """
        v = _valid(value)
        t = None if time is None else float(time)
        if v is None or (t is not None and self._last_time is not None and t <= self._last_time):
            self._n_missing += 1
            return 0.0
        previous, previous_time = self._last, self._last_time
        self._last, self._last_time = v, t
        self._n_samples += 1
        if self._first_time is None:
            self._first_time = t
        if previous is None:
            return 0.0
        dt = None if t is None or previous_time is None else t - previous_time
        limit = math.inf if dt is None else self.max_watts * dt / self.scale
        delta = v - previous
        if delta < 0.0 and self.modulus is not None:
            wrapped = delta + self.modulus
            if 0.0 <= wrapped <= min(0.5 * self.modulus, limit):
                self._n_wraps += 1
                delta = wrapped
        if delta < 0.0 or delta > limit:
            self._n_resets += 1
            return 0.0
        joules = delta * self.scale
        self._joules += joules
        return joules

    def total(self) -> EnergyTotal:
        """The energy counted so far and the counts of skipped, wrapped and reset samples."""
        return self._total(n_wraps=self._n_wraps, n_resets=self._n_resets)


class PowerIntegrator(_Stream):
    """Energy from power samples (watts at monotonic times), by the trapezoid rule.

    For GPUs without an energy counter: each interval between two valid samples adds the
    mean of their powers times its length. An interval longer than ``max_gap`` times the
    nominal ``interval`` (the sampler stalled, or samples were missing) is bridged the same
    way, by the mean power of its ends, and counted in :attr:`EnergyTotal.n_gaps` and
    :attr:`EnergyTotal.gap_seconds`, so a figure resting on long bridges can be told apart.
    Missing samples (``None``, non-finite, negative) and samples not after the previous one
    are skipped and counted.

    Parameters
    ----------
    interval : float, optional
        Nominal time between samples in seconds, > 0. Default 1.
    max_gap : float, optional
        Longest interval, in multiples of ``interval``, integrated without being counted as
        a gap; >= 1. Default 5.

    Raises
    ------
    ValueError
        If ``interval`` is not positive or ``max_gap`` is below 1.

    Examples
    --------
    >>> p = PowerIntegrator(interval=1.0, max_gap=3)
    >>> for t, w in [(0.0, 100.0), (1.0, 200.0), (2.0, None), (10.0, 300.0)]:
    ...     _ = p.add(w, t)
    >>> r = p.total()
    >>> r.joules, r.n_gaps, r.gap_seconds, r.n_missing
    (2400.0, 1, 9.0, 1)
    """

    def __init__(self, *, interval: float = 1.0, max_gap: float = 5.0) -> None:
        _check_positive("interval", interval)
        if not (isinstance(max_gap, numbers.Real) and math.isfinite(max_gap) and max_gap >= 1):
            raise ValueError(f"`max_gap` must be a number >= 1, got {max_gap!r}.")
        self.interval = float(interval)
        self.max_gap = float(max_gap)
        super().__init__()
        self._gap_seconds = 0.0
        self._n_gaps = 0

    def add(self, watts: float | None, time: float) -> float:
        """Add one power sample (W) taken at ``time`` (seconds, monotonic).

        Returns
        -------
        float
            Joules added by the interval this sample closes (0 for the first or a missing).
        """
        w = _valid(watts)
        t = _valid(time)
        if w is None or t is None or (self._last_time is not None and t <= self._last_time):
            self._n_missing += 1
            return 0.0
        previous, previous_time = self._last, self._last_time
        self._last, self._last_time = w, t
        self._n_samples += 1
        if previous is None or previous_time is None:
            self._first_time = t
            return 0.0
        dt = t - previous_time
        if dt > self.max_gap * self.interval:
            self._n_gaps += 1
            self._gap_seconds += dt
        joules = 0.5 * (previous + w) * dt
        self._joules += joules
        return joules

    def total(self) -> EnergyTotal:
        """The energy integrated so far and the counts of skipped samples and bridged gaps."""
        return self._total(n_gaps=self._n_gaps, gap_seconds=self._gap_seconds)


def _check_positive(name: str, value: object) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
