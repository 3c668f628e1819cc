"""History benchmark: forecasts sharpened by the user's own past runs vs the priors alone.

Protocol (issue 11, item 2): for every run in ``../shared/data``, forecast its final loss
from 10/25/50% of its steps (``lossforecast.backtest``, as in ``benchmarks/accuracy.py``)
with (a) the priors alone and (b) the priors sharpened by a history of the *other* runs of
the same source. The history is made the real way: a ``Forecaster`` is fed each other
run's whole curve and ``write_run_summary`` writes its summary into a folder, which
``load_history`` reads back; ``history_priors`` then sharpens the priors with the labels
a user would give (model size, dataset = source) and the new run's planned schedule.

Two starting points: the shipped priors (derived from all 51 runs, so they already know
every source: a hard baseline), and, with ``--loso``, priors derived without the run's own
source (as ``benchmarks/accuracy.py`` does), which is what a user with a new model and
dataset starts from.

Run: ``nice -n 10 python benchmarks/history.py [--data ../shared/data] [--loso]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lossforecast import Forecaster, Priors, Schedule, load_runs
from lossforecast._backtest import backtest_run
from lossforecast._derive import derive_priors
from lossforecast._history import history_priors, load_history, write_run_summary

CUTOFFS = (0.1, 0.25, 0.5)
ROOT = Path(__file__).resolve().parent.parent


def _labels(run) -> dict[str, str]:
    return {"model": run.model, "dataset": run.source}


def _write_history(folder: Path, runs, priors: Priors, law: str) -> None:
    """Summaries of ``runs`` as their forecasters would leave them at the end of training."""
    for run in runs:
        fc = Forecaster(
            Schedule(run.lr_schedule), law=law, target_step=run.final_step, priors=priors
        )
        for s, y in zip(run.steps.tolist(), run.loss.tolist(), strict=True):
            fc.update(s, y)
        write_run_summary(
            folder, fc, final_loss=run.final_loss, labels=_labels(run), run_name=run.name
        )


def run_benchmark(data_dir: Path, law: str, loso: bool, work: Path) -> list[dict]:
    runs = load_runs(data_dir)
    shipped = Priors.default()
    rows: list[dict] = []
    for source in sorted({r.source for r in runs}):
        own = [r for r in runs if r.source == source]
        starts = {"shipped priors": shipped}
        if loso:
            t0 = time.perf_counter()
            starts["priors without the source"] = derive_priors(
                [r for r in runs if r.source != source], provenance=f"without {source}"
            )
            print(f"priors without {source}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for start, priors in starts.items():
            folder = work / f"{start}-{source}".replace(" ", "_").replace("/", "_")
            _write_history(folder, own, priors, law)
            summaries = load_history(folder)
            for run in own:
                schedule = Schedule(run.lr_schedule)
                history = [s for s in summaries if s.run_name != run.name]
                sharpened = history_priors(
                    priors, history, law=law, labels=_labels(run), schedule=schedule
                )
                arms = {start: priors, f"{start} + history": sharpened}
                for arm, p in arms.items():
                    for point in backtest_run(run, schedule, cutoffs=CUTOFFS, law=law, priors=p):
                        row = dict(run=run.name, source=source, arm=arm, cutoff=point.cutoff)
                        if point.forecast is not None:
                            row.update(error=point.rel_error, cov80=point.covered)
                        rows.append(row)
    return rows


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%" if np.isfinite(v) else "–"


def summarise(rows: list[dict]) -> tuple[str, dict]:
    by = defaultdict(list)
    for r in rows:
        by[(r["arm"], r["cutoff"])].append(r)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    summary: dict = {}
    head = "| priors | " + " | ".join(f"{int(c * 100)}%" for c in CUTOFFS) + " |"
    rule = "|---|" + "---|" * len(CUTOFFS)
    lines = [
        "## Median / 90th-percentile |relative error| of the final-loss forecast, "
        "80% interval coverage, all runs\n",
        head,
        rule,
    ]
    for arm in arms:
        cells = []
        for c in CUTOFFS:
            e = np.abs([r["error"] for r in by[(arm, c)] if "error" in r])
            cov = float(np.mean([r["cov80"] for r in by[(arm, c)] if "cov80" in r]))
            med, p90 = float(np.median(e)), float(np.percentile(e, 90))
            summary[f"{arm}|{c}"] = {"median": med, "p90": p90, "cov80": cov, "n": int(e.size)}
            cells.append(f"{_pct(med)} / {_pct(p90)} / {cov:.2f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "\n## Median |relative error| per source\n",
        head.replace("priors", "priors | source"),
        rule + "---|",
    ]
    for arm in arms:
        for source in sorted({r["source"] for r in rows}):
            cells = []
            for c in CUTOFFS:
                e = np.abs(
                    [r["error"] for r in by[(arm, c)] if "error" in r and r["source"] == source]
                )
                cells.append(_pct(float(np.median(e))) if e.size else "–")
            lines.append(f"| {arm} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def check_targets(summary: dict, start: str) -> list[str]:
    out = []
    for c in CUTOFFS:
        a, b = summary[f"{start}|{c}"], summary[f"{start} + history|{c}"]
        change = b["median"] / a["median"] - 1.0
        checks = []
        if c in (0.1, 0.25):
            checks.append(f"≥ 30% lower: {'yes' if change <= -0.3 else 'NO'}")
        checks.append(f"not worse: {'yes' if change <= 0 else 'NO'}")
        checks.append(f"80% coverage {a['cov80']:.2f} → {b['cov80']:.2f}")
        out.append(
            f"- {int(c * 100)}%: median {_pct(a['median'])} → {_pct(b['median'])} "
            f"({100 * change:+.0f}%); " + "; ".join(checks)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    ap.add_argument("--law", default="multi-power")
    ap.add_argument(
        "--loso", action="store_true", help="also start from leave-one-source-out priors"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        rows = run_benchmark(args.data, args.law, args.loso, Path(work))
    table, summary = summarise(rows)
    starts = [a for a in dict.fromkeys(r["arm"] for r in rows) if not a.endswith("+ history")]
    targets = [
        line
        for s in starts
        for line in [f"\n### Starting from the {s}\n", *check_targets(summary, s)]
    ]
    text = "\n".join(
        [
            "# History benchmark: learning from your past runs",
            "",
            f"Generated by `python benchmarks/history.py{' --loso' if args.loso else ''}` over",
            "the 51 runs in `../shared/data` (sources: thu-yao-01-luo/MultiPowerLaw, Luo et al.",
            "ICLR 2025; zyyyyyy123/tdlt; fabian-sp/lr-scheduling, Schaipp et al. ICML 2025; see",
            f"its README). Law `{args.law}`. Each run is forecast from 10/25/50% of its steps with",
            "the priors alone and with the priors sharpened by a history of the other runs of its",
            "source (summaries written by `write_run_summary` after a `Forecaster` saw each whole",
            "curve; labels: model size and dataset). Cells: median / 90th percentile of",
            "|forecast − final| / final / share of runs whose final loss lies in the 80% interval.",
            "The shipped priors were derived from all 51 runs, the evaluated one included, so they",
            "are a hard baseline; the leave-one-source-out priors are what a user with a new model",
            f"and dataset starts from. Wall time {time.perf_counter() - t0:.0f} s.",
            "",
            table,
            "",
            "## Targets (median at 10% and 25% at least 30% lower with history; never worse)",
            *targets,
            "",
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
