"""Advice benchmark: does the early-stop advice stop the runs it should, and only those?

Replays every run in ``../shared/data`` (``lossforecast.load_runs``; sources in its README)
and asks an :class:`~lossforecast.Advisor` for advice every 2% of the run from 10%, after a
refit on the points seen so far:

* **no false stops**: target and reference 1% above the run's true final loss (reachable);
  any stop-worthy advice is a false stop;
* **true stops**: target 3% and 1% below the true final loss (unreachable); when the first
  ``target_unreachable`` comes, as a share of the run;
* **WSD runs against a cosine twin** (same model, data and length): two current-loss rules
  that a sweep might use before the WSD run's cooldown (A: its smoothed loss is worse than
  the cosine run's at the same step; B: it gained less than 0.5% over the last 10% of the
  run), against the Advisor given the cosine run's final loss as target and reference.

Run: ``nice -n 10 python benchmarks/advice.py [--data ../shared/data]`` (about 2 minutes);
writes ``advice.md`` and ``advice.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from lossforecast import Advisor, Forecaster, load_runs

ROOT = Path(__file__).resolve().parent.parent
MARKS = np.arange(0.1, 0.99, 0.02)  # shares of the run at which advice is asked for
SMOOTH = 0.02  # share of the run behind a smoothed loss (the current-loss rules)


def replay(run, advisors: dict[str, Advisor]) -> dict[str, list[tuple[float, object]]]:
    """(share of the run, advice) for every advice each advisor gives over the run."""
    total = run.total_steps
    fc = Forecaster(run.lr_schedule)
    out: dict[str, list] = {name: [] for name in advisors}
    i = 0
    for step, loss in zip(run.steps.tolist(), run.loss.tolist(), strict=True):
        fc.update(step, loss)
        if i < len(MARKS) and step >= MARKS[i] * total:
            while i < len(MARKS) and step >= MARKS[i] * total:
                i += 1
            fc.refit()
            for name, advisor in advisors.items():
                out[name] += [(step / total, a) for a in advisor.advise(fc, step)]
    return out


def first_stop(advice: list, kind: str | None = None) -> float | None:
    """Share of the run at the first stop-worthy advice (of ``kind``), or None."""
    return next((p for p, a in advice if a.stop and (kind is None or a.kind == kind)), None)


def cooldown_start(lr: np.ndarray) -> int:
    """First step after the peak at which the LR is below it."""
    peak = int(np.argmax(lr))
    after = np.flatnonzero(lr[peak:] < lr.max() * (1 - 1e-9))
    return peak + int(after[0]) if after.size else len(lr)


def twins(names: set[str]) -> list[tuple[str, str]]:
    """(WSD run, cosine run) pairs with the same model, data and length."""
    pairs = [
        (f"mpl-{size}-{wsd}-20000-24000", f"mpl-{size}-cosine-24000")
        for size in ("25m", "100m", "400m")
        for wsd in ("wsd", "wsdld")
    ]
    pairs.append(("tdlt-100m-wsd", "tdlt-100m-cosine"))
    for size, lr_wsd, lr_cos, lengths in (
        ("166m", "0.0005", "0.001", (15000, 25000, 30000)),
        ("60m", "0.001", "0.002", (7500, 12500, 17500)),
        ("93m", "0.001", "0.002", (10000, 17500, 25000)),
    ):
        pairs += [
            (
                f"owt2-{size}-wsd-linear0.2-lr{lr_wsd}-T{t}",
                f"owt2-{size}-cos-final0.1-lr{lr_cos}-T{t}",
            )
            for t in lengths
        ]
    return [(w, c) for w, c in pairs if w in names and c in names]


def smoothed(run, step: float) -> float:
    window = (run.steps <= step) & (run.steps > step - SMOOTH * run.total_steps)
    return float(np.mean(run.loss[window]))


def current_loss_rules(wsd, cosine) -> tuple[float | None, float | None]:
    """Where rules A and B would stop the WSD run before its cooldown (share of the run)."""
    total, cooldown = wsd.total_steps, cooldown_start(wsd.lr_schedule)
    rule_a = rule_b = None
    for mark in MARKS:
        step = mark * total
        if step >= cooldown:
            break
        if rule_a is None and smoothed(wsd, step) > smoothed(cosine, step):
            rule_a = float(mark)
        back = step - 0.1 * total
        if rule_b is None and back > 0.1 * total:
            gained = smoothed(wsd, back) - smoothed(wsd, step)
            if gained < 0.005 * smoothed(wsd, step):
                rule_b = float(mark)
    return rule_a, rule_b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = ap.parse_args(argv)
    logging.getLogger("lossforecast").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    runs = {r.name: r for r in load_runs(args.data)}

    rows = []
    for run in runs.values():
        final = run.final_loss
        advice = replay(
            run,
            {
                "reachable": Advisor(target_loss=final * 1.01, reference=final * 1.01),
                "miss3": Advisor(target_loss=final * 0.97),
                "miss1": Advisor(target_loss=final * 0.99),
            },
        )
        rows.append(
            {
                "run": run.name,
                "false_stops": [[round(p, 3), a.kind] for p, a in advice["reachable"] if a.stop],
                "miss3_at": first_stop(advice["miss3"], "target_unreachable"),
                "miss1_at": first_stop(advice["miss1"], "target_unreachable"),
            }
        )

    pairs = []
    for wsd_name, cos_name in twins(set(runs)):
        wsd, cosine = runs[wsd_name], runs[cos_name]
        rule_a, rule_b = current_loss_rules(wsd, cosine)
        target = cosine.final_loss
        advice = replay(wsd, {"twin": Advisor(target_loss=target, reference=target)})["twin"]
        pairs.append(
            {
                "wsd": wsd_name,
                "cosine": cos_name,
                "wsd_final": wsd.final_loss,
                "cosine_final": target,
                "rule_a_at": rule_a,
                "rule_b_at": rule_b,
                "advisor_stop_at": first_stop(advice),
            }
        )

    n = len(rows)
    miss3 = [r["miss3_at"] for r in rows if r["miss3_at"] is not None]
    miss1 = [r["miss1_at"] for r in rows if r["miss1_at"] is not None]
    summary = {
        "runs": n,
        "runs_with_false_stop": sum(bool(r["false_stops"]) for r in rows),
        "miss3_fired": len(miss3),
        "miss3_median_at": float(np.median(miss3)) if miss3 else None,
        "miss1_fired": len(miss1),
        "miss1_median_at": float(np.median(miss1)) if miss1 else None,
        "twin_pairs": len(pairs),
        "wsd_beats_cosine": sum(p["wsd_final"] <= p["cosine_final"] for p in pairs),
        "rule_a_stops": sum(p["rule_a_at"] is not None for p in pairs),
        "rule_b_stops": sum(p["rule_b_at"] is not None for p in pairs),
        "advisor_stops": sum(p["advisor_stop_at"] is not None for p in pairs),
    }

    def cell(x: float | None) -> str:
        return "–" if x is None else f"{x:.0%}"

    s = summary
    lines = [
        "# Early-stop advice benchmark",
        "",
        f"Generated by `python benchmarks/advice.py` over the {n} runs in `../shared/data` "
        "(see its README for the sources). Advice asked every 2% of each run from 10%, after "
        f"a refit on the points seen so far. Wall time {time.perf_counter() - t0:.0f} s.",
        "",
        "| check | result |",
        "| --- | --- |",
        f"| target and reference 1% above the true final: runs with a false stop | "
        f"{s['runs_with_false_stop']} of {n} |",
        f"| target 3% below the true final: `target_unreachable` | {s['miss3_fired']} of {n}, "
        f"median at {cell(s['miss3_median_at'])} of the run |",
        f"| target 1% below the true final: `target_unreachable` | {s['miss1_fired']} of {n}, "
        f"median at {cell(s['miss1_median_at'])} of the run |",
        f"| WSD runs with a cosine twin (WSD ends lower in {s['wsd_beats_cosine']}) | "
        f"{s['twin_pairs']} |",
        f"| rule A (worse than the twin now) stops before the cooldown | "
        f"{s['rule_a_stops']} of {s['twin_pairs']} |",
        f"| rule B (<0.5% gained over the last 10%) stops before the cooldown | "
        f"{s['rule_b_stops']} of {s['twin_pairs']} |",
        f"| Advisor (twin's final as target and reference): any stop-worthy advice | "
        f"{s['advisor_stops']} of {s['twin_pairs']} |",
        "",
        "## WSD runs against their cosine twin",
        "",
        "| WSD run | final | cosine final | rule A at | rule B at | Advisor stop at |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {p['wsd']} | {p['wsd_final']:.4f} | {p['cosine_final']:.4f} | "
            f"{cell(p['rule_a_at'])} | {cell(p['rule_b_at'])} | {cell(p['advisor_stop_at'])} |"
            for p in pairs
        ],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "runs": rows, "pairs": pairs}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
