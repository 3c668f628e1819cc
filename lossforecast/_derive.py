"""Derive priors and interval calibration from finished runs (the shipped ones, or a user's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from ._backtest import backtest_run
from ._fit import fit_law
from ._forecaster import _bin_noise, _initial_starts
from ._laws import LAWS, LawInputs
from ._observations import Binned, Observations
from ._priors import Calibration, LawPrior, Priors
from ._schedule import Schedule

__all__ = ["derive_priors", "FinishedRun", "CALIBRATION_CUTOFFS", "HYPERPRIORS"]

#: Broad starting priors, set by hand from the laws' papers, that derivation starts from.
HYPERPRIORS = {
    "multi-power": LawPrior(
        mean={"alpha": 0.47, "log_amp": 1.8, "log_C": -5.0, "beta": 0.7, "gamma": 0.8},
        std={"alpha": 0.15, "log_amp": 0.4, "log_C": 1.5, "beta": 0.6, "gamma": 0.4},
        l0_ratio=((0.0, 0.9, 0.06),),
    ),
    "lr-annealing": LawPrior(
        mean={"alpha": 0.47, "log_amp": -4.5, "log_tau": 6.0},
        std={"alpha": 0.15, "log_amp": 1.0, "log_tau": 1.0},
        l0_ratio=((0.0, 0.9, 0.06),),
    ),
}

#: Fractions of training at which backtests measure the forecast error for calibration.
CALIBRATION_CUTOFFS = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85, 0.9, 0.95)
_PROGRESS_KNOTS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)
_LEVELS = (0.5, 0.8, 0.9, 0.95)
#: Floor of the model-error scale: a final loss is itself known only to about 0.1% (the
#: smoothing or averaging behind it), so no backtest can vouch for a tighter interval, and
#: the in-sample backtests behind the late knots are optimistic about a new source.
MIN_REL_STD = 2e-3
#: Least prior std of the power law's exponent and of ``L0`` (as a ratio to the lowest loss
#: seen). These are what a run's own points pin down first, and what transfers worst between
#: sources (one source's runs have an exponent of 0.77-0.81, the other two sources' runs
#: 0.36-0.62; ``L0`` over the lowest loss seen so far depends on the run's length), so priors
#: learned from other runs only keep them plausible. The annealing parameters keep their
#: learned std: before a decay the data cannot tell them at all. Set by the
#: leave-one-source-out accuracy benchmark.
MIN_ALPHA_STD = 0.35
MIN_L0_RATIO_STD = 0.15
#: Knots of the ``L0`` table in ``log S1`` (the LR area seen, in the optimizer's units) and
#: how far from a knot a run's ratio still counts towards it: enough for LRs of 1e-4 to 1e-2
#: over 1e3 to 1e6 steps; a knot with fewer than three ratios near it is left out. A tenth of
#: a short run is not as far along its power law as a tenth of a long one, and its lowest
#: loss is further above ``L0``. Keyed by the share of training seen instead, the
#: leave-one-source-out accuracy benchmark's median error at 10% was 2.66% (1.93% on the
#: plain fit's 28 runs, 90th percentile 9.92%), against 2.09% (1.45%, 7.79%); at 25/50/75%
#: 0.37/0.23/0.11% against 0.39/0.24/0.12%.
_L0_KNOTS = tuple(float(k) for k in np.arange(-6.0, 10.01, 0.5))
_L0_KNOT_WIDTH = 0.5
_MIN_PRIOR_STD = {"alpha": MIN_ALPHA_STD}
#: Standard deviation of the annealing drop still to come, as a share of it, per law: how
#: far the law's shape misses the drop of a schedule, which a fit to one run's prefix cannot
#: see. Measured by ``scripts/measure_drop_share.py``: each law fitted jointly to all runs of
#: one model and peak LR misses their final losses by an RMS share of its drop of 0.056 (the
#: Multi-Power Law; 0.062, 0.070 and 0.037 in the three shared sources, up to 0.55% of
#: the loss) and 0.074 (the LR-annealing law; 0.084, 0.103, 0.034).
DROP_SHARE = {"multi-power": 0.06, "lr-annealing": 0.07}
#: Forecaster intervals from the fit and the law's shape alone (no model-error scale), for
#: the backtests that set that scale.
_UNCALIBRATED = {
    name: Calibration((0.0, 1.0), (1e-12, 1e-12), (0.8,), (float(norm.ppf(0.9)),), DROP_SHARE[name])
    for name in LAWS
}


class FinishedRun(Protocol):
    """What a finished run must provide: its curve, planned schedule and final loss.

    A ``source`` attribute (the lab, codebase or dataset it came from) is optional; where
    runs have one, every source counts equally, however many runs it brought.
    """

    steps: NDArray[np.int64]
    loss: NDArray[np.float64]
    lr_schedule: NDArray[np.float64]
    final_step: int
    final_loss: float


@dataclass(frozen=True)
class _Backtest:
    progress: float
    rel_error: float
    rel_fit_std: float
    weight: float


def _source_weights(runs: Sequence[FinishedRun]) -> list[float]:
    """Weight of each run so that every source sums to one."""
    sources = [getattr(r, "source", None) for r in runs]
    return [1.0 / sources.count(src) for src in sources]


def _balanced(values: NDArray[np.float64], groups: list) -> tuple[float, float]:
    """Centre and spread of values that come in groups (sources), each group counting once.

    The centre is the mean of the group medians; the spread combines the typical
    within-group robust spread with the spread between group medians.
    """
    labels = list(dict.fromkeys(groups))
    medians, spreads = [], []
    for g in labels:
        v = values[[x == g for x in groups]]
        med = float(np.median(v))
        medians.append(med)
        spreads.append(1.4826 * float(np.median(np.abs(v - med))))
    between = float(np.std(medians, ddof=1)) if len(medians) > 1 else 0.0
    return float(np.mean(medians)), float(np.hypot(np.mean(spreads), between))


def derive_priors(
    runs: Sequence[FinishedRun], *, base: Priors | None = None, provenance: str = ""
) -> Priors:
    """Priors and calibration learned from finished runs.

    1. Each run's whole curve is fitted under a weak version of ``base`` (by default the
       fixed, hand-set :data:`HYPERPRIORS`, so the result depends on the runs alone); the
       prior mean of each shape parameter is the mean over sources of their median, its std
       combines the spread within and between sources (inflated by a quarter, floored; the
       power law's exponent at :data:`MIN_ALPHA_STD`).
    2. ``L0`` is described relative to the lowest loss seen at each cutoff, as a function
       of the LR area seen by then (its std floored at :data:`MIN_L0_RATIO_STD`).
    3. Forecasts are backtested on every run at :data:`CALIBRATION_CUTOFFS`; at each level
       of progress the model-error scale is set so that 80% intervals cover 80% of them.
    4. Where the runs come from two or more sources, the early knots (progress up to
       :data:`PRIOR_DOMINATED`), where a forecast rests mostly on the priors, are also
       calibrated on each source forecast under priors from the other sources only, and
       take the wider of the two scales: how well priors transfer to a new source is what
       an in-sample backtest cannot see.
    """
    if len(runs) < 2:
        raise ValueError(f"deriving priors needs at least 2 runs, got {len(runs)}.")
    base_laws = base.laws if base is not None else HYPERPRIORS
    fits = {name: [_run_fit(name, r, base_laws[name]) for r in runs] for name in LAWS}
    laws = {name: _aggregate([f for f in fits[name] if f], base_laws[name]) for name in LAWS}
    # Calibrated in-sample: forecasts under these very priors; only the early knots are
    # widened from held-out sources below. (Calibrating every knot on sources held
    # out of the priors, alone or pooled with these, made the 80% intervals cover 88-96% in
    # the leave-one-source-out benchmark: with two sources left, a held-out one leaves
    # priors far weaker than the ones being calibrated.)
    fitted = Priors(laws, _UNCALIBRATED, provenance)
    weights = _source_weights(runs)
    calibration = {
        name: _calibrate(
            name,
            [
                t
                for run, w in zip(runs, weights, strict=True)
                for t in _backtests(name, run, fitted, w, CALIBRATION_CUTOFFS)
            ],
        )
        for name in LAWS
    }
    sources = [getattr(r, "source", None) for r in runs]
    if None not in sources and len(set(sources)) > 1:
        calibration = {
            name: _widen_early(cal, _held_out_backtests(name, runs, fits[name], base_laws[name]))
            for name, cal in calibration.items()
        }
    return Priors(laws, calibration, provenance, {"n_runs": len(runs)})


#: Progress up to which a forecast rests mostly on the priors (its calibration knots are
#: checked against sources held out of the priors).
PRIOR_DOMINATED = 0.1
_HELD_OUT_CUTOFFS = (0.05, 0.1, 0.15, 0.25)


def _held_out_backtests(
    name: str, runs: Sequence[FinishedRun], fits: list, base: LawPrior
) -> list[_Backtest]:
    """Backtests of each source's runs under priors learned from the other sources."""
    sources = [r.source for r in runs]
    weights = _source_weights(runs)
    tests = []
    for held in dict.fromkeys(sources):
        others = [f for f, src in zip(fits, sources, strict=True) if f and src != held]
        if not others:
            continue
        priors = Priors({name: _aggregate(others, base)}, _UNCALIBRATED)
        for run, w in zip(runs, weights, strict=True):
            if run.source == held:
                tests += _backtests(name, run, priors, w, _HELD_OUT_CUTOFFS)
    return tests


def _widen_early(cal: Calibration, held_out: list[_Backtest]) -> Calibration:
    """``cal`` with each knot up to :data:`PRIOR_DOMINATED` at least as wide as the held-out
    backtests need for 80% coverage under ``cal``'s own 80% multiplier."""
    if not held_out:
        return cal
    wide = dict(zip(*_scales(held_out, cal.z(0.8)), strict=True))
    scales = _non_increasing(
        [
            max(v, wide.get(k, v)) if k <= PRIOR_DOMINATED else v
            for k, v in zip(cal.progress, cal.rel_std, strict=True)
        ]
    )
    return Calibration(cal.progress, tuple(scales), cal.levels, cal.z_table, cal.drop_share)


def whole_curve(run: FinishedRun, schedule: Schedule) -> Binned:
    """A finished run's points after warmup up to its final step, binned like a forecaster's."""
    obs = Observations(128)
    keep = (run.steps > schedule.warmup_steps) & (run.steps <= run.final_step)
    for s, y in zip(run.steps[keep], run.loss[keep], strict=False):
        obs.add(int(s), float(y))
    return obs.binned()


def _full_fit(name: str, run: FinishedRun, prior: LawPrior):
    """Fit the law to a run's whole curve after warmup under a weakened prior."""
    law = LAWS[name]()
    schedule = Schedule(run.lr_schedule)
    binned = whole_curve(run, schedule)
    min_loss = float(binned.loss.min())
    weak = LawPrior(
        prior.mean,
        {k: 3.0 * v for k, v in prior.std.items()},
        tuple((p, m, 1.0) for p, m, _ in prior.l0_ratio),
    )
    gp = weak.for_run(min_loss, schedule.peak_lr)
    x = LawInputs.at(schedule, binned.step)
    sigma = _bin_noise(binned.point_noise, binned.count, min_loss)
    starts = _initial_starts(law, gp, binned.step, binned.loss, schedule)
    result = fit_law(law, x, binned.loss, sigma, starts, prior=gp)
    return law, schedule, result


@dataclass(frozen=True)
class _RunFit:
    """What one run's whole-curve fit contributes to the priors."""

    source: object
    theta: dict[str, float]
    l0_ratio: tuple[float, ...]  # L0 / lowest loss seen, at each calibration cutoff
    l0_log_area: tuple[float, ...]  # ... and the log of the LR area seen by then


def _run_fit(name: str, run: FinishedRun, base: LawPrior) -> _RunFit | None:
    return _summarise_fit(run, _full_fit(name, run, base), base)


def _summarise_fit(run: FinishedRun, fitted, base: LawPrior) -> _RunFit | None:
    """What a whole-curve fit (``_full_fit``'s result) contributes; None if it failed."""
    law, schedule, result = fitted
    if not result.success:
        return None
    theta = dict(zip(law.params, result.params, strict=True))
    theta["log_amp"] -= base.amp_lr_exponent * np.log(schedule.peak_lr)
    ratios, log_area = [], []
    for cut in CALIBRATION_CUTOFFS:
        seen = (run.steps > schedule.warmup_steps) & (run.steps <= cut * schedule.total_steps)
        if seen.any():
            ratios.append(theta["L0"] / float(run.loss[seen].min()))
            log_area.append(float(np.log(schedule.lr_area(int(run.steps[seen][-1])))))
    return _RunFit(getattr(run, "source", None), theta, tuple(ratios), tuple(log_area))


def _aggregate(fits: list[_RunFit], base: LawPrior) -> LawPrior:
    """The prior that a set of run fits supports, every source counting once."""
    groups = [f.source for f in fits]
    # A run whose LR never falls keeps its annealing parameters at the starting prior, which
    # its fit cannot move; averaging it in shrinks the learned means toward that prior, and
    # leaving such runs out made every cut-off of the leave-one-source-out accuracy
    # benchmark worse (an ad-hoc rerun: median error 2.95/0.43/0.30/0.15/0.06% at
    # 10/25/50/75/90%, against 2.65/0.37/0.24/0.11/0.05% with them). Annealing priors three
    # times as wide let fits from inside a cooldown follow it (90th-percentile error at the
    # 90% cut-off 0.30% -> 0.19-0.22%) but let them run away earlier in a decay (median at
    # 50% 0.24% -> 0.30-0.35%; ad-hoc reruns widening all four annealing parameters, log_amp,
    # the three shape parameters or gamma alone).
    # (These reruns, and those below, were made with the L0 table keyed by the share of
    # training seen, before it was keyed by the LR area.)
    # The shape parameters (log_C, beta, gamma) depend on the schedules they are fitted to:
    # cosine runs' whole-curve fits put gamma at its bound of 1.5 in 10 of 16 runs, WSD runs'
    # sit near 0.8, and log_C falls about 1.25 per unit of log area after the decreases
    # within each of the two large sources. Ad-hoc reruns (leave-one-source-out, median
    # error at 25/50/75%, shipped 0.37/0.23/0.11%): shape priors regressed on that horizon
    # 0.49/0.30/0.11% (cosine and WSD at 50% better, 0.48/0.45 -> 0.31/0.31%; step runs
    # worse, 0.19 -> 0.70%); fits with a shape parameter at a bound left out 1.21/0.58/0.21%;
    # a gamma bound of 3 in the fits behind the priors 0.51/0.33/0.10% (cosine at 75% 0.17
    # -> 0.07%, WSD at 50% 0.45 -> 0.66%); shape priors from joint fits of all runs of one
    # model 0.67/0.44/0.18%; shape priors from the runs with a WSD or step decay only (std
    # kept at least as wide as from all runs) 0.38/0.29/0.11%, with the 90th percentile at
    # 25/75/90% 2.46/0.82/0.30% -> 1.93/0.49/0.14% (WSD better at every cut-off, 0.18 ->
    # 0.08% at 90%; cosine worse at 25/50%, 0.33/0.48 -> 0.40/0.54%, and 80% coverage at 90%
    # 0.96). benchmarks/accuracy_unseen_family.md measures what a new schedule family costs.
    # With the L0 table keyed by the LR area, ad-hoc reruns of annealing priors chosen by the
    # planned schedule: for schedules whose LR falls within 30% of training (WSD, step,
    # two-stage; cosine's decay spans 54-59%) all four annealing parameters from such runs'
    # fits only (std kept at least as wide as from all runs), other schedules as shipped.
    # Leave-one-source-out median error 1.95/0.39/0.24/0.12/0.05% (shipped
    # 2.09/0.39/0.24/0.12/0.05%), 90th percentile 8.10/2.12/0.88/0.45/0.17% (7.79/2.30/0.90/
    # 0.82/0.30%), but 80% coverage at 90% 0.86; and with the family held out too (a WSD run's
    # priors from step and two-stage runs only) WSD's median at 25/50/75% went
    # 0.57/0.54/0.52% -> 2.15/1.77/1.72%: priors from one abrupt shape do not carry to
    # another. The three shape parameters alone from such runs: median at 75% 0.16%.
    # Cosine-like schedules' priors from cosine runs only: 3.05/0.64/0.34/0.17/0.05%.
    mean, std = {}, {}
    for p in base.mean:
        centre, spread = _balanced(np.array([f.theta[p] for f in fits]), groups)
        mean[p] = centre
        std[p] = max(1.25 * spread, 0.5 * base.std[p], _MIN_PRIOR_STD.get(p, 0.0))
    ratio = np.array([r for f in fits for r in f.l0_ratio])
    log_area = np.array([a for f in fits for a in f.l0_log_area])
    l0_groups = [f.source for f in fits for _ in f.l0_ratio]
    return LawPrior(mean, std, _l0_table(ratio, log_area, l0_groups), base.amp_lr_exponent)


def _l0_table(ratio, log_area, groups) -> tuple[tuple[float, float, float], ...]:
    """``(log S1, mean, std)`` of ``L0 / lowest loss seen`` around each knot of ``log S1``."""
    rows = []
    for k in _L0_KNOTS:
        near = np.abs(log_area - k) <= _L0_KNOT_WIDTH
        if near.sum() < 3:
            continue
        centre, spread = _balanced(ratio[near], [g for g, n in zip(groups, near, strict=True) if n])
        rows.append((k, centre, max(1.25 * spread, MIN_L0_RATIO_STD)))
    return tuple(rows)


def _backtests(
    name: str, run: FinishedRun, priors: Priors, weight: float, cutoffs: Sequence[float]
) -> list[_Backtest]:
    """Forecasts of one run's final loss from each of ``cutoffs``."""
    schedule = Schedule(run.lr_schedule)
    points = backtest_run(run, schedule, cutoffs=cutoffs, law=name, priors=priors)
    z = float(norm.ppf(0.9))
    return [
        _Backtest(
            float(schedule.area[p.forecast.observed_step] / schedule.area[-1]),
            p.rel_error,
            (p.forecast.high - p.forecast.loss) / z / p.forecast.loss,
            weight,
        )
        for p in points
        if p.forecast is not None
    ]


def _calibrate(name: str, tests: list[_Backtest]) -> Calibration:
    """Model-error scale per progress knot so that 80% intervals cover 80% of backtests.

    Then the quantiles of the standardised errors give the interval multiplier at each
    coverage level, since real forecast errors have heavier tails than a Gaussian.
    """
    knots, scales = _scales(tests, float(norm.ppf(0.9)))
    p, e, s, weight = _columns(tests)
    scale_at = np.exp(np.interp(p, knots, np.log(scales)))
    u = e / np.sqrt(s**2 + scale_at**2)
    z_table = tuple(float(_weighted_quantile(u, weight, q)) for q in _LEVELS)
    return Calibration(
        tuple(knots), tuple(float(v) for v in scales), _LEVELS, z_table, DROP_SHARE[name]
    )


def _scales(tests: list[_Backtest], z: float) -> tuple[list[float], list[float]]:
    """Knots and the non-increasing model-error scale at each, for which ``z`` times the
    combined standard deviation covers 80% of the (weighted) backtests near the knot."""
    p, e, s, weight = _columns(tests)
    knots, scales = [], []
    for k in _PROGRESS_KNOTS:
        # Backtests near the knot, weighted by distance in progress (triangular kernel).
        w = weight * np.maximum(0.0, 1.0 - np.abs(p - k) / 0.15)
        if np.count_nonzero(w) < 3:
            continue
        lo, hi = MIN_REL_STD, 0.5
        for _ in range(60):  # bisection on the model-error scale for weighted 80% coverage
            mid = np.sqrt(lo * hi)
            covered = e <= z * np.sqrt(s**2 + mid**2)
            if np.sum(w * covered) / w.sum() >= 0.8:
                hi = mid
            else:
                lo = mid
        knots.append(k)
        scales.append(hi)
    return knots, _non_increasing(scales)


def _columns(tests: list[_Backtest]) -> tuple[NDArray[np.float64], ...]:
    """Progress, |relative error|, relative fit std and weight of backtests, as arrays."""
    return (
        np.array([t.progress for t in tests]),
        np.abs([t.rel_error for t in tests]),
        np.array([t.rel_fit_std for t in tests]),
        np.array([t.weight for t in tests]),
    )


def _non_increasing(scales: Sequence[float]) -> list[float]:
    """Errors shrink as training proceeds: each knot's scale at least that of later ones."""
    return [float(v) for v in np.maximum.accumulate(np.asarray(scales)[::-1])[::-1]]


def _weighted_quantile(
    values: NDArray[np.float64], weights: NDArray[np.float64], q: float
) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])
