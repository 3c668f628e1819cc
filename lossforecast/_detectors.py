"""Instability early warning: probe-metric growth, loss spikes and NaN, divergence, run health."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._events import Event
from ._health import RunHealth
from ._spikes import BadBatchLog, MeanStdSpikeRule, check_positive, robust_sigma
from ._trends import DEFAULT_RULES, Latch, TrendRule, TrendWatch

__all__ = [
    "BadBatchLog",
    "DEFAULT_RULES",
    "InstabilityDetector",
    "MeanStdSpikeRule",
    "TrendRule",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_REFERENCE = 16  # recent losses whose median is the spike reference when no forecast is given
_LOSS_REMEDY = "lower the LR, clip gradients, use a larger Adam ε, or roll back and skip the batch"
_OVERFLOW = (
    "this is the overflow the growth warnings precede; add qk-layernorm / z-loss, lower the LR"
)


_BEST_OF = 5  # observations whose median is a level the loss held


class InstabilityDetector:
    """Turns probe metrics, losses, step times and AMP state into warning events.

    Feed it from the training loop; each ``observe_*`` method returns the new
    :class:`~lossforecast.Event` s (``kind='warning'``, severity ``'warning'`` or
    ``'critical'``), possibly none. A condition warns once and re-arms only after it clears.
    Every message says what was seen, since when, how fast it grows and the usual remedy.

    Parameters
    ----------
    rules : mapping of str to TrendRule, optional
        Growth rules by metric name; :data:`DEFAULT_RULES` by default (attention logits,
        output log Z and max logit, gradient norm). Pass ``{**DEFAULT_RULES, name: rule}``
        to add one.
    window : int, optional
        Probe samples a growth trend is measured over. Default 6 (120 steps at the default
        probe cadence of 20).
    horizon : int, optional
        A trend that reaches its rule's critical level within this many steps is critical.
        Default 200.
    spike_sigma : float, optional
        A loss spike is a residual this many robust σ above the median residual... Default 8.
    spike_rel : float, optional
        ...and at least this fraction of the reference loss above it. Default 0.05.
    spike_window : int, optional
        Residuals behind the robust σ. Default 128.
    min_history : int, optional
        Finite losses needed before spikes are judged. Default 32.
    divergence_factor : float, optional
        Loss above this multiple of its best level (and, from 10 observations on, more than
        ``spike_sigma`` × the noise of successive losses above it) counts as diverged.
        Default 2.
    patience : int, optional
        Consecutive diverged (or non-finite) losses before the run counts as diverged for
        good. Default 3.
    stall_factor : float, optional
        A step slower than this multiple of the median step time is a stall... Default 5.
    stall_seconds : float, optional
        ...and at least this many seconds slower. Default 1.
    slowdown_factor : float, optional
        Median of the last 20 step times above this multiple of the baseline. Default 2.
    throughput_drop : float, optional
        Relative drop of the median of the last 20 throughput values. Default 0.3.
    amp_skip_run : int, optional
        Consecutive skipped AMP steps (after the first good one) that warn. Default 8.
    amp_min_scale : float, optional
        A loss scale below this is collapsing (critical). Default 1.
    eps_ratio : float, optional
        ``adam_v_rms_over_eps`` below this warns (gradient RMS down at Adam's ε). Default 1.
    bad_batches : BadBatchLog, optional
        Where spikes and non-finite losses are recorded.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> det = InstabilityDetector()
    >>> events = []
    >>> for step in range(0, 400, 20):
    ...     events += det.observe_metrics(step, {"attn_logit_max": 5.0 * 2 ** (step / 40)})
    >>> [(e.step, e.severity, e.data["doubling_steps"]) for e in events]
    [(220, 'warning', 40.0), (240, 'critical', 40.0)]
    """

    def __init__(
        self,
        *,
        rules: Mapping[str, TrendRule] | None = None,
        window: int = 6,
        horizon: int = 200,
        spike_sigma: float = 8.0,
        spike_rel: float = 0.05,
        spike_window: int = 128,
        min_history: int = 32,
        divergence_factor: float = 2.0,
        patience: int = 3,
        eps_ratio: float = 1.0,
        bad_batches: BadBatchLog | None = None,
        **health: Any,
    ) -> None:
        rules = dict(DEFAULT_RULES if rules is None else rules)
        for name, rule in rules.items():
            if not isinstance(rule, TrendRule):
                raise TypeError(
                    f"`rules[{name!r}]` must be a TrendRule, got {type(rule).__name__}."
                )
            check_positive(f"rules[{name!r}].min_growth", rule.min_growth, minimum=1.0)
        check_positive("window", window, integer=True, minimum=3)
        check_positive("horizon", horizon, integer=True, allow_zero=True)
        check_positive("spike_sigma", spike_sigma)
        check_positive("spike_rel", spike_rel, allow_zero=True)
        check_positive("spike_window", spike_window, integer=True, minimum=2)
        check_positive("min_history", min_history, integer=True)
        if min_history > spike_window:
            raise ValueError(
                f"`min_history` must be <= `spike_window` ({spike_window}), got {min_history!r}."
            )
        check_positive("divergence_factor", divergence_factor, minimum=1.0)
        check_positive("patience", patience, integer=True)
        check_positive("eps_ratio", eps_ratio)
        if bad_batches is not None and not isinstance(bad_batches, BadBatchLog):
            raise TypeError(
                f"`bad_batches` must be a BadBatchLog, got {type(bad_batches).__name__}."
            )
        unknown = set(health) - _HEALTH_OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}.")
        self.health = RunHealth(**health)
        self.rules = rules
        self.window = int(window)
        self.horizon = int(horizon)
        self.spike_sigma = float(spike_sigma)
        self.spike_rel = float(spike_rel)
        self.min_history = int(min_history)
        self.divergence_factor = float(divergence_factor)
        self.patience = int(patience)
        self.eps_ratio = float(eps_ratio)
        self.bad_batches = bad_batches
        self._latch = Latch()
        self._watches = {n: TrendWatch(n, r, self.window, self.horizon) for n, r in rules.items()}
        self._residuals: deque[float] = deque(maxlen=int(spike_window))
        self._losses: deque[float] = deque(maxlen=_REFERENCE)
        self._best = math.inf
        self._bad_run = 0
        self._nonfinite_run = 0
        self._diverged = False
        self._checkpoints: deque[tuple[int, str]] = deque(maxlen=16)

    # ------------------------------------------------------------------ properties
    @property
    def diverged(self) -> bool:
        """True while the loss is non-finite, or above ``divergence_factor`` × its best, for
        ``patience`` observations in a row (the run is gone; advice may stop it)."""
        return self._diverged

    @property
    def best_loss(self) -> float:
        """Lowest level the loss held: the lowest median of 5 consecutive observations
        (``inf`` before any)."""
        return self._best

    def note_checkpoint(self, step: int, path: str) -> None:
        """Tell the detector a checkpoint was saved at ``step`` (named in roll-back advice)."""
        self._checkpoints.append((int(step), str(path)))

    def checkpoint_before(self, step: int) -> tuple[int, str] | None:
        """The latest known checkpoint saved before ``step`` as ``(step, path)``, if any."""
        earlier = [c for c in self._checkpoints if c[0] < step]
        return earlier[-1] if earlier else None

    # ------------------------------------------------------------------ probe metrics
    def observe_metrics(self, step: int, metrics: Mapping[str, float]) -> list[Event]:
        """Check probe metrics (names as ``lossforecast.integrations.torch.Probes`` reports).

        Growth trends are tested for the metrics in :attr:`rules`; per-layer values
        (``name/layer``) only name the worst layer. Non-finite probe values, non-finite
        gradients outside mixed precision, non-finite parameters and a gradient RMS down at
        Adam's ε warn too.
        """
        step = int(step)
        events: list[Event] = []
        for name, watch in self._watches.items():
            value = metrics.get(name)
            if value is not None and math.isfinite(float(value)):
                event = watch.observe(step, float(value), metrics)
                if event is not None:
                    events.append(event)
        events += self._nonfinite_metrics(step, metrics)
        ratio = metrics.get("adam_v_rms_over_eps")
        if ratio is not None and math.isfinite(float(ratio)):
            if float(ratio) >= self.eps_ratio:
                self._latch.clear("adam_eps")
            elif self._latch.fire("adam_eps"):
                events.append(_adam_eps_event(step, float(ratio)))
        return events

    def _nonfinite_metrics(self, step: int, metrics: Mapping[str, float]) -> list[Event]:
        events = []
        bad = [
            k
            for k in ("attn_logit_max", "output_logsumexp", "output_logit_max")
            if k in metrics and not math.isfinite(float(metrics[k]))
        ]
        grads = float(metrics.get("nonfinite_grads", 0.0) or 0.0)
        params = float(metrics.get("nonfinite_params", 0.0) or 0.0)
        checks = (
            ("nonfinite:probe", bool(bad), f"non-finite {', '.join(bad)} (overflow)", _OVERFLOW),
            (
                "nonfinite:grads",
                grads > 0 and not self.health.amp_active,
                f"non-finite gradients in {grads:.0f} parameter tensor(s) without a loss scaler",
                "clip gradients, lower the LR, or roll back to the last good checkpoint",
            ),
            (
                "nonfinite:params",
                params > 0,
                f"non-finite values in {params:.0f} parameter tensor(s): the weights are lost",
                "roll back to the last good checkpoint and lower the LR",
            ),
        )
        for key, present, what, remedy in checks:
            if not present:
                self._latch.clear(key)
            elif self._latch.fire(key):
                message = f"{what} at step {step}. Usual remedy: {remedy}."
                data = {"metric": key.split(":")[1], "nonfinite_grads": grads}
                data["nonfinite_params"] = params
                events.append(Event("warning", "critical", step, message, data))
        return events

    def _adam_eps_event(self, step: int, ratio: float) -> Event:
        message = (
            f"gradient RMS has fallen to Adam's ε at step {step} (RMS of √v is {ratio:.2g}× ε): "
            "updates shrink silently. Usual remedy: a smaller ε (e.g. 1e-15, Wortsman et al. "
            "2023) or a larger LR warmup/scale."
        )
        return Event("warning", "warning", step, message, {"adam_v_rms_over_eps": ratio})

    def observe_loss(
        self,
        step: int,
        loss: float,
        *,
        predicted: float | None = None,
        scale: float | None = None,
        batch_idx: int | None = None,
    ) -> list[Event]:
        """Check one loss: non-finite, a spike, divergence.

        Parameters
        ----------
        step : int
            Training step of the loss.
        loss : float
            The loss (a per-step value or a short window mean).
        predicted : float, optional
            The forecast's predicted loss at ``step`` (``Forecaster.trajectory``). A spike is
            then a large residual against the forecast; without it, against the median of
            the last 16 losses.
        scale : float, optional
            Residual scale to use instead of the detector's robust σ (1.4826 × the median
            absolute deviation of the last ``spike_window`` residuals).
        batch_idx : int, optional
            Batch index, recorded in the bad-batch log.
        """
        step, value = int(step), float(loss)
        if not math.isfinite(value):
            return self._nonfinite_loss(step, value, batch_idx)
        self._nonfinite_run = 0
        self._latch.clear("loss:nonfinite")
        events = self._divergence(step, value)
        if predicted is not None and math.isfinite(float(predicted)):
            reference = float(predicted)
        elif self._losses:
            reference = float(np.median(np.fromiter(self._losses, float)))
        else:
            reference = value
        self._losses.append(value)
        recent = list(self._losses)[-_BEST_OF:]  # the best level, not one lucky batch
        self._best = min(self._best, float(np.median(recent)) if len(recent) == _BEST_OF else value)
        residual = value - reference
        if len(self._residuals) >= self.min_history and not self._diverged:
            center, sigma = robust_sigma(np.fromiter(self._residuals, float))
            if scale is not None and math.isfinite(float(scale)) and scale > 0:
                sigma = float(scale)
            excess = residual - center
            z = excess / sigma if sigma > 0 else math.inf
            if excess > self.spike_rel * abs(reference) and z > self.spike_sigma:
                if self._latch.fire("loss:spike"):
                    events.append(
                        self._spike_event(step, value, reference, predicted, excess, z, batch_idx)
                    )
                return events  # spikes stay out of the residual history
        self._latch.clear("loss:spike")
        self._residuals.append(residual)
        return events

    def _divergence(self, step: int, value: float) -> list[Event]:
        bad = math.isinf(self._best) is False and value > self.divergence_factor * self._best
        if bad and len(self._losses) >= 2 * _BEST_OF:  # and far outside the loss's own noise
            _, sigma = robust_sigma(np.diff(np.fromiter(self._losses, float)))
            bad = value - self._best > self.spike_sigma * sigma / math.sqrt(2.0)
        self._bad_run = self._bad_run + 1 if (bad or not math.isfinite(value)) else 0
        was = self._diverged
        self._diverged = self._bad_run >= self.patience
        if not self._diverged:
            self._latch.clear("loss:diverged")
            return []
        if was or not self._latch.fire("loss:diverged"):
            return []
        shown = f"{value:.4g}" if math.isfinite(value) else "non-finite"
        back = self._rollback(step - self.patience)
        message = (
            f"training diverged at step {step}: loss {shown} for {self._bad_run} observations "
            f"in a row (best {self._best:.4g}). Usual remedy: {back}lower the LR, add "
            "qk-layernorm / z-loss, clip gradients."
        )
        data = {"loss": value, "best_loss": self._best, "bad_run": self._bad_run}
        return [Event("warning", "critical", step, message, data)]

    def _nonfinite_loss(self, step: int, value: float, batch_idx: int | None) -> list[Event]:
        self._nonfinite_run += 1
        events = self._divergence(step, value)
        if self.health.amp_active and self._nonfinite_run < 2:
            return events  # one non-finite loss under dynamic loss scaling: the step is skipped
        if not self._latch.fire("loss:nonfinite"):
            return events
        back = self._rollback(step)
        self._record(step, value, "nonfinite", batch_idx)
        message = (
            f"non-finite loss ({value}) at step {step}"
            + (f", {self._nonfinite_run} in a row" if self._nonfinite_run > 1 else "")
            + f". Usual remedy: {back}{_LOSS_REMEDY}."
        )
        data: dict[str, Any] = {"loss": value, "nonfinite_run": self._nonfinite_run}
        if batch_idx is not None:
            data["batch_idx"] = int(batch_idx)
        return [Event("warning", "critical", step, message, data), *events]

    def _spike_event(
        self,
        step: int,
        value: float,
        reference: float,
        predicted: float | None,
        excess: float,
        z: float,
        batch_idx: int | None,
    ) -> Event:
        against = "the forecast" if predicted is not None else "the recent median"
        back = self._rollback(step)
        self._record(step, value, "spike", batch_idx)
        message = (
            f"loss spike at step {step}: {value:.4g} vs {reference:.4g} expected from {against} "
            f"(+{excess:.3g}, {z:.1f}σ of the usual residual). Usual remedy: {back}"
            f"{_LOSS_REMEDY}."
        )
        data: dict[str, Any] = {"loss": value, "expected": reference, "excess": excess, "z": z}
        if batch_idx is not None:
            data["batch_idx"] = int(batch_idx)
        return Event("warning", "warning", step, message, data)

    def _rollback(self, step: int) -> str:
        ckpt = self.checkpoint_before(step)
        return "" if ckpt is None else f"roll back to {ckpt[1]} (step {ckpt[0]}), "

    def _record(self, step: int, value: float, reason: str, batch_idx: int | None) -> None:
        if self.bad_batches is None:
            return
        ckpt = self.checkpoint_before(step)
        self.bad_batches.record(
            step,
            batch_idx=batch_idx,
            loss=value,
            reason=reason,
            checkpoint=None if ckpt is None else ckpt[1],
        )

    # ------------------------------------------------------------------ run health
    def observe_step_time(self, step: int, seconds: float) -> list[Event]:
        """Stall / slowdown check of one step's wall time (see :class:`RunHealth`)."""
        return self.health.observe_step_time(step, seconds)

    def observe_throughput(
        self, step: int, value: float, *, name: str = "throughput"
    ) -> list[Event]:
        """Drop check of a throughput or MFU value (see :class:`RunHealth`)."""
        return self.health.observe_throughput(step, value, name=name)

    def observe_amp(self, step: int, scale: float, found_inf: bool) -> list[Event]:
        """Loss-scaler check after ``scaler.update()`` (see :class:`RunHealth`): one skipped
        step is normal; a run of them or a collapsing scale warns."""
        return self.health.observe_amp(step, scale, found_inf)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-safe state (histories are bounded), with a ``"version"`` key."""
        return {
            "version": STATE_VERSION,
            "fired": sorted(self._latch.fired),
            "trends": {k: w.state_dict() for k, w in self._watches.items()},
            "residuals": list(self._residuals),
            "losses": list(self._losses),
            "best": None if math.isinf(self._best) else self._best,
            "bad_run": self._bad_run,
            "nonfinite_run": self._nonfinite_run,
            "diverged": self._diverged,
            "health": self.health.state_dict(),
            "checkpoints": [list(c) for c in self._checkpoints],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; ``state`` is not modified."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported detector state version {state.get('version')!r}.")
        self._latch.fired = set(state["fired"])
        for name, saved in state["trends"].items():
            if name in self._watches:
                self._watches[name].load_state_dict(saved)
        self._residuals = deque(state["residuals"], maxlen=self._residuals.maxlen)
        self._losses = deque(state["losses"], maxlen=_REFERENCE)
        self._best = math.inf if state["best"] is None else float(state["best"])
        self._bad_run, self._nonfinite_run = int(state["bad_run"]), int(state["nonfinite_run"])
        self._diverged = bool(state["diverged"])
        self.health.load_state_dict(state["health"])
        self._checkpoints = deque(((int(s), str(p)) for s, p in state["checkpoints"]), maxlen=16)

    def __repr__(self) -> str:
        return f"InstabilityDetector(rules={sorted(self.rules)}, diverged={self._diverged})"


_HEALTH_OPTIONS = frozenset(
    (
        "stall_factor",
        "stall_seconds",
        "slowdown_factor",
        "throughput_drop",
        "amp_skip_run",
        "amp_min_scale",
    )
)


def _adam_eps_event(step: int, ratio: float) -> Event:
    message = (
        f"gradient RMS has fallen to Adam's ε at step {step} (RMS of √v is {ratio:.2g}× ε): "
        "updates shrink silently. Usual remedy: a smaller ε (e.g. 1e-15, Wortsman et al. 2023)."
    )
    return Event("warning", "warning", step, message, {"adam_v_rms_over_eps": ratio})
