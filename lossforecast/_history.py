"""Learn from the user's own past runs: a summary per finished run, and priors sharpened by them.

A finished run leaves a small JSON file (:func:`write_run_summary`) with its schedule's
shape, the law parameters fitted on its whole curve in units that transfer between runs,
its final loss and the labels the user gave (model, dataset, ...). A new run reads the
folder (:func:`load_history`) and narrows the shipped priors towards what similar past runs
found (:func:`history_priors`) before its own data can tell.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._derive import _L0_KNOT_WIDTH, _L0_KNOTS, _run_fit
from ._forecaster import Forecaster
from ._laws import LAWS, LawInputs
from ._observations import Observations
from ._priors import LawPrior, Priors
from ._schedule import Schedule

__all__ = [
    "RunSummary",
    "ScheduleShape",
    "write_run_summary",
    "load_history",
    "history_priors",
    "history_dir_from_env",
    "HISTORY_ENV",
    "SUMMARY_KIND",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the default history folder.
HISTORY_ENV = "LOSSFORECAST_HISTORY"
#: The ``kind`` every summary file carries, so foreign JSON files are told apart.
SUMMARY_KIND = "lossforecast-run-summary"
#: 2: ``l0_ratio`` is keyed by the log of the LR area seen (1: by the share of it).
SUMMARY_VERSION = 2
#: Parameters of the power-law part, identified by any run; the others (the annealing
#: term) only by runs whose LR decreases.
_POWER_PARAMS = ("L0", "log_A", "alpha")
#: Parameters that are not the shape of the annealing term.
_NOT_SHAPE = (*_POWER_PARAMS, "log_amp")
#: Shape parameters a history sharpens (besides the ``L0`` table).
_TRANSFERRED = ("alpha",)
#: Points of the coarse relative-LR curve kept in a summary.
LR_CURVE_POINTS = 32

#: Pseudo-observations behind the guess of how much the user's runs differ from each other.
_SPREAD_DOF = 2.0
#: That guess, as a share of the shipped prior's std (which also holds between-source spread).
_SPREAD_SHARE = 0.5
#: A history never narrows a prior below this share of the shipped std.
_STD_FLOOR_SHARE = 0.2
#: Weight of a past run per label that differs from the new run's.
_LABEL_MISMATCH_WEIGHT = 0.05


@dataclass(frozen=True)
class ScheduleShape:
    """The shape of a planned LR schedule, as far as transferring between runs needs it.

    Attributes
    ----------
    total_steps : int
        Planned optimizer steps.
    peak_lr : float
        Largest planned LR.
    warmup_steps : int
        Steps before the peak.
    final_lr_ratio : float
        Last planned LR relative to the peak.
    decay_start : float
        Share of the steps after which the LR first falls below 99% of the peak
        (1.0 for a constant schedule).
    lr_curve : tuple of float
        Relative LR at :data:`LR_CURVE_POINTS` evenly spaced shares of the run.
    """

    total_steps: int
    peak_lr: float
    warmup_steps: int
    final_lr_ratio: float
    decay_start: float
    lr_curve: tuple[float, ...]

    @classmethod
    def of(cls, schedule: Schedule) -> ScheduleShape:
        """The shape of ``schedule``."""
        rel = schedule.relative_lr
        T = schedule.total_steps
        after = np.flatnonzero(rel[schedule.warmup_steps :] < 0.99)
        decay = (schedule.warmup_steps + int(after[0])) / T if after.size else 1.0
        idx = np.minimum(np.round(np.linspace(0, T - 1, LR_CURVE_POINTS)).astype(int), T - 1)
        return cls(
            total_steps=T,
            peak_lr=float(schedule.peak_lr),
            warmup_steps=int(schedule.warmup_steps),
            final_lr_ratio=float(rel[-1]),
            decay_start=float(decay),
            lr_curve=tuple(round(float(v), 5) for v in rel[idx]),
        )

    def distance(self, other: ScheduleShape) -> float:
        """Distance between the relative LR curves (as shares of the run): their
        root-mean-square difference, a quarter of the peak LR being one unit."""
        a, b = np.asarray(self.lr_curve), np.asarray(other.lr_curve)
        return float(np.sqrt(np.mean((a - b) ** 2))) / 0.25 if a.shape == b.shape else 1.0


@dataclass(frozen=True)
class RunSummary:
    """A finished run, as read back from its summary file.

    Attributes
    ----------
    path : Path
        The file it was read from.
    run_name : str or None
        Name given when it was written.
    law : str
        Law whose parameters ``params`` holds.
    final_loss : float
        The loss the run reached.
    final_step : int
        Last observed step.
    params : dict of str to float
        Fitted law parameters in units that transfer between runs: the shape parameters
        as fitted, ``log_amp`` for a peak LR of 1 (shifted by ``amp_lr_exponent *
        log(peak_lr)``), and ``L0`` in loss units (see ``l0_ratio`` for its transferable form).
    l0_ratio : tuple of (float, float)
        ``(log S1, L0 / lowest loss seen by then)``, ``S1`` the LR area seen (the sum of the
        LR over the steps, in the optimizer's units), as the priors' ``L0`` table is keyed.
    schedule : ScheduleShape
        Shape of the planned schedule.
    cooldown_log_amp : float or None
        The drop the run's cooldown brought, as ``log_amp`` (for a peak LR of 1) with the
        other annealing parameters at the means in ``cooldown_shape``; None if the LR never
        fell.
    cooldown_shape : dict of str to float
        Those means (the writing forecaster's prior).
    labels : dict of str to str
        Labels the user gave (model, dataset, ...).
    created : str
        ISO 8601 UTC time the summary was written.
    """

    path: Path
    run_name: str | None
    law: str
    final_loss: float
    final_step: int
    params: dict[str, float]
    l0_ratio: tuple[tuple[float, float], ...]
    schedule: ScheduleShape
    cooldown_log_amp: float | None
    cooldown_shape: dict[str, float]
    labels: dict[str, str]
    created: str


# ---------------------------------------------------------------------------- writing
def write_run_summary(
    history_dir: str | os.PathLike,
    forecaster: Forecaster,
    *,
    final_loss: float,
    labels: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> Path:
    """Write the summary of a finished run into ``history_dir`` and return its path.

    The curve the forecaster observed (its bins, from :meth:`Forecaster.state_dict`) is
    fitted once more as a whole, after warmup, under the forecaster's priors widened
    threefold: the fit ``derive_priors`` makes of finished runs, so the summary is in the
    units of the priors it will sharpen. (The forecaster's live fit skips the first third
    of the steps to forecast well; for learning the run's parameters that was worse in the
    history benchmark.) Stored: the power-law parameters, ``L0`` relative to the lowest
    loss seen at each level of LR area, and the drop the cooldown brought as an amplitude
    (see :class:`RunSummary`). The file is written to a temporary name and renamed, so a
    reader never sees half a summary; its name (``<run_name>-<UTC time>-<random>.json``)
    never collides with another run's.

    Parameters
    ----------
    history_dir : str or path-like
        Folder of summaries; created if missing.
    forecaster : Forecaster
        The run's forecaster, fed with the run's losses.
    final_loss : float
        The loss the run reached (e.g. a smoothed last training loss or a validation loss
        on the same scale as the losses fed to the forecaster).
    labels : mapping of str to str, optional
        What the run was, e.g. ``{"model": "gpt-125m", "dataset": "owt2"}``; runs with the
        same labels count most when a later run learns from the history.
    run_name : str, optional
        Shown in the file name (made safe) and stored.

    Returns
    -------
    Path
        The summary file.

    Raises
    ------
    ValueError
        If ``final_loss`` is not a positive finite number, a label is not a string, or the
        curve cannot be fitted (fewer than 4 bins after warmup, or the fit failed).
    OSError
        If the folder cannot be created or written.
    """
    loss = float(final_loss)
    if not (math.isfinite(loss) and loss > 0):
        raise ValueError(f"`final_loss` must be a positive finite number, got {final_loss!r}.")
    clean_labels = _check_labels(labels)
    if run_name is not None and not isinstance(run_name, str):
        raise ValueError(f"`run_name` must be a string, got {run_name!r}.")
    state = forecaster.state_dict()
    law_name = state["law"]
    schedule = forecaster.schedule
    binned = Observations.from_state_dict(state["observations"]).binned()
    last = forecaster.last_step
    fit = None
    if last is not None and np.count_nonzero(binned.step > schedule.warmup_steps) >= 4:
        run = _BinnedRun(binned.step, binned.loss, schedule.lr, int(last), loss)
        fit = _run_fit(law_name, run, forecaster.priors.laws[law_name])
    if fit is None:
        raise ValueError(
            "the run's curve could not be fitted (too few points after warmup, or the fit "
            "failed), so there is nothing to learn from it."
        )
    law_prior = forecaster.priors.laws[law_name]
    params = {k: float(v) for k, v in fit.theta.items()}
    cooldown = {}
    if _has_annealing(schedule):
        cooldown = _cooldown(law_name, params, law_prior, schedule, int(last))
    else:  # no LR decrease: the annealing term is unidentified
        params = {k: v for k, v in params.items() if k in _POWER_PARAMS}
    l0_ratio = [[float(a), float(r)] for a, r in zip(fit.l0_log_area, fit.l0_ratio, strict=True)]
    doc = {
        "kind": SUMMARY_KIND,
        "version": SUMMARY_VERSION,
        "run_name": run_name,
        "law": law_name,
        "final_loss": loss,
        "final_step": int(last),
        "params": params,
        "amp_lr_exponent": law_prior.amp_lr_exponent,
        "cooldown": cooldown,
        "l0_ratio": l0_ratio,
        "schedule": _shape_to_dict(ScheduleShape.of(schedule)),
        "labels": clean_labels,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    folder = Path(history_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = folder / f"{_safe_name(run_name)}-{stamp}-{uuid.uuid4().hex[:8]}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("lossforecast: run summary written to %s", path)
    return path


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError(f"`labels` must be a mapping of str to str, got {labels!r}.")
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"`labels` must map str to str, got {k!r}: {v!r}.")
    return dict(labels)


def _safe_name(name: str | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip(".-")[:64]
    return safe or "run"


@dataclass(frozen=True, eq=False)
class _BinnedRun:
    """A finished run as its forecaster saw it (bin means), in the form ``_run_fit`` reads."""

    steps: NDArray[np.int64]
    loss: NDArray[np.float64]
    lr_schedule: NDArray[np.float64]
    final_step: int
    final_loss: float


def _cooldown(
    law_name: str, params: dict[str, float], prior: LawPrior, schedule: Schedule, last: int
) -> dict:
    """The drop the fitted annealing term brought by ``last``, as an amplitude for the prior's
    shape: ``log_amp`` (for a peak LR of 1) that gives the same drop with the other
    annealing parameters at the prior's means, which are stored with it.

    The annealing parameters are strongly correlated, so averaging past runs' values gives
    no typical cooldown; the drop itself, carried in one number, does transfer.
    """
    law = LAWS[law_name]()
    x = LawInputs.at(schedule, np.array([last]))
    shift = prior.amp_lr_exponent * math.log(schedule.peak_lr)
    fitted = np.array([params[p] + (shift if p == "log_amp" else 0.0) for p in law.params])
    at_prior = np.array(
        [
            fitted[i] if p in _POWER_PARAMS else prior.mean.get(p, 0.0)
            for i, p in enumerate(law.params)
        ]
    )
    at_prior[law.params.index("log_amp")] = 0.0
    off = fitted.copy()
    off[law.params.index("log_amp")] = -50.0  # no annealing term
    drop = float(law.predict(off, x)[0] - law.predict(fitted, x)[0])
    unit = float(law.predict(off, x)[0] - law.predict(at_prior, x)[0])
    if not (drop > 0 and unit > 0):
        return {}
    shape = {p: float(prior.mean[p]) for p in law.params if p in prior.mean and p not in _NOT_SHAPE}
    return {"log_amp": math.log(drop / unit) - shift, "prior_shape": shape}


def _has_annealing(schedule: Schedule) -> bool:
    """Whether the LR falls after warmup by more than 5% of the peak."""
    return float(np.sum(schedule.decrements.drop)) > 0.05


def _shape_to_dict(shape: ScheduleShape) -> dict:
    return {
        "total_steps": shape.total_steps,
        "peak_lr": shape.peak_lr,
        "warmup_steps": shape.warmup_steps,
        "final_lr_ratio": shape.final_lr_ratio,
        "decay_start": shape.decay_start,
        "lr_curve": list(shape.lr_curve),
    }


# ---------------------------------------------------------------------------- reading
def history_dir_from_env() -> Path | None:
    """The folder named by ``LOSSFORECAST_HISTORY`` (``~`` expanded), or None if unset/empty."""
    value = os.environ.get(HISTORY_ENV, "").strip()
    return Path(value).expanduser() if value else None


def load_history(history_dir: str | os.PathLike | None) -> list[RunSummary]:
    """The run summaries in ``history_dir``, oldest first; never raises for bad files.

    Every ``*.json`` file is read; files that are not valid JSON, are JSON of another kind,
    or lack a field (e.g. written by hand or cut short) are skipped, and one log message
    says how many. A missing folder (or ``None``) gives an empty list.
    """
    if history_dir is None:
        return []
    folder = Path(history_dir)
    try:
        files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
    except OSError as exc:
        logger.warning(
            "lossforecast: history folder %s cannot be read (%s); ignoring it.", folder, exc
        )
        return []
    if not folder.is_dir():
        return []
    summaries, skipped = [], []
    for path in files:
        try:
            summaries.append(_parse(path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            skipped.append(path.name)
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        logger.warning(
            "lossforecast: skipped %d of %d files in %s that are not run summaries (%s).",
            len(skipped),
            len(files),
            folder,
            shown,
        )
    summaries.sort(key=lambda s: (s.created, s.path.name))
    return summaries


def _parse(path: Path, doc) -> RunSummary:
    """A summary from a parsed file; ValueError/KeyError/TypeError if it is not one."""
    if not isinstance(doc, dict) or doc.get("kind") != SUMMARY_KIND:
        raise ValueError("not a run summary")
    if doc.get("version") != SUMMARY_VERSION:
        raise ValueError(f"unsupported version {doc.get('version')!r}")
    params = {str(k): _finite(v) for k, v in doc["params"].items()}
    if "L0" not in params:
        raise ValueError("no L0")
    s = doc["schedule"]
    shape = ScheduleShape(
        total_steps=int(s["total_steps"]),
        peak_lr=_finite(s["peak_lr"]),
        warmup_steps=int(s["warmup_steps"]),
        final_lr_ratio=_finite(s["final_lr_ratio"]),
        decay_start=_finite(s["decay_start"]),
        lr_curve=tuple(_finite(v) for v in s["lr_curve"]),
    )
    labels = doc.get("labels") or {}
    if not isinstance(labels, dict):
        raise TypeError("labels")
    name = doc.get("run_name")
    cooldown = doc.get("cooldown") or {}
    return RunSummary(
        path=path,
        run_name=None if name is None else str(name),
        law=str(doc["law"]),
        final_loss=_finite(doc["final_loss"]),
        final_step=int(doc["final_step"]),
        params=params,
        l0_ratio=tuple((_finite(p), _finite(r)) for p, r in doc["l0_ratio"]),
        schedule=shape,
        cooldown_log_amp=_finite(cooldown["log_amp"]) if cooldown else None,
        cooldown_shape={str(k): _finite(v) for k, v in cooldown.get("prior_shape", {}).items()},
        labels={str(k): str(v) for k, v in labels.items()},
        created=str(doc["created"]),
    )


def _finite(v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"not a finite number: {v!r}")
    return float(v)


# ---------------------------------------------------------------------------- learning
def history_priors(
    priors: Priors,
    summaries: Sequence[RunSummary],
    *,
    law: str,
    labels: Mapping[str, str] | None = None,
    schedule: ArrayLike | Schedule | None = None,
) -> Priors:
    """The priors of ``law`` narrowed towards what similar past runs found.

    Three things the past runs measured update the prior of the same quantity
    (Normal-Normal): ``L0 / lowest loss seen`` at each LR-area level of the ``L0``
    table, the exponent ``alpha``, and the cooldown's amplitude ``log_amp`` (the drop each
    run's cooldown brought, expressed for the prior's own annealing shape; runs whose LR
    never fell say nothing about it). The past runs' values are draws around the user's
    own typical value, which has the given prior as its prior. How far the user's runs
    differ from each other is estimated from the history, starting from half the given
    std (worth two runs), so one or two runs move the prior only part of the way. The new
    std is that spread plus the uncertainty of the typical value, never below a fifth of
    the given std and never above it. ``L0`` is compared at the same LR area, the key of
    the ``L0`` table, which is the same point of the power law whatever the runs' lengths.

    The other annealing parameters keep the given prior: they are strongly correlated, so
    an average of past runs' values is no typical cooldown, and carrying them over made
    forecasts worse in the history benchmark (``benchmarks/history.md``). The interval
    calibration is kept: the benchmark found the intervals as honest with a history.

    Past runs count by similarity: each of ``labels`` that a past run does not share
    divides its weight by 20 (so runs with the same labels come first), and with
    ``schedule`` given, a run whose LR curve differs by a quarter of the peak LR on
    average (root mean square) counts ``exp(-1/2)`` as much. Runs fitted with another law
    are ignored. The result does not depend on the order of ``summaries``.

    Parameters
    ----------
    priors : Priors
        The priors to start from (usually the shipped ones).
    summaries : sequence of RunSummary
        Past runs, e.g. from :func:`load_history`.
    law : {'multi-power', 'lr-annealing'}
        Law whose prior is narrowed.
    labels : mapping of str to str, optional
        The new run's labels.
    schedule : array_like or Schedule, optional
        The new run's planned LR schedule; recommended (see above).

    Returns
    -------
    Priors
        A copy of ``priors`` with the prior of ``law`` replaced (unchanged without usable
        past runs); the interval calibration is kept.
    """
    if law not in priors.laws:
        raise ValueError(f"`law` must be one of {sorted(priors.laws)}, got {law!r}.")
    wanted = _check_labels(labels)
    if schedule is not None and not isinstance(schedule, Schedule):
        schedule = Schedule(schedule)
    shape = ScheduleShape.of(schedule) if schedule is not None else None
    runs = sorted(
        (s for s in summaries if s.law == law),
        key=lambda s: (s.created, s.run_name or "", str(s.path)),
    )
    if not runs:
        return priors
    weights = np.array([_label_weight(s, wanted) * _shape_weight(s, shape) for s in runs])
    base = priors.laws[law]
    mean, std = dict(base.mean), dict(base.std)
    for p in base.mean:
        if p not in _TRANSFERRED:
            continue
        values = np.array([s.params.get(p, np.nan) for s in runs])
        mean[p], std[p] = _update(base.mean[p], base.std[p], values, weights)
    if "log_amp" in base.mean:
        values = np.array([_cooldown_amp(s, base) for s in runs])
        mean["log_amp"], std["log_amp"] = _update(
            base.mean["log_amp"], base.std["log_amp"], values, weights
        )
    rows = []
    for log_area in _l0_levels(base, runs):
        values = np.array([_ratio_at(s, log_area) for s in runs])
        rows.append((log_area, *_update(*base.l0_ratio_at(log_area), values, weights)))
    sharpened = LawPrior(mean, std, tuple(rows), base.amp_lr_exponent)
    return priors.with_law(law, sharpened)


def _label_weight(summary: RunSummary, labels: dict[str, str]) -> float:
    """Weight of a past run by its labels: divided by 20 per label it does not share."""
    w = 1.0
    for key, value in labels.items():
        if summary.labels.get(key) != value:
            w *= _LABEL_MISMATCH_WEIGHT
    return w


def _shape_weight(summary: RunSummary, shape: ScheduleShape | None) -> float:
    """Weight of a past run by how alike its LR curve is to the new run's (1 if unknown)."""
    if shape is None:
        return 1.0
    return math.exp(-0.5 * shape.distance(summary.schedule) ** 2)


def _cooldown_amp(summary: RunSummary, base: LawPrior) -> float:
    """A past run's cooldown amplitude if it was measured for this prior's shape, else NaN."""
    shape = summary.cooldown_shape
    if summary.cooldown_log_amp is None or not shape:
        return math.nan
    for p, v in base.mean.items():
        if p not in _NOT_SHAPE and not math.isclose(
            shape.get(p, math.nan), v, rel_tol=1e-9, abs_tol=1e-12
        ):
            return math.nan
    return summary.cooldown_log_amp


def _l0_levels(base: LawPrior, runs: Sequence[RunSummary]) -> list[float]:
    """Rows of the sharpened ``L0`` table: the prior's own, plus the knots of the derivation
    grid that the past runs reached beyond them (LRs on another scale than the priors')."""
    reached = [level for s in runs for level, _ in s.l0_ratio]
    keys = {k for k, _, _ in base.l0_ratio}
    if reached:
        keys |= {k for k in _L0_KNOTS if min(reached) <= k <= max(reached)}
    return sorted(keys)


def _ratio_at(summary: RunSummary, log_area: float) -> float:
    """A past run's ``L0 / lowest loss`` at the same LR area (``log S1``), where the power law
    stands at the same point whatever the runs' lengths; NaN outside what the run saw."""
    if not summary.l0_ratio:
        return math.nan
    levels, ratios = np.array(summary.l0_ratio).T
    if log_area < levels[0] - _L0_KNOT_WIDTH or log_area > levels[-1] + 1e-9:
        return math.nan
    return float(np.interp(log_area, levels, ratios))


def _update(
    m0: float, s0: float, values: NDArray[np.float64], weights: NDArray[np.float64]
) -> tuple[float, float]:
    """Normal-Normal update of ``N(m0, s0)`` by weighted draws: (mean, std) for a new run."""
    ok = np.isfinite(values) & (weights > 0)
    if not ok.any():
        return m0, s0
    x, w = values[ok], weights[ok]
    n_eff = w.sum() ** 2 / np.sum(w**2)  # Kish's effective number of runs
    w_norm = w / w.sum()
    centre = float(np.sum(w_norm * x))
    scatter = float(n_eff * np.sum(w_norm * (x - centre) ** 2))
    tau2 = ((_SPREAD_DOF * (_SPREAD_SHARE * s0) ** 2) + scatter) / (_SPREAD_DOF + n_eff - 1.0)
    # the user's typical value: the shipped prior updated by the n_eff runs' mean
    precision = 1.0 / s0**2 + n_eff / tau2
    typical = (m0 / s0**2 + n_eff * centre / tau2) / precision
    new_std = math.sqrt(1.0 / precision + tau2)
    return typical, float(np.clip(new_std, _STD_FLOOR_SHARE * s0, s0))
