"""Accuracy benchmark: forecast the final loss of every shared run from prefixes of it.

Protocol (issue "Core"): cutoffs at 10/25/50/75/90% of the planned steps, fit on the prefix
only, forecast the loss at the run's ``final_step`` and compare with its ``final_loss`` (a
cutoff at or past ``final_step`` has nothing left to forecast: no method answers there).
Leave-one-source-out: the priors and calibration used for a source's runs are derived
(``lossforecast._derive.derive_priors``) from the other sources' runs only, so the table
measures what a user with a new model, dataset and schedule gets. With ``--hold-out
source-and-family`` the priors for a source's runs of one schedule family also never saw that
family in any source: a new model and dataset trained with a schedule shape the priors do
not know. Baselines run under the same protocol, and so does an oracle that knows each
run's own annealing parameters (the size and shape of its drop) in advance: the targets it
misses, no better prior can meet. A fit of the law to each whole curve ("hindsight") shows
what the law itself misses with nothing left to forecast.

Run: ``python benchmarks/accuracy.py [--data ../shared/data] [--out benchmarks/accuracy.md]``
``python benchmarks/accuracy.py --hold-out source-and-family --laws multi-power``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import last_smoothed, plain_lr_annealing, power_law_in_steps

from lossforecast import Priors, Schedule
from lossforecast._backtest import backtest_run, prefix_length
from lossforecast._derive import HYPERPRIORS, _full_fit, _summarise_fit, derive_priors
from lossforecast._io import load_runs
from lossforecast._laws import LawInputs

CUTOFFS = (0.1, 0.25, 0.5, 0.75, 0.9)
TARGETS = {0.25: 0.004, 0.5: 0.0025, 0.75: 0.0015}
LEVELS = (0.5, 0.8, 0.95)
PLAIN = "plain LR-annealing fit"
BASELINES = ("last smoothed value", "power law in steps", PLAIN)
#: Not a forecaster: the Multi-Power Law with the priors of its annealing parameters pinned
#: at the run's own whole-curve fit, which no forecaster knows before the cooldown. Its
#: errors bound what better priors for the drop and its shape could reach.
ORACLE = "oracle: the run's own annealing parameters"
ORACLE_PINNED = ("log_amp", "log_C", "beta", "gamma")
ORACLE_STD = 0.02
#: Not a forecaster either: the Multi-Power Law fitted to the run's whole curve, the same
#: error at every cut-off. What the law misses with nothing left to forecast.
HINDSIGHT = "hindsight: the law fitted to the whole curve"
ROOT = Path(__file__).resolve().parent.parent


def family(schedule: str) -> str:
    """Group the index's schedule names into the families the table reports."""
    if schedule.startswith("cosine"):
        return "cosine"
    if schedule.startswith("wsd"):
        return "wsd"
    if schedule in ("two-stage", "step-8-1-1"):
        return "step"
    return schedule


@dataclass(frozen=True)
class HoldOut:
    """A leave-out protocol: what the priors for a held-out run never saw, where its results
    go and how the results file describes it."""

    key: Callable  # run -> the tuple of what it holds out
    results: str
    description: str


HOLD_OUT = {
    "source": HoldOut(
        lambda run: (run.source,),
        "accuracy.md",
        "Leave-one-source-out: priors and\n"
        "calibration for each source's runs come from the other two sources only.",
    ),
    "source-and-family": HoldOut(
        lambda run: (run.source, family(run.schedule)),
        "accuracy_unseen_family.md",
        "Leave-one-source-and-family-out:\n"
        "priors and calibration for a source's runs of one schedule family (constant, cosine, "
        "wsd,\nstep) come from the other two sources' runs of the other families only, so every "
        "forecast\nis for a new model, dataset and schedule shape.",
    ),
}


def _unseen(run, held: tuple, hold_out: str) -> bool:
    """Whether ``run`` shares nothing that ``held`` (a held-out key) holds out."""
    return all(mine != other for mine, other in zip(HOLD_OUT[hold_out].key(run), held, strict=True))


def run_benchmark(data_dir: Path, laws: tuple[str, ...], hold_out: str = "source") -> list[dict]:
    runs = load_runs(data_dir)
    rows: list[dict] = []
    for held in sorted({HOLD_OUT[hold_out].key(r) for r in runs}):
        train = [r for r in runs if _unseen(r, held, hold_out)]
        t0 = time.perf_counter()
        what = " and ".join(held)
        priors = derive_priors(train, provenance=f"benchmark: every run but {what}'s")
        print(
            f"priors without {what} ({len(train)} runs): {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        source = held[0]
        for run in (r for r in runs if HOLD_OUT[hold_out].key(r) == held):
            schedule = Schedule(run.lr_schedule)
            base = dict(run=run.name, source=source, family=family(run.schedule))
            for law in laws:
                rows += _forecast_rows(run, schedule, law, priors, base, f"lossforecast ({law})")
            whole = whole_curve_fit(run)  # behind both the oracle and hindsight
            if "multi-power" in laws and (pinned := oracle_priors(priors, run, whole)) is not None:
                rows += _forecast_rows(run, schedule, "multi-power", pinned, base, ORACLE)
            hindsight = hindsight_error(run, whole)
            lra = priors.laws["lr-annealing"]
            fixed_c = float(
                np.exp(lra.mean["log_amp"] + lra.amp_lr_exponent * np.log(schedule.peak_lr))
            )
            for c in CUTOFFS:
                n = prefix_length(run.steps, c, schedule.total_steps, run.final_step)
                s, y = run.steps[:n], run.loss[:n]
                forecasts = {}
                if n >= 2:
                    forecasts = {
                        "last smoothed value": last_smoothed(s, y, run.final_step),
                        "power law in steps": power_law_in_steps(schedule, s, y, run.final_step),
                        PLAIN: plain_lr_annealing(schedule, s, y, run.final_step, fixed_c),
                    }
                row = dict(base, method=HINDSIGHT, cutoff=c)
                if n == 0:
                    row["no_data"] = True  # like for like: no method answers there
                elif hindsight is not None:
                    row["error"] = hindsight
                rows.append(row)
                for name in BASELINES:
                    f = forecasts.get(name)
                    row = dict(base, method=name, cutoff=c)
                    if n == 0:
                        row["no_data"] = True
                    if f is not None:
                        row.update(
                            error=(f.loss - run.final_loss) / run.final_loss,
                            cov80=bool(f.low <= run.final_loss <= f.high),
                        )
                    rows.append(row)
    return rows


def _forecast_rows(run, schedule: Schedule, law: str, priors: Priors, base: dict, method: str):
    """Rows of one run's backtest at every cut-off: error, refit time and coverage."""
    points = backtest_run(run, schedule, cutoffs=CUTOFFS, law=law, priors=priors)
    rows = []
    for p in points:
        f = p.forecast
        row = dict(base, method=method, cutoff=p.cutoff)
        if p.observed_step is None:
            row["no_data"] = True
        if f is not None:
            # forecast(coverage=q) differs from the 80% one only by the multiplier
            cal = priors.calibration[law]
            half80 = (f.high - f.low) / 2
            row.update(
                error=p.rel_error,
                fit_ms=1e3 * f.fit_seconds,
                **{
                    f"cov{int(q * 100)}": bool(
                        abs(f.loss - run.final_loss) <= half80 * cal.z(q) / cal.z(0.8)
                    )
                    for q in LEVELS
                },
            )
        rows.append(row)
    return rows


def whole_curve_fit(run):
    """The Multi-Power Law fitted to the run's whole curve under the weak
    :data:`HYPERPRIORS`: ``(law, schedule, result)``, as ``_full_fit`` gives it."""
    return _full_fit("multi-power", run, HYPERPRIORS["multi-power"])


def oracle_priors(priors: Priors, run, whole) -> Priors | None:
    """``priors`` with the Multi-Power Law's annealing parameters pinned (std
    :data:`ORACLE_STD`) at the run's own whole-curve fit ``whole``; None if it failed."""
    fit = _summarise_fit(run, whole, HYPERPRIORS["multi-power"])
    if fit is None:
        return None
    law = priors.laws["multi-power"]
    pinned = replace(
        law,
        mean={**law.mean, **{p: fit.theta[p] for p in ORACLE_PINNED}},
        std={**law.std, **dict.fromkeys(ORACLE_PINNED, ORACLE_STD)},
    )
    return priors.with_law("multi-power", pinned)


def hindsight_error(run, whole) -> float | None:
    """Relative error at ``final_step`` of the run's whole-curve fit ``whole``; None if it
    failed."""
    law, schedule, result = whole
    if not result.success:
        return None
    end = float(law.predict(result.params, LawInputs.at(schedule, np.array([run.final_step])))[0])
    return (end - run.final_loss) / run.final_loss


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%" if np.isfinite(v) else "–"


def summarise(rows: list[dict]) -> tuple[str, dict]:
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["cutoff"])].append(r)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines, summary = [], {}

    lines.append(
        "## Median / 90th-percentile |relative error| of the final-loss forecast, all runs\n"
    )
    lines.append("| method | " + " | ".join(f"{int(c * 100)}%" for c in CUTOFFS) + " |")
    lines.append("|---|" + "---|" * len(CUTOFFS))
    for m in methods:
        cells = []
        for c in CUTOFFS:
            e = np.abs([r["error"] for r in by[(m, c)] if "error" in r])
            med = float(np.median(e)) if e.size else np.nan
            p90 = float(np.percentile(e, 90)) if e.size else np.nan
            summary[f"{m}|{c}"] = {"median": med, "p90": p90, "n": int(e.size)}
            cells.append(f"{_pct(med)} / {_pct(p90)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    # Like for like: the plain fit gives no answer on the runs with the fewest points.
    for m in methods:
        for c in CUTOFFS:
            answered = {r["run"] for r in by[(PLAIN, c)] if "error" in r}
            e = np.abs([r["error"] for r in by[(m, c)] if "error" in r and r["run"] in answered])
            summary[f"{m}|{c}|on_plain_runs"] = float(np.median(e)) if e.size else np.nan

    lines += _group_table(rows, by, methods, "family", "schedule family")
    # Held out one at a time, each source is a new model, dataset and schedule set: the
    # signed median shows what transfers between sources and what does not.
    lines += _group_table(rows, by, methods, "source", "held-out source", signed=True)

    lines.append(
        "\n## Interval coverage (share of runs whose final loss lies in the interval)"
        " and no-answer count\n"
    )
    lines.append("| method | interval | " + " | ".join(f"{int(c * 100)}%" for c in CUTOFFS) + " |")
    lines.append("|---|---|" + "---|" * len(CUTOFFS))
    for m in methods:
        for q in LEVELS:
            key = f"cov{int(q * 100)}"
            cells = []
            for c in CUTOFFS:
                v = [r[key] for r in by[(m, c)] if key in r]
                cells.append(f"{np.mean(v):.2f}" if v else "–")
                if v:
                    summary[f"{m}|{c}|{key}"] = float(np.mean(v))
            if any(c != "–" for c in cells):
                lines.append(f"| {m} | {int(q * 100)}% | " + " | ".join(cells) + " |")
        cells = []
        for c in CUTOFFS:
            none = sum("error" not in r for r in by[(m, c)])
            empty = sum(r.get("no_data", False) for r in by[(m, c)])
            summary[f"{m}|{c}|unanswered_with_data"] = none - empty
            cells.append(f"{none} ({empty} no data)" if empty else str(none))
        lines.append(f"| {m} | no answer | " + " | ".join(cells) + " |")

    lines += _law_mixtures(by, [m for m in methods if m.startswith("lossforecast (")])

    lines.append("\n## Refit time (median ms over all backtest fits)\n")
    for m in methods:
        t = [r["fit_ms"] for r in rows if r["method"] == m and "fit_ms" in r]
        if t:
            lines.append(
                f"- {m}: {np.median(t):.1f} ms (90th percentile {np.percentile(t, 90):.1f} ms)"
            )
    return "\n".join(lines), summary


MIXTURE_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)


def _law_mixtures(by: dict, laws: list[str]) -> list[str]:
    """Median / p90 |error| of weighted averages of two laws' forecasts of the same runs:
    whether averaging the laws beats choosing one is a question for the backtests."""
    if len(laws) != 2:
        return []
    pairs = {}  # per cutoff: (first law's error, second law's error) for each run both answer
    for c in CUTOFFS:
        second = {r["run"]: r["error"] for r in by[(laws[1], c)] if "error" in r}
        pairs[c] = [
            (r["error"], second[r["run"]])
            for r in by[(laws[0], c)]
            if "error" in r and r["run"] in second
        ]
    lines = [
        f"\n## Averaging the laws: w × {laws[0]} + (1 − w) × {laws[1]}, median / p90\n",
        "| w | " + " | ".join(f"{int(c * 100)}%" for c in CUTOFFS) + " |",
        "|---|" + "---|" * len(CUTOFFS),
    ]
    for w in MIXTURE_WEIGHTS:
        cells = [_cell([w * a + (1 - w) * b for a, b in pairs[c]], signed=False) for c in CUTOFFS]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    return lines


def _group_table(
    rows: list[dict], by: dict, methods: list[str], key: str, title: str, *, signed: bool = False
) -> list[str]:
    """Median / 90th-percentile |error| of each method per value of ``key`` (a row field);
    with ``signed``, also the median signed error (positive: the forecast was too high)."""
    head = "median / p90 (signed median)" if signed else "median / p90"
    lines = [f"\n## |Relative error| per {title}: {head}\n"]
    cutoffs = " | ".join(f"{int(c * 100)}%" for c in CUTOFFS)
    lines.append(f"| method | {key} | runs | {cutoffs} |")
    lines.append("|---|---|---|" + "---|" * len(CUTOFFS))
    for m in methods:
        for g in sorted({r[key] for r in rows}):
            n_runs = len({r["run"] for r in rows if r["method"] == m and r[key] == g})
            cells = [
                _cell([r["error"] for r in by[(m, c)] if r[key] == g and "error" in r], signed)
                for c in CUTOFFS
            ]
            lines.append(f"| {m} | {g} | {n_runs} | " + " | ".join(cells) + " |")
    return lines


def _cell(errors: list[float], signed: bool) -> str:
    """One table cell: median / p90 of |error|, and with ``signed`` the signed median."""
    if not errors:
        return "–"
    e = np.abs(errors)
    text = f"{_pct(float(np.median(e)))} / {_pct(float(np.percentile(e, 90)))}"
    return text + (f" ({100 * float(np.median(errors)):+.2f}%)" if signed else "")


def calibrated_range(n: int) -> tuple[float, float, float]:
    """What an exactly calibrated 80% interval shows on ``n`` independent runs: the 5-95%
    range of its coverage, and the probability that the coverage lands in [0.75, 0.85]."""
    if n == 0:
        return np.nan, np.nan, np.nan
    inside = binom.cdf(math.floor(0.85 * n), n, 0.8) - binom.cdf(math.ceil(0.75 * n) - 1, n, 0.8)
    return binom.ppf(0.05, n, 0.8) / n, binom.ppf(0.95, n, 0.8) / n, float(inside)


def check_targets(summary: dict, method: str) -> list[str]:
    out = []
    for c in CUTOFFS:
        med = summary[f"{method}|{c}"]["median"]
        p90 = summary[f"{method}|{c}"]["p90"]
        base = summary[f"{PLAIN}|{c}"]["median"]
        same = summary[f"{method}|{c}|on_plain_runs"]
        checks = [
            f"≤ half the plain fit's {_pct(base)}: {'yes' if med <= base / 2 else 'NO'}"
            f" (on the {summary[f'{PLAIN}|{c}']['n']} runs it answers: {_pct(same)},"
            f" {'yes' if same <= base / 2 else 'NO'})"
        ]
        if c in TARGETS:
            checks.insert(0, f"median ≤ {_pct(TARGETS[c])}: {'yes' if med <= TARGETS[c] else 'NO'}")
        checks.append(f"p90 ≤ 3× median: {'yes' if p90 <= 3 * med else 'NO'}")
        cov = summary.get(f"{method}|{c}|cov80", np.nan)
        # every answer is scored for coverage, so the runs answered are the runs counted
        lo, hi, chance = calibrated_range(summary[f"{method}|{c}"]["n"])
        checks.append(
            f"80% coverage in [0.75, 0.85]: {'yes' if 0.75 <= cov <= 0.85 else 'NO'} ({cov:.3f};"
            f" an exactly calibrated interval shows {lo:.2f}-{hi:.2f} on these runs nine times"
            f" in ten, and lands in [0.75, 0.85] with probability {chance:.2f})"
        )
        unanswered = summary[f"{method}|{c}|unanswered_with_data"]
        checks.append(
            f"an answer for every run with data: {'yes' if unanswered == 0 else 'NO'}"
            f" ({unanswered} without)"
        )
        out.append(f"- {int(c * 100)}%: median {_pct(med)}; " + "; ".join(checks))
    return out


def _oracle_targets(summary: dict) -> list[str]:
    """The target checks for :data:`ORACLE`, with what it is; none if it did not run."""
    if f"{ORACLE}|{CUTOFFS[0]}" not in summary:
        return []
    return [
        f"## The same targets for the {ORACLE}",
        "",
        "Not a forecaster: the priors of the Multi-Power Law's annealing parameters are pinned at",
        "each run's own whole-curve fit, which no forecaster knows before the cooldown. An error",
        "target it misses, no better prior for the size and shape of the drop can meet. Its",
        "intervals are the forecaster's, made for priors that do not know the drop, so its",
        "coverage says nothing.",
        "",
        *check_targets(summary, ORACLE),
        "",
    ]


def _hindsight_floor(summary: dict) -> list[str]:
    """The :data:`HINDSIGHT` errors and their p90 / median: what the p90 target asks for."""
    last = summary[f"{HINDSIGHT}|{CUTOFFS[-1]}"]
    ratio = last["p90"] / last["median"]
    return [
        "## What the law misses in hindsight",
        "",
        "The Multi-Power Law fitted to each run's whole curve, with nothing left to forecast "
        f"({last['n']} runs):",
        f"median {100 * last['median']:.3f}%, 90th percentile {100 * last['p90']:.3f}%, "
        f"p90 / median {ratio:.2f}. This is what remains once the",
        "whole curve is known (the noise of the final loss and the law's misfit at the end);",
        "p90 ≤ 3× median asks late forecasts for a tail about as narrow.",
        "",
    ]


def _flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The options the tables were made with where they differ from the defaults."""
    return "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("hold_out", "laws")
        if getattr(args, name) != parser.get_default(name)
    )


def header(flags: str, hold_out: str, seconds: float) -> str:
    """The results file's opening: how it was made, on which runs, under which protocol."""
    return "\n".join(
        [
            "# Accuracy benchmark",
            "",
            f"Generated by `python benchmarks/accuracy.py{flags}` over the 51 runs in"
            " `../shared/data`",
            "(sources: thu-yao-01-luo/MultiPowerLaw, Luo et al. ICLR 2025; zyyyyyy123/tdlt;",
            "fabian-sp/lr-scheduling, Schaipp et al. ICML 2025). " + HOLD_OUT[hold_out].description,
            '"No data": the run logs no point before the cutoff, or its last logged point (the',
            "loss to forecast) is already past, so no method answers there: the MultiPowerLaw",
            "wsdcon runs log their first point at step 2,176 of 16,000 (none at 10%), and the",
            "25M ones their last at step 14,144 (none at 90%).",
            "Cells: median / 90th percentile of |forecast − final| / final. "
            f"Wall time {seconds:.0f} s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, help="results file (default: one per --hold-out)")
    ap.add_argument("--laws", default="multi-power,lr-annealing")
    ap.add_argument("--hold-out", choices=sorted(HOLD_OUT), default="source")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(__file__).with_name(HOLD_OUT[args.hold_out].results)
    laws = tuple(args.laws.split(","))
    t0 = time.perf_counter()
    rows = run_benchmark(args.data, laws, args.hold_out)
    table, summary = summarise(rows)
    default = f"lossforecast ({laws[0]})"
    text = "\n".join(
        [
            header(_flags(args, ap), args.hold_out, time.perf_counter() - t0),
            "",
            table,
            "",
            f"## Targets ({default})",
            "",
            *check_targets(summary, default),
            "",
            *_oracle_targets(summary),
            *_hindsight_floor(summary),
        ]
    )
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
