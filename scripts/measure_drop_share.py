"""Measure how far a law's shape misses a cooldown: the source of ``DROP_SHARE``.

Run: ``python scripts/measure_drop_share.py [--data ../shared/data] [--law multi-power]``.
All runs of one model at one peak LR (one source) are fitted with one parameter set, so the
law must explain every schedule at once; each run's final-loss error is then read as a share
of the drop the law's annealing term gives at its final step. No fit to a run's own prefix
can see this error: it is the law's, not the data's. The printed source-balanced RMS share is
what ``lossforecast._derive.DROP_SHARE`` holds for the law.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from lossforecast import Priors, Schedule
from lossforecast._derive import whole_curve
from lossforecast._io import Run, load_runs
from lossforecast._laws import LAWS, Law, LawInputs

ROOT = Path(__file__).resolve().parent.parent
#: Runs whose law-predicted drop is below this share of the loss (constant LR) are not scored.
MIN_DROP = 0.005
#: Per law, the annealing shape parameter the data pin least, and the values it starts from.
_SHAPE_STARTS = {
    "multi-power": ("gamma", (0.3, 0.6, 1.0)),
    "lr-annealing": ("log_tau", tuple(np.log([100.0, 1e3, 1e4]))),
}


def _binned(run: Run, schedule: Schedule) -> tuple[LawInputs, np.ndarray]:
    b = whole_curve(run, schedule)
    return LawInputs.at(schedule, b.step), b.loss


def joint_fit(law: Law, runs: list[Run]) -> np.ndarray:
    """One parameter vector of ``law`` for all ``runs`` (robust, every run weighted alike)."""
    data = [_binned(r, Schedule(r.lr_schedule)) for r in runs]
    floor = min(float(y.min()) for _, y in data)
    lo, hi = (np.array(b) for b in zip(*law.bounds(floor), strict=True))
    prior = Priors.default().laws[law.name].for_run(floor, float(np.max(runs[0].lr_schedule)))

    def residuals(theta):
        return np.concatenate([(law.predict(theta, x) - y) / y / np.sqrt(y.size) for x, y in data])

    def jacobian(theta):
        return np.vstack(
            [law.predict_jac(theta, x)[1] / y[:, None] / np.sqrt(y.size) for x, y in data]
        )

    x0, y0 = data[0]
    shape, values = _SHAPE_STARTS[law.name]
    best = None
    for alpha in (0.3, 0.5, 0.8):  # multi-start over the two shape parameters the data pin least
        for value in values:
            start = np.array([prior.mean.get(p, 0.0) for p in law.params])
            start[:3] = 0.8 * floor, np.log(y0[0] - 0.8 * floor) + alpha * np.log(x0.area[0]), alpha
            start[law.params.index(shape)] = value
            fit = least_squares(
                residuals,
                np.clip(start, lo + 1e-6, hi - 1e-6),
                jac=jacobian,
                bounds=(lo, hi),
                loss="soft_l1",
                f_scale=2e-4,
                max_nfev=400,
            )
            if best is None or fit.cost < best.cost:
                best = fit
    return best.x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--law", choices=sorted(LAWS), default="multi-power")
    args = ap.parse_args(argv)
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in load_runs(args.data):
        groups[run.source, run.model, float(np.max(run.lr_schedule))].append(run)
    law = LAWS[args.law]()
    shares: dict[str, list[float]] = defaultdict(list)
    print("| run | schedule | final-loss error | law's drop | error / drop |")
    print("|---|---|---|---|---|")
    for (source, _, _), runs in groups.items():
        if len(runs) < 2:
            continue
        theta = joint_fit(law, runs)
        for run in runs:
            end = LawInputs.at(Schedule(run.lr_schedule), np.array([run.final_step]))
            error = float(law.predict(theta, end)[0]) - run.final_loss
            drop = float(law.annealing_drop(theta, end)[0])
            scored = drop > MIN_DROP * run.final_loss
            if scored:
                shares[source].append(error / drop)
            share = f"{error / drop:+.3f}" if scored else "-"
            print(
                f"| {run.name} | {run.schedule} | {100 * error / run.final_loss:+.2f}% "
                f"| {100 * drop / run.final_loss:.2f}% | {share} |"
            )
    print()
    rms = {s: float(np.sqrt(np.mean(np.square(v)))) for s, v in shares.items()}
    for source, value in rms.items():
        print(f"{source}: RMS error / drop {value:.3f} over {len(shares[source])} runs")
    print(f"source-balanced RMS error / drop: {np.mean(list(rms.values())):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
