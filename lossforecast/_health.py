"""Run health beyond the loss: stalls, slowdowns, throughput drops, the AMP loss scaler."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._events import Event
from ._spikes import check_positive
from ._trends import Latch

__all__ = ["RunHealth"]

BASELINE = 200  # step times / throughput values behind the rolling baseline
RECENT = 20  # ... of which the most recent are compared with the rest
AMP_RECENT = 50  # optimizer steps behind the skipped-step share


class RunHealth:
    """Warnings about how the run runs: stalls, slowdowns, throughput drops, loss scaling.

    Used by :class:`~lossforecast.InstabilityDetector` (its ``observe_step_time``,
    ``observe_throughput`` and ``observe_amp`` are these methods); the parameters are the
    detector's of the same names.

    Examples
    --------
    >>> health = RunHealth()
    >>> [e for s in range(100) for e in health.observe_step_time(s, 0.5)]
    []
    >>> [e.data["step_seconds"] for e in health.observe_step_time(100, 30.0)]
    [30.0]
    """

    def __init__(
        self,
        *,
        stall_factor: float = 5.0,
        stall_seconds: float = 1.0,
        slowdown_factor: float = 2.0,
        slowdown_seconds: float = 0.02,
        throughput_drop: float = 0.3,
        amp_skip_run: int = 8,
        amp_min_scale: float = 1.0,
    ) -> None:
        check_positive("stall_factor", stall_factor, minimum=1.0)
        check_positive("stall_seconds", stall_seconds, allow_zero=True)
        check_positive("slowdown_factor", slowdown_factor, minimum=1.0)
        check_positive("slowdown_seconds", slowdown_seconds, allow_zero=True)
        if not 0.0 < throughput_drop < 1.0:
            raise ValueError(f"`throughput_drop` must be in (0, 1), got {throughput_drop!r}.")
        check_positive("amp_skip_run", amp_skip_run, integer=True)
        check_positive("amp_min_scale", amp_min_scale)
        self.stall_factor = float(stall_factor)
        self.stall_seconds = float(stall_seconds)
        self.slowdown_factor = float(slowdown_factor)
        self.slowdown_seconds = float(slowdown_seconds)
        self.throughput_drop = float(throughput_drop)
        self.amp_skip_run = int(amp_skip_run)
        self.amp_min_scale = float(amp_min_scale)
        self._latch = Latch()
        self._times: deque[float] = deque(maxlen=BASELINE)
        self._time_base: float | None = None  # median step time, refreshed every RECENT steps
        self._n_times = 0
        self._rates: dict[str, deque[float]] = {}
        self.amp_active = False
        self._amp_stepped = False
        self._amp_run = 0
        self._amp_recent: deque[int] = deque(maxlen=AMP_RECENT)

    def observe_step_time(self, step: int, seconds: float) -> list[Event]:
        """Check one step's wall time against the run's own rolling baseline (stall, slowdown).

        A stall is one step ``stall_factor`` × slower than the median step and at least
        ``stall_seconds`` slower; a slowdown is the median of the last 20 steps above
        ``slowdown_factor`` × the median of the 180 before and at least ``slowdown_seconds``
        above it (sub-millisecond steps jitter by large factors).
        """
        step, seconds = int(step), float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            return []
        history = self._times
        if len(history) >= 2 * RECENT:
            if self._time_base is None or self._n_times % RECENT == 0:
                self._time_base = float(np.median(np.fromiter(history, float)))
            base = self._time_base
            if seconds > self.stall_factor * base and seconds - base > self.stall_seconds:
                if not self._latch.fire("stall"):
                    return []
                message = (
                    f"training stalled at step {step}: the step took {seconds:.3g} s, "
                    f"{seconds / base:.1f}× the usual {base:.3g} s. Check data loading, I/O, "
                    "other jobs on the machine and collective ops (a hung rank)."
                )
                data = {"step_seconds": seconds, "baseline_seconds": base}
                return [
                    Event("warning", "warning", step, message, data)
                ]  # kept out of the baseline
            self._latch.clear("stall")
        history.append(seconds)
        self._n_times += 1
        if self._n_times % RECENT:
            return []  # the medians move slowly: compared every 20 steps keeps this O(1)
        return self._slowdown(step, "step time", history, slower=True)

    def observe_throughput(
        self, step: int, value: float, *, name: str = "throughput"
    ) -> list[Event]:
        """Check a throughput (or MFU, with ``name='mfu'``) against its rolling baseline: a
        drop of the median of the last 20 values by ``throughput_drop`` warns."""
        value = float(value)
        if not math.isfinite(value) or value < 0:
            return []
        history = self._rates.setdefault(name, deque(maxlen=BASELINE))
        history.append(value)
        return self._slowdown(int(step), name, history, slower=False)

    def _slowdown(
        self, step: int, name: str, history: deque[float], *, slower: bool
    ) -> list[Event]:
        if len(history) < 3 * RECENT:
            return []
        values = np.fromiter(history, float)
        base, recent = float(np.median(values[:-RECENT])), float(np.median(values[-RECENT:]))
        if slower:
            bad = recent > self.slowdown_factor * base and recent - base >= self.slowdown_seconds
        else:
            bad = recent < (1.0 - self.throughput_drop) * base
        key = f"slow:{name}"
        if not bad:
            self._latch.clear(key)
            return []
        if not self._latch.fire(key):
            return []
        change = recent / base if base > 0 else math.inf
        message = (
            f"{name} {'rose' if slower else 'dropped'} to {change:.2f}× its baseline over the "
            f"last {RECENT} steps (median {recent:.4g} vs {base:.4g}, up to step {step}). "
            "Check data loading, thermal throttling, memory pressure and other jobs."
        )
        data = {"metric": name, "recent": recent, "baseline": base, "ratio": change}
        return [Event("warning", "warning", step, message, data)]

    def observe_amp(self, step: int, scale: float, found_inf: bool) -> list[Event]:
        """Check the mixed-precision loss scaler after ``scaler.update()``.

        One skipped step is normal (the scaler lowers its scale and goes on). A run of
        ``amp_skip_run`` skipped steps after the first good one, half of the last 50 steps
        skipped, or a scale below ``amp_min_scale`` warns.
        """
        step, scale, skipped = int(step), float(scale), bool(found_inf)
        self.amp_active = True
        self._amp_recent.append(int(skipped))
        self._amp_run = self._amp_run + 1 if skipped else 0
        self._amp_stepped = self._amp_stepped or not skipped
        share = sum(self._amp_recent) / len(self._amp_recent)
        checks = (
            (
                "amp:run",
                "warning",
                self._amp_stepped and self._amp_run >= self.amp_skip_run,
                f"{self._amp_run} optimizer steps in a row skipped by the loss scaler "
                f"(non-finite gradients), scale now {scale:.3g}",
            ),
            (
                "amp:share",
                "warning",
                len(self._amp_recent) == AMP_RECENT and share >= 0.5,
                f"{share:.0%} of the last {AMP_RECENT} optimizer steps skipped by the loss "
                f"scaler, scale now {scale:.3g}",
            ),
            (
                "amp:collapse",
                "critical",
                scale < self.amp_min_scale,
                f"the loss scale collapsed to {scale:.3g}: gradients overflow even unscaled",
            ),
        )
        events = []
        for key, level, present, what in checks:
            if not present:
                self._latch.clear(key)
            elif self._latch.fire(key):
                message = (
                    f"{what} (step {step}). Usual remedy: bf16 instead of fp16, lower the LR, "
                    "qk-layernorm / z-loss against growing logits, gradient clipping."
                )
                data = {"scale": scale, "skipped_run": self._amp_run, "skipped_share": share}
                events.append(Event("warning", level, step, message, data))
        return events

    def state_dict(self) -> dict:
        """JSON-safe state (bounded histories)."""
        return {
            "fired": sorted(self._latch.fired),
            "times": list(self._times),
            "rates": {k: list(v) for k, v in self._rates.items()},
            "amp": [self.amp_active, self._amp_stepped, self._amp_run, list(self._amp_recent)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (``state`` is not modified)."""
        self._latch.fired = set(state["fired"])
        self._times = deque(state["times"], maxlen=BASELINE)
        self._rates = {k: deque(v, maxlen=BASELINE) for k, v in state["rates"].items()}
        active, stepped, run, recent = state["amp"]
        self.amp_active, self._amp_stepped, self._amp_run = bool(active), bool(stepped), int(run)
        self._amp_recent = deque(recent, maxlen=AMP_RECENT)
