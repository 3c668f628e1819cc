"""Early-stop advice from the forecast: diverged, unreachable target, dominated, cool down now.

An :class:`Advisor` reads the latest fit of a :class:`~lossforecast.Forecaster` (it never fits
itself) and returns :class:`Advice` only when something new is worth saying. Each advice
carries its evidence and a probability read off the calibrated forecast interval, says
whether it justifies stopping the run (``stop``), and becomes an ``"advice"``
:class:`~lossforecast.Event` with :meth:`Advice.to_event`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ._cooldown import COOLDOWN_SHAPES, cooldown_schedule
from ._events import Event, _scalar
from ._predictive import Predictive, latest_final, latest_what_if, predictive
from ._reference import read_reference_losses
from ._schedule import Schedule

if TYPE_CHECKING:
    from ._forecaster import Forecast, Forecaster

__all__ = ["Advice", "Advisor"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

AdviceKind = Literal[
    "stop_diverged", "target_unreachable", "dominated", "diminishing_returns", "cool_down_now"
]
ADVICE_KINDS = (
    "stop_diverged",
    "target_unreachable",
    "dominated",
    "diminishing_returns",
    "cool_down_now",
)
#: Advice already given is repeated only if its loss moved by this share, or its verdict changed.
_MATERIAL = 0.01
#: ... or by this share for information only (a cool-down what-if while the plan is better).
_MATERIAL_INFO = 0.05
#: ... and is forgotten (so it counts as new again) once its probability falls this far below
#: the confidence needed, so a probability hovering at the threshold does not repeat it.
_HYSTERESIS = 0.1
#: The planned LR counts as a plateau if it has not changed over this share of the steps done.
_PLATEAU_SPAN = 0.1
#: A cooldown clipped by the end of the plan is still suggested down to this share of its length.
_MIN_COOLDOWN = 0.1


@dataclass(frozen=True)
class Advice:
    """One piece of advice about the run, with the numbers behind it.

    Attributes
    ----------
    kind : {'stop_diverged', 'target_unreachable', 'dominated', 'diminishing_returns', \
'cool_down_now'}
        What is advised.
    step : int
        Training step the advice was made at.
    message : str
        A full sentence with the values and the thresholds.
    confidence : float
        Probability, in [0, 1], of what the message claims (1 for a diverged run).
    evidence : dict of str to float, int or str
        The numbers behind the message (flat scalars; copied).
    stop : bool
        Whether this advice justifies stopping the run (what ``auto_stop`` acts on).

    Raises
    ------
    ValueError
        If ``kind``, ``step`` or ``confidence`` is out of range.
    TypeError
        If ``evidence`` holds something other than str keys and float, int or str values.

    Examples
    --------
    >>> a = Advice("dominated", 800, "will not beat 2.95", 0.97, {"reference_loss": 2.95}, True)
    >>> e = a.to_event()
    >>> e.kind, e.severity, e.data["advice"], e.data["stop"]
    ('advice', 'critical', 'dominated', 1)
    """

    kind: AdviceKind
    step: int
    message: str
    confidence: float
    evidence: dict[str, float | int | str] = field(default_factory=dict)
    stop: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ADVICE_KINDS:
            raise ValueError(f"`kind` must be one of {ADVICE_KINDS}, got {self.kind!r}.")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, np.integer)):
            raise ValueError(f"`step` must be a non-negative int, got {self.step!r}.")
        if self.step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {self.step!r}.")
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise ValueError(f"`confidence` must be in [0, 1], got {self.confidence!r}.")
        clean: dict[str, float | int | str] = {}
        for key, value in dict(self.evidence).items():
            if not isinstance(key, str):
                raise TypeError(f"`evidence` keys must be str, got {key!r}.")
            clean[key] = _scalar(key, value)
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(self, "confidence", float(self.confidence))
        object.__setattr__(self, "evidence", clean)
        object.__setattr__(self, "stop", bool(self.stop))

    @property
    def severity(self) -> str:
        """``'critical'`` when stop-worthy; ``'warning'`` or ``'info'`` (cool-down information)."""
        if self.stop:
            return "critical"
        if self.kind == "cool_down_now" and not self.evidence.get("actionable"):
            return "info"
        return "warning"

    def to_event(self) -> Event:
        """This advice as an ``"advice"`` event: data = evidence + advice, confidence, stop."""
        data = {**self.evidence, "advice": self.kind, "confidence": self.confidence}
        data["stop"] = int(self.stop)
        return Event("advice", self.severity, self.step, self.message, data)


def _fmt_step(step: int) -> str:
    if step < 10_000:
        return f"{step:,}"
    return f"{step / 1000:.1f}".rstrip("0").rstrip(".") + "k"


# ---------------------------------------------------------------------------- the advisor
class Advisor:
    """Turn the latest forecast into early-stop advice, each piece given once.

    Configure once, then call :meth:`advise` after each new background fit (and whenever an
    instability detector reports divergence). Probabilities come from the forecaster's
    calibrated interval: it is read at a grid of coverages (``refit=False``, so nothing is
    fitted on the caller's thread) and ``P(final > x)`` is interpolated from the coverage
    whose bound meets ``x`` (a central interval of coverage ``c`` leaves ``(1 - c) / 2`` in
    each tail). This keeps the heavier-than-Gaussian tails the backtests calibrated, which a
    Gaussian sigma derived from the 80% interval would understate.

    Parameters
    ----------
    target_loss : float, optional
        Loss the user needs; ``target_unreachable`` when the run will miss it.
    reference : float or path, optional
        Best known final loss of other runs, or a JSON file / folder of past run summaries
        or forecasts (see :func:`read_reference_losses`; the lowest loss found is used).
        ``dominated`` when the run will not beat it. A path is read once, here; a missing or
        empty one gives no reference (and one log message).
    min_improvement : float, optional
        Relative improvement of the forecast loss over the rest of the run (from the fitted
        loss now to the forecast final) below which returns are ``diminishing_returns``.
    min_improvement_per_kwh : float, optional
        Absolute loss improvement per kWh over the rest of the run below which returns are
        diminishing (needs ``kwh_to_finish`` in :meth:`advise`).
    cooldown_fraction : float, optional
        Length of the ``cool_down_now`` what-if as a share of the steps done so far, in
        (0, 1]: at step 40k, 0.2 means a cooldown over steps 40k..48k. (A cooldown that is a
        share ``f`` of the shortened run's total is ``f / (1 - f)`` here.) Default 0.2.
    cooldown_shape : {'1-sqrt', 'linear', 'cosine'}, optional
        Shape of that cooldown (see :func:`cooldown_schedule`). Default ``'1-sqrt'``.
    cooldown_final_lr : float, optional
        LR the cooldown ends at; default the planned schedule's last LR, or 0 for a plan that
        never decays (constant LR).
    confidence : float, optional
        Probability, in (0.5, 1), needed before advising to stop. Default 0.9.
    min_progress : float, optional
        Share of the planned steps after warmup (up to the forecaster's target step), in
        [0, 1), before which no advice is given from the forecast: it would rest on the
        priors alone. Default 0.1.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from lossforecast import Forecaster
    >>> lr = np.r_[np.linspace(1e-5, 1e-3, 100), np.full(900, 1e-3)]
    >>> fc = Forecaster(lr)
    >>> for s in range(100, 600, 10):
    ...     fc.update(s, 3.0 + 2.0 * (s / 1000) ** -0.5)
    >>> fc.refit()  # in a training loop, a background fit does this
    True
    >>> advisor = Advisor(target_loss=3.5)
    >>> [(a.kind, a.stop) for a in advisor.advise(fc, 590)]
    [('target_unreachable', True), ('cool_down_now', False)]
    >>> advisor.advise(fc, 590)  # nothing new
    []
    """

    def __init__(
        self,
        *,
        target_loss: float | None = None,
        reference: float | str | os.PathLike | None = None,
        min_improvement: float | None = None,
        min_improvement_per_kwh: float | None = None,
        cooldown_fraction: float = 0.2,
        cooldown_shape: str = "1-sqrt",
        cooldown_final_lr: float | None = None,
        confidence: float = 0.9,
        min_progress: float = 0.1,
    ) -> None:
        for name, value in (
            ("target_loss", target_loss),
            ("min_improvement_per_kwh", min_improvement_per_kwh),
        ):
            if value is not None and not _positive(value):
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if min_improvement is not None and not (_positive(min_improvement) and min_improvement < 1):
            raise ValueError(f"`min_improvement` must be in (0, 1), got {min_improvement!r}.")
        if not (_positive(cooldown_fraction) and cooldown_fraction <= 1):
            raise ValueError(f"`cooldown_fraction` must be in (0, 1], got {cooldown_fraction!r}.")
        if cooldown_shape not in COOLDOWN_SHAPES:
            raise ValueError(
                f"`cooldown_shape` must be one of {COOLDOWN_SHAPES}, got {cooldown_shape!r}."
            )
        if cooldown_final_lr is not None and not (
            _number(cooldown_final_lr) and cooldown_final_lr >= 0
        ):
            raise ValueError(
                f"`cooldown_final_lr` must be a non-negative number, got {cooldown_final_lr!r}."
            )
        if not (_number(confidence) and 0.5 < confidence < 1.0):
            raise ValueError(f"`confidence` must be in (0.5, 1), got {confidence!r}.")
        if not (_number(min_progress) and 0.0 <= min_progress < 1.0):
            raise ValueError(f"`min_progress` must be in [0, 1), got {min_progress!r}.")
        self.reference_source: str | None = None
        if reference is None or _number(reference):
            if reference is not None and not _positive(reference):
                raise ValueError(
                    f"`reference` must be a positive loss or a path, got {reference!r}."
                )
            self.reference_loss = None if reference is None else float(reference)
            self.n_reference_runs = 0 if reference is None else 1
        elif isinstance(reference, (str, os.PathLike)):
            losses = read_reference_losses(reference)
            self.reference_loss = min(losses) if losses else None
            self.n_reference_runs = len(losses)
            self.reference_source = os.fspath(reference)
            if not losses:
                logger.info(
                    "lossforecast: no final loss found under %s; no 'dominated' advice.",
                    self.reference_source,
                )
        else:
            raise ValueError(
                f"`reference` must be a loss, a path or None, got {type(reference).__name__}."
            )
        self.target_loss = None if target_loss is None else float(target_loss)
        self.min_improvement = None if min_improvement is None else float(min_improvement)
        self.min_improvement_per_kwh = (
            None if min_improvement_per_kwh is None else float(min_improvement_per_kwh)
        )
        self.cooldown_fraction = float(cooldown_fraction)
        self.cooldown_shape = cooldown_shape
        self.cooldown_final_lr = None if cooldown_final_lr is None else float(cooldown_final_lr)
        self.confidence = float(confidence)
        self.min_progress = float(min_progress)
        self._given: dict[str, dict] = {}
        self._failed = False
        #: The latest "cool down now" what-if, given as advice or not (e.g. for a live display).
        self.last_cooldown: Advice | None = None

    # ------------------------------------------------------------------ advising
    def advise(
        self,
        forecaster: Forecaster,
        step: int,
        *,
        diverged: str | None = None,
        kwh_to_finish: float | None = None,
    ) -> list[Advice]:
        """New advice at ``step`` from the forecaster's latest fit; never fits.

        Call it after each new background fit, and when a detector reports divergence. It
        costs about 5-10 ms (some 17 reads of the fitted law, half of it in the interval
        calibration, plus one what-if schedule on an LR plateau), so it may also run on the
        fitting thread. A failure while reading the forecast is logged once and gives no
        advice; only a bad ``step`` raises.

        Parameters
        ----------
        forecaster : Forecaster
            The run's forecaster; only its latest fit is read (``refit=False``).
        step : int
            Current training step (schedule step of the latest observation).
        diverged : str, optional
            Why an instability detector says the run diverged; gives ``stop_diverged``.
        kwh_to_finish : float, optional
            Energy forecast to finish the run, for ``min_improvement_per_kwh``.

        Returns
        -------
        list of Advice
            Only advice not given before, or whose numbers changed materially (its loss by
            1%, or its verdict); empty most of the time.
        """
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
        step = int(step)
        out: list[Advice] = []
        if diverged:
            advice = Advice(
                "stop_diverged",
                step,
                f"Stop now: the run diverged ({diverged}).",
                1.0,
                {"reason": str(diverged), "n_nonfinite": int(forecaster.n_nonfinite)},
                stop=True,
            )
            if self._given.get("stop_diverged", {}).get("reason") != str(diverged):
                self._given["stop_diverged"] = {"reason": str(diverged), "step": step}
                out.append(advice)
        try:
            found = self._from_forecast(forecaster, step, kwh_to_finish)
        except Exception as exc:  # advice must never take the training run down
            if not self._failed:
                logger.warning(
                    "lossforecast: no advice this time (%s: %s); later failures are logged at "
                    "debug level.",
                    type(exc).__name__,
                    exc,
                )
            else:
                logger.debug("lossforecast: advice failed: %s: %s", type(exc).__name__, exc)
            self._failed = True
            return out
        for kind, advice, probability in found:
            if advice is None:
                self._forget(kind, probability)
            elif self._is_new(advice):
                out.append(advice)
        return out

    def _from_forecast(self, forecaster: Forecaster, step: int, kwh: float | None):
        """(kind, Advice or None, probability) for each forecast-based kind that applies."""
        target_step = forecaster.target_step
        warmup = forecaster.schedule.warmup_steps
        now = max(step, forecaster.last_step or 0)
        progress = (now - warmup) / max(target_step - warmup, 1)
        if progress < self.min_progress or now >= target_step:
            return []
        final = latest_final(forecaster)
        if final is None:
            return []
        found = []
        if self.target_loss is not None:
            found.append(self._threshold(final, step, "target_unreachable", self.target_loss))
        if self.reference_loss is not None:
            found.append(self._threshold(final, step, "dominated", self.reference_loss))
        cooldown = self._cooldown(forecaster, final, step, now)
        if self.min_improvement is not None or (self.min_improvement_per_kwh and kwh):
            current = forecaster.forecast(now, refit=False)
            if current is not None:
                found.append(self._diminishing(final, current.loss, step, now, kwh, cooldown))
        self.last_cooldown = cooldown
        if cooldown is not None:
            found.append(("cool_down_now", cooldown, cooldown.confidence))
        return found

    def _threshold(self, final: Predictive, step: int, kind: str, threshold: float):
        """target_unreachable / dominated: the final loss stays above ``threshold``."""
        f = final.forecast
        p = final.prob_above(threshold)
        if p < self.confidence:
            return kind, None, p
        what = "reach the target loss" if kind == "target_unreachable" else "beat the reference"
        source = ""
        if kind == "dominated" and self.n_reference_runs > 1:
            source = f", the best of {self.n_reference_runs} past runs"
        message = (
            f"Will not {what} {threshold:.4g}{source}: the forecast final loss is {f.loss:.4g} "
            f"[{f.low:.4g}, {f.high:.4g}] at step {_fmt_step(f.step)} ({f.coverage:.0%}); "
            f"P(final > {threshold:.4g}) = {p:.0%}, at least {self.confidence:.0%} needed to stop."
        )
        evidence = {
            "threshold": threshold,
            "target_loss" if kind == "target_unreachable" else "reference_loss": threshold,
            **_forecast_evidence(f),
            "probability": p,
        }
        if kind == "dominated":
            evidence["n_reference_runs"] = self.n_reference_runs
        return kind, Advice(kind, step, message, p, evidence, stop=True), p

    def _diminishing(self, final, current, step, now, kwh, cooldown):
        """The rest of the run improves the loss by less than the user's thresholds."""
        f = final.forecast
        gain = (current - f.loss) / current
        # P(improvement < threshold) = P(final > level) for each threshold; both must hold.
        levels = {}
        if self.min_improvement is not None:
            levels["relative"] = current * (1.0 - self.min_improvement)
        if self.min_improvement_per_kwh and kwh and math.isfinite(kwh) and kwh > 0:
            levels["per_kwh"] = current - self.min_improvement_per_kwh * kwh
        if not levels:
            return "diminishing_returns", None, 0.0
        p = min(final.prob_above(level) for level in levels.values())
        if p < self.confidence:
            return "diminishing_returns", None, p
        remaining = f.step - now
        parts = []
        if "relative" in levels:
            parts.append(f"below min_improvement {self.min_improvement:.2%}")
        if "per_kwh" in levels:
            parts.append(
                f"{(current - f.loss) / kwh:.3g} per kWh over {kwh:.3g} kWh, below "
                f"min_improvement_per_kwh {self.min_improvement_per_kwh:.3g}"
            )
        message = (
            f"Diminishing returns: the remaining {remaining:,} steps are forecast to improve the "
            f"loss by {gain:.2%} ({current:.4g} -> {f.loss:.4g}), {' and '.join(parts)} "
            f"(probability {p:.0%})."
        )
        # A run on an LR plateau gains more from a cooldown than from stopping: no stop then.
        better = cooldown is not None and cooldown.evidence["whatif_loss"] < current * (
            1.0 - (self.min_improvement or 0.0)
        )
        if better:
            message += (
                f" Do not just stop: a cooldown now would reach "
                f"{cooldown.evidence['whatif_loss']:.4g} at step "
                f"{_fmt_step(int(cooldown.evidence['cooldown_end']))}."
            )
        evidence = {
            "current_loss": current,
            **_forecast_evidence(f),
            "improvement": gain,
            "remaining_steps": remaining,
            "probability": p,
        }
        if self.min_improvement is not None:
            evidence["min_improvement"] = self.min_improvement
        if "per_kwh" in levels:
            evidence.update(
                kwh_to_finish=float(kwh),
                improvement_per_kwh=(current - f.loss) / kwh,
                min_improvement_per_kwh=self.min_improvement_per_kwh,
            )
        return (
            "diminishing_returns",
            Advice("diminishing_returns", step, message, p, evidence, stop=not better),
            p,
        )

    def _cooldown(self, forecaster: Forecaster, final: Predictive, step: int, now: int):
        """The what-if "cool down now" for a run on an LR plateau, or None."""
        sched = forecaster.schedule
        lr = sched.lr
        span = max(1, int(_PLATEAU_SPAN * now))
        begin = float(lr[now])
        start = now + 1
        wanted = max(1, round(self.cooldown_fraction * start))
        # Near the end of the plan, a shorter cooldown that ends at the target step.
        length = min(wanted, forecaster.target_step - now)
        end = start + length - 1
        on_plateau = (
            now > sched.warmup_steps + span
            and np.allclose(lr[now - span : now + 1], begin, rtol=1e-6, atol=0.0)
            and length >= _MIN_COOLDOWN * wanted
        )
        final_lr = self.cooldown_final_lr
        if final_lr is None:
            final_lr = float(lr[-1]) if lr[-1] < begin else 0.0
        if not on_plateau or final_lr >= begin:
            return None
        what = cooldown_schedule(lr, start, length, self.cooldown_shape, final_lr)
        early = predictive(
            latest_what_if(forecaster, Schedule(what, peak_lr=sched.peak_lr)), forecaster.coverage
        )
        if early is None:
            return None
        w, f = early.forecast, final.forecast
        # Actionable when the cooldown now ends lower than the plan, meets the user's goal, or
        # leaves the rest of the plan less than ``min_improvement`` to add. Probabilities use
        # the what-if's interval, the wider one (its annealing is extrapolated further).
        p_beats = 1.0 - early.prob_above(f.loss)
        reasons = [(p_beats, f"it ends below the planned schedule with probability {p_beats:.0%}")]
        goals = [g for g in (self.target_loss, self.reference_loss) if g is not None]
        goal = min(goals) if goals else None
        if goal is not None:
            p_goal = 1.0 - early.prob_above(goal)
            name = "the target" if goal == self.target_loss else "the reference"
            reasons.append((p_goal, f"it meets {name} {goal:.4g} with probability {p_goal:.0%}"))
        if self.min_improvement is not None:
            p_small = 1.0 - early.prob_above(f.loss / (1.0 - self.min_improvement))
            reasons.append(
                (
                    p_small,
                    f"the planned schedule would improve on it by less than "
                    f"{self.min_improvement:.2%} with probability {p_small:.0%}",
                )
            )
        reasons = [r for r in reasons if r[0] >= self.confidence]
        shape = f"{self.cooldown_fraction:.0%} ({self.cooldown_shape})"
        if length < wanted:
            shape = f"{length:,}-step ({self.cooldown_shape})"
        message = (
            f"Start a {shape} cooldown now to reach {w.loss:.4g} [{w.low:.4g}, {w.high:.4g}] at "
            f"step {_fmt_step(end)} (planned: {f.loss:.4g} at step {_fmt_step(f.step)})"
        )
        if reasons:
            confidence = max(p for p, _ in reasons)
            saving = f", saving {f.step - end:,} steps" if end < f.step else ""
            message += f": {' and '.join(text for _, text in reasons)}{saving}."
        elif f.loss < w.loss:
            confidence = 1.0 - p_beats  # the claim: the plan ends lower
            message += f"; the planned schedule is better (probability {confidence:.0%})."
        else:
            confidence = p_beats
            message += (
                f"; it would likely end below the planned schedule (probability {p_beats:.0%}, "
                f"short of the {self.confidence:.0%} needed to advise it)."
            )
        evidence = {
            "cooldown_start": start,
            "cooldown_steps": length,
            "cooldown_end": end,
            "cooldown_fraction": self.cooldown_fraction,
            "cooldown_shape": self.cooldown_shape,
            "cooldown_final_lr": final_lr,
            "whatif_loss": w.loss,
            "whatif_low": w.low,
            "whatif_high": w.high,
            "planned_loss": f.loss,
            "planned_low": f.low,
            "planned_high": f.high,
            "planned_step": f.step,
            "coverage": f.coverage,
            "steps_saved": f.step - end,
            "actionable": int(bool(reasons)),
        }
        if goal is not None:
            evidence.update(goal_loss=goal, probability_goal=p_goal)
        return Advice("cool_down_now", step, message, confidence, evidence, stop=False)

    # ------------------------------------------------------------------ repeats
    def _is_new(self, advice: Advice) -> bool:
        """Record ``advice``; True unless the same verdict was given with nearly the same loss."""
        ev = advice.evidence
        key = float(ev.get("whatif_loss", ev.get("forecast_loss", 0.0)))
        verdict = f"{advice.severity}/{int(ev.get('planned_loss', 0.0) < key)}"
        material = _MATERIAL_INFO if advice.severity == "info" else _MATERIAL
        last = self._given.get(advice.kind)
        same = (
            last is not None
            and last["verdict"] == verdict
            and abs(key - last["loss"]) <= material * abs(last["loss"])
        )
        if same:
            return False
        self._given[advice.kind] = {"step": advice.step, "loss": key, "verdict": verdict}
        return True

    def _forget(self, kind: str, probability: float) -> None:
        if probability < self.confidence - _HYSTERESIS:
            self._given.pop(kind, None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-safe state: the advice already given (so a resumed run does not repeat it)."""
        return {"version": STATE_VERSION, "given": {k: dict(v) for k, v in self._given.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (not modified)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state has version {state.get('version')!r}, expected {STATE_VERSION}."
            )
        given = state.get("given", {})
        unknown = sorted(set(given) - set(ADVICE_KINDS))
        if unknown:
            raise ValueError(f"state names unknown advice kinds {unknown}.")
        self._given = {k: dict(v) for k, v in given.items()}

    def __repr__(self) -> str:
        return (
            f"Advisor(target_loss={self.target_loss!r}, reference_loss={self.reference_loss!r}, "
            f"min_improvement={self.min_improvement!r}, confidence={self.confidence!r})"
        )


def _forecast_evidence(f: Forecast) -> dict[str, float | int]:
    return {
        "forecast_loss": f.loss,
        "low": f.low,
        "high": f.high,
        "coverage": f.coverage,
        "target_step": f.step,
    }


def _number(value: object) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _positive(value: object) -> bool:
    return _number(value) and value > 0
