"""Growth trends of probe metrics: which growth is an instability, and the warning it earns."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._events import Event

__all__ = ["DEFAULT_RULES", "Growth", "Latch", "TrendRule", "TrendWatch", "growth_of"]

HISTORY = 64  # samples kept per probe metric


@dataclass(frozen=True)
class TrendRule:
    """When the growth of one probe metric is an instability and not healthy growth.

    A warning needs all of: the value at or above ``floor``; growth by at least
    ``min_growth`` over the last ``window`` samples (log-linear least squares); rising in most
    consecutive samples; and no marked deceleration (the slope over the second half of the
    window at least half that over the first half; healthy growth saturates). The value at or
    above ``critical``, or a trend that reaches it within ``horizon`` steps, is critical.

    Attributes
    ----------
    what : str
        Name used in messages, e.g. ``'max attention logit'``.
    floor : float
        Values below it never warn.
    critical : float or None
        Absolute level that is critical on its own (``None``: none).
    min_growth : float
        Growth factor over the window that counts as a trend (> 1).
    remedy : str
        The usual fix, ending the message.
    absolute : bool
        Test ``|value|`` (for log Z, which may drift either way).
    """

    what: str
    floor: float
    critical: float | None
    min_growth: float
    remedy: str
    absolute: bool = False


DEFAULT_RULES: Mapping[str, TrendRule] = {
    # Wortsman et al. 2023 (attention logits past ~1e4 precede divergence); Dehghani et al. 2023.
    "attn_logit_max": TrendRule(
        "max attention logit",
        floor=200.0,
        critical=1e4,
        min_growth=2.0,
        remedy="add qk-layernorm (Dehghani et al. 2023; Wortsman et al. 2023), lower the peak "
        "LR, or clip gradients",
    ),
    # log Z drifting away from 0 precedes output-logit divergence (PaLM's z-loss).
    "output_logsumexp": TrendRule(
        "output log Z",
        floor=30.0,
        critical=1e3,
        min_growth=2.0,
        remedy="add a z-loss (about 1e-4·log²Z, as in PaLM), lower the LR, or clip gradients",
        absolute=True,
    ),
    "output_logit_max": TrendRule(
        "max output logit",
        floor=100.0,
        critical=1e4,
        min_growth=2.0,
        remedy="add a z-loss (about 1e-4·log²Z, as in PaLM) or lower the LR",
    ),
    # gradient norms grow 2-4x in healthy runs as the model gets confident; ask for more.
    "grad_norm": TrendRule(
        "gradient norm",
        floor=0.0,
        critical=None,
        min_growth=8.0,
        remedy="clip gradients (e.g. max norm 1.0), lower the LR, or use a larger Adam ε",
    ),
}


@dataclass(frozen=True)
class Growth:
    """Log-linear growth of a positive series over a window.

    Attributes
    ----------
    growth : float
        Fitted growth factor over the window (``exp(slope · span)``).
    doubling_steps : float
        Steps to double at the fitted rate (``inf`` if not growing).
    accel : float
        Slope over the second half of the window divided by that over the first half
        (``inf`` when the first half did not grow and the second did).
    rising : float
        Share of consecutive samples that rose.
    """

    growth: float
    doubling_steps: float
    accel: float
    rising: float


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    dx = x - x.mean()
    denom = float(dx @ dx)
    return float(dx @ (y - y.mean())) / denom if denom > 0 else 0.0


def growth_of(steps: np.ndarray, values: np.ndarray) -> Growth:
    """:class:`Growth` of ``values`` (positive) at ``steps`` (increasing, at least 3).

    Examples
    --------
    >>> s = np.arange(0, 100, 10.0)
    >>> g = growth_of(s, 5.0 * 2.0 ** (s / 25.0))
    >>> round(g.doubling_steps, 6), g.rising
    (25.0, 1.0)
    """
    x = np.asarray(steps, float)
    y = np.log(np.maximum(np.asarray(values, float), 1e-300))
    slope = _slope(x, y)
    half = len(x) // 2
    first, second = _slope(x[: half + 1], y[: half + 1]), _slope(x[half:], y[half:])
    if first > 0:
        accel = second / first
    else:
        accel = math.inf if second > 0 else 0.0
    return Growth(
        growth=math.exp(min(slope * float(x[-1] - x[0]), 700.0)),
        doubling_steps=math.log(2.0) / slope if slope > 0 else math.inf,
        accel=accel,
        rising=float(np.mean(np.diff(y) > 0)),
    )


class Latch:
    """One warning per condition until the condition clears (re-arm)."""

    def __init__(self) -> None:
        self.fired: set[str] = set()

    def fire(self, key: str) -> bool:
        if key in self.fired:
            return False
        self.fired.add(key)
        return True

    def clear(self, *keys: str) -> None:
        self.fired.difference_update(keys)


class TrendWatch:
    """Growth of one probe metric against its :class:`TrendRule`: one warning per episode.

    A warning (or a critical event, once the value passes the rule's critical level or will
    within ``horizon`` steps) fires once; the watch re-arms after ``window`` calm samples.
    """

    def __init__(self, name: str, rule: TrendRule, window: int, horizon: int) -> None:
        self.name, self.rule, self.window, self.horizon = name, rule, window, horizon
        self.series: deque[tuple[int, float]] = deque(maxlen=HISTORY)
        self.calm = 0
        self.latch = Latch()

    def observe(self, step: int, value: float, metrics: Mapping[str, float]) -> Event | None:
        """Record one finite sample; the event if the growth is news."""
        rule = self.rule
        v = abs(value) if rule.absolute else value
        self.series.append((step, v))
        critical = rule.critical is not None and v >= rule.critical
        growth = self._growth()
        trending = growth is not None and v >= rule.floor and _is_trend(growth, rule)
        if not (trending or critical):
            self.calm += 1
            if self.calm >= self.window:
                self.latch.clear("warning", "critical")
            return None
        self.calm = 0
        reaches = _steps_to(v, rule.critical, growth) if trending else math.inf
        severe = critical or reaches <= self.horizon
        level = "critical" if severe else "warning"
        if not self.latch.fire(level):
            return None
        if severe:
            self.latch.fire("warning")  # a later, milder state is not news
        since = _since(self.series, self.window)
        worst = _worst_part(self.name, metrics)
        return _trend_event(step, level, self.name, value, rule, growth, since, worst, reaches)

    def _growth(self) -> Growth | None:
        if len(self.series) < self.window:
            return None
        recent = list(self.series)[-self.window :]
        steps = np.array([s for s, _ in recent], float)
        values = np.array([v for _, v in recent], float)
        if steps[-1] <= steps[0] or np.any(values <= 0):
            return None
        return growth_of(steps, values)

    def state_dict(self) -> dict:
        return {
            "series": [list(p) for p in self.series],
            "calm": self.calm,
            "fired": sorted(self.latch.fired),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.series = deque(((int(s), float(v)) for s, v in state["series"]), maxlen=HISTORY)
        self.calm = int(state["calm"])
        self.latch.fired = set(state["fired"])


def _is_trend(g: Growth, rule: TrendRule) -> bool:
    return g.growth >= rule.min_growth and g.rising >= 0.7 and g.accel >= 0.5


def _steps_to(value: float, level: float | None, g: Growth | None) -> float:
    """Steps until ``value`` reaches ``level`` at the growth rate ``g``."""
    if level is None or g is None or not math.isfinite(g.doubling_steps) or value <= 0:
        return math.inf
    return max(0.0, g.doubling_steps * math.log2(level / value))


def _since(series: deque[tuple[int, float]], window: int) -> tuple[int, float]:
    """(step, value) of the lowest value before the current growth (where it started)."""
    points = list(series)
    points = points[-2 * window :]
    i = min(range(len(points)), key=lambda j: (points[j][1], -j))
    return points[i]


def _worst_part(name: str, metrics: Mapping[str, float]) -> tuple[str, float] | None:
    prefix = name + "/"
    parts = [(k[len(prefix) :], float(v)) for k, v in metrics.items() if k.startswith(prefix)]
    parts = [(k, v) for k, v in parts if math.isfinite(v)]
    return max(parts, key=lambda kv: abs(kv[1])) if parts else None


def _trend_event(
    step: int,
    level: str,
    name: str,
    value: float,
    rule: TrendRule,
    growth: Growth | None,
    since: tuple[int, float],
    worst: tuple[str, float] | None,
    reaches: float,
) -> Event:
    where = f" ({worst[0]}: {worst[1]:.4g})" if worst is not None else ""
    text = (
        f"{rule.what} {value:.4g}{where} at step {step}, up from {since[1]:.4g} at step {since[0]}"
    )
    data: dict[str, Any] = {"metric": name, "value": value, "since_step": since[0]}
    data["since_value"] = since[1]
    if growth is not None and math.isfinite(growth.doubling_steps):
        text += f"; doubling every {growth.doubling_steps:.0f} steps"
        data["doubling_steps"] = round(growth.doubling_steps, 6)
        data["growth"] = growth.growth
    if rule.critical is not None and value >= rule.critical:
        text += f"; past {rule.critical:.3g}, the level that precedes divergence"
    elif math.isfinite(reaches):
        text += f"; at this rate it passes {rule.critical:.3g} in ~{reaches:.0f} steps"
        data["steps_to_critical"] = reaches
    if worst is not None:
        data["worst"] = worst[0]
    message = f"{rule.what} growing: {text}. Usual remedy: {rule.remedy}."
    return Event("warning", level, step, message, data)
