"""Pruning benchmark: compute spent and best-trial survival, no pruning vs Median vs Forecast.

Two sweeps, each run as real Optuna studies (in-memory storage) whose trials report through
``lossforecast.integrations.optuna.TrialReporter``; a pruned trial returns its forecast
(``forecast_value``) or raises ``TrialPruned``:

(a) **Replay of the real curves** in ``../shared/data``: runs that share source, model and
    planned length form one study (a sweep over schedules), each run's logged points are
    reported in order as one trial (raw per-step curves as means of 100-step blocks), and
    every study is run in several random trial orders. The objective is the run's
    ``final_loss``. ForecastPruner uses leave-one-source-out priors (derived from the other
    sources' runs), so it never saw the curves it prunes.
(b) **A real sweep** of the examples' tiny character-level transformer
    (``examples/_chargpt.py``) on one CPU core: learning rates x {cosine, constant, WSD}.
    Every trial is trained once, fully and seeded; each pruner's study then replays the
    recorded losses, so a pruned trial's prefix is exactly what it would have trained. The
    objective is the mean training loss of the last 5% of steps.

Compute is the optimizer steps trained, as a share of training every trial to the end. The
best trial is the one with the lowest objective; it "survives" if it was not pruned.

Run: ``nice -n 10 python benchmarks/pruning.py [--part replay|sweep|all] [--orders 6]``
(about 8 minutes on one core; writes ``benchmarks/pruning.md`` and ``pruning.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from lossforecast.integrations.optuna import ForecastPruner, TrialReporter, forecast_value

from lossforecast import load_runs
from lossforecast._derive import derive_priors

ROOT = Path(__file__).resolve().parent.parent
#: Checks per trial for both pruners: one every this share of the planned steps.
CHECK_EVERY = 0.02
#: Both pruners start pruning after this share of the planned steps.
MIN_PROGRESS = 0.25
ORACLE = "oracle (knows every final value)"


@dataclass(frozen=True)
class TrialCurve:
    """One trial of a replayed sweep: its schedule, the points it reports and its value."""

    name: str
    lr: np.ndarray
    steps: np.ndarray
    loss: np.ndarray
    value: float

    @property
    def total(self) -> int:
        return len(self.lr)


def arms(total: int, priors=None) -> dict[str, optuna.pruners.BasePruner | None]:
    """The pruners compared on a study whose trials plan ``total`` steps."""
    interval = max(int(CHECK_EVERY * total), 1)
    return {
        "no pruning": None,
        "MedianPruner": optuna.pruners.MedianPruner(n_startup_trials=1, interval_steps=interval),
        f"MedianPruner, warmup {MIN_PROGRESS:.0%}": optuna.pruners.MedianPruner(
            n_startup_trials=1, n_warmup_steps=int(MIN_PROGRESS * total), interval_steps=interval
        ),
        "ForecastPruner": ForecastPruner(
            0.9,
            n_startup_trials=1,
            interval_steps=interval,
            min_progress=MIN_PROGRESS,
            priors=priors,
        ),
    }


def run_study(trials: list[TrialCurve], order: list[int], pruner) -> dict:
    """One Optuna study over ``trials`` in ``order``: steps trained, survival, regret."""
    spent: dict[int, int] = {}
    study = optuna.create_study(
        pruner=pruner if pruner is not None else optuna.pruners.NopPruner(),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial: optuna.Trial) -> float:
        i = order[trial.number]
        curve = trials[i]
        reporter = TrialReporter(trial, curve.lr)
        for step, loss in zip(curve.steps.tolist(), curve.loss.tolist(), strict=True):
            if reporter.report(step, loss):
                spent[i] = step + 1
                value = forecast_value(trial)
                if value is None:
                    raise optuna.TrialPruned()
                return value
        spent[i] = curve.total
        return curve.value

    study.optimize(objective, n_trials=len(trials))
    pruned = {order[t.number] for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    pruned |= {order[t.number] for t in study.trials if t.user_attrs.get("lossforecast_pruned")}
    best = int(np.argmin([t.value for t in trials]))
    kept = [i for i in range(len(trials)) if i not in pruned]
    regret = min(trials[i].value for i in kept) - trials[best].value
    return {
        "order": [trials[i].name for i in order],
        "steps": int(sum(spent.values())),
        "full_steps": int(sum(t.total for t in trials)),
        "pruned": sorted(trials[i].name for i in pruned),
        "best": trials[best].name,
        "best_survives": best not in pruned,
        "regret": float(regret),
    }


def oracle(trials: list[TrialCurve], order: list[int]) -> dict:
    """A pruner that knows every final value: a trial that will not beat the best finished
    one is pruned before its first step. A floor on the compute any pruner can reach."""
    best_so_far = math.inf
    spent = 0
    for i in order:
        if trials[i].value < best_so_far:
            spent += trials[i].total
            best_so_far = trials[i].value
    return {
        "order": [trials[i].name for i in order],
        "steps": spent,
        "full_steps": int(sum(t.total for t in trials)),
        "pruned": [],
        "best": "",
        "best_survives": True,
        "regret": 0.0,
    }


def orders_for(n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """All orders of ``n`` trials if there are at most ``k``, else ``k`` random ones."""
    if math.factorial(n) <= k:
        return [list(p) for p in itertools.permutations(range(n))]
    return [rng.permutation(n).tolist() for _ in range(k)]


# ---------------------------------------------------------------------- (a) replay
def replay_studies(data: Path) -> list[tuple[str, str, list[TrialCurve]]]:
    """(study name, source, trials): runs grouped by source, model and planned length."""
    groups: dict[tuple[str, str, int], list] = defaultdict(list)
    for run in load_runs(data):
        groups[(run.source, run.model, run.total_steps)].append(run)
    studies = []
    for (source, model, total), runs in sorted(groups.items()):
        if len(runs) < 2:
            continue
        trials = []
        for run in runs:
            steps, loss = run.steps, run.loss
            if run.smoothed == "no":  # raw per-step loss: report means of 100-step blocks
                n = len(steps) // 100
                steps = steps[: n * 100].reshape(n, 100)[:, -1]
                loss = loss[: n * 100].reshape(n, 100).mean(axis=1)
            trials.append(TrialCurve(run.name, run.lr_schedule, steps, loss, run.final_loss))
        studies.append((f"{source.split('/')[0]} {model} T={total}", source, trials))
    return studies


def run_replay(data: Path, n_orders: int, seed: int) -> list[dict]:
    runs = load_runs(data)
    rng = np.random.default_rng(seed)
    rows = []
    priors_for: dict[str, object] = {}
    for name, source, trials in replay_studies(data):
        if source not in priors_for:
            t0 = time.perf_counter()
            priors_for[source] = derive_priors(
                [r for r in runs if r.source != source], provenance=f"all sources but {source}"
            )
            print(f"priors without {source}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        total = trials[0].total
        for order in orders_for(len(trials), n_orders, rng):
            for arm, pruner in arms(total, priors_for[source]).items():
                t0 = time.perf_counter()
                row = run_study(trials, order, pruner)
                rows.append({"part": "replay", "study": name, "arm": arm, **row})
                rows[-1]["seconds"] = time.perf_counter() - t0
            rows.append({"part": "replay", "study": name, "arm": ORACLE, **oracle(trials, order)})
        print(f"{name}: done", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------- (b) real sweep
def sweep_schedule(kind: str, peak: float, total: int) -> np.ndarray:
    """Planned LR per step: 5% linear warmup, then cosine to 10%, constant, or WSD."""
    warm = max(int(0.05 * total), 1)
    up = peak * np.arange(1, warm + 1) / warm
    rest = total - warm
    if kind == "cosine":
        t = np.arange(rest) / rest
        tail = peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
    elif kind == "constant":
        tail = np.full(rest, peak)
    elif kind == "wsd":  # linear cooldown to zero over the last 20%
        cool = int(0.2 * total)
        tail = np.r_[np.full(rest - cool, peak), peak * np.linspace(1, 0, cool + 1)[1:]]
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return np.r_[up, tail]


def train_trial(lr: np.ndarray, seed: int, batch: int) -> np.ndarray:
    """Train the examples' CharGPT on the planned ``lr``; the loss of every step."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import _chargpt as cg

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    text = cg.load_text(1_000_000)
    model = cg.CharGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=float(lr[0]), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    losses = np.empty(len(lr))
    for step, step_lr in enumerate(lr):
        for group in opt.param_groups:
            group["lr"] = float(step_lr)
        off = rng.integers(0, len(text) - cg.BLOCK, size=batch)
        x = torch.from_numpy(np.stack([text[o : o + cg.BLOCK] for o in off]))
        loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.item()
    return losses


def run_sweep(steps: int, lrs: list[float], batch: int, n_orders: int, seed: int) -> list[dict]:
    trials = []
    window = 10
    t_all = time.perf_counter()
    for kind in ("cosine", "constant", "wsd"):
        for peak in lrs:
            lr = sweep_schedule(kind, peak, steps)
            t0 = time.perf_counter()
            losses = train_trial(lr, seed, batch)
            n = steps // window
            means = losses[: n * window].reshape(n, window).mean(axis=1)
            value = float(losses[-max(steps // 20, 1) :].mean())
            name = f"{kind} lr={peak:g}"
            print(f"{name}: {value:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            reported = np.arange(window - 1, n * window, window)
            trials.append(TrialCurve(name, lr, reported, means, value))
    train_seconds = time.perf_counter() - t_all
    rng = np.random.default_rng(seed)
    rows = []
    for order in orders_for(len(trials), n_orders, rng):
        for arm, pruner in arms(steps).items():
            row = run_study(trials, order, pruner)
            rows.append({"part": "sweep", "study": "chargpt", "arm": arm, **row})
        rows.append({"part": "sweep", "study": "chargpt", "arm": ORACLE, **oracle(trials, order)})
    curves = {t.name: {"value": t.value, "reported": t.loss.round(4).tolist()} for t in trials}
    rows.append({"part": "sweep-curves", "train_seconds": train_seconds, "curves": curves})
    return rows


# ---------------------------------------------------------------------- report
def summarise(rows: list[dict], part: str) -> list[dict]:
    """Per arm: compute share, best-trial survival, mean and worst regret."""
    out = []
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["part"] == part:
            by_arm[r["arm"]].append(r)
    for arm, rs in by_arm.items():
        out.append(
            {
                "arm": arm,
                "studies": len(rs),
                "compute": sum(r["steps"] for r in rs) / sum(r["full_steps"] for r in rs),
                "survival": sum(r["best_survives"] for r in rs) / len(rs),
                "regret_mean": float(np.mean([r["regret"] for r in rs])),
                "regret_max": float(np.max([r["regret"] for r in rs])),
            }
        )
    return out


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| pruner | studies | compute (share of no pruning) | best trial survives | "
        "mean / worst regret of the best kept trial |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['arm']} | {s['studies']} | {s['compute']:.1%} | {s['survival']:.0%} | "
            f"{s['regret_mean']:.4f} / {s['regret_max']:.4f} |"
        )
    return lines


def per_study(rows: list[dict], part: str) -> list[str]:
    studies = sorted({r["study"] for r in rows if r["part"] == part})
    arm_names = list(dict.fromkeys(r["arm"] for r in rows if r["part"] == part))
    lines = [
        "| study | trials | orders | "
        + " | ".join(f"{a}: compute, survival" for a in arm_names[1:])
        + " |",
        "|---|---|---|" + "---|" * (len(arm_names) - 1),
    ]
    for st in studies:
        cells = []
        n_orders = n_trials = 0
        for a in arm_names[1:]:
            rs = [r for r in rows if r["part"] == part and r["study"] == st and r["arm"] == a]
            n_orders, n_trials = len(rs), len(rs[0]["order"])
            comp = sum(r["steps"] for r in rs) / sum(r["full_steps"] for r in rs)
            surv = sum(r["best_survives"] for r in rs) / len(rs)
            cells.append(f"{comp:.0%}, {surv:.0%}")
        lines.append(f"| {st} | {n_trials} | {n_orders} | " + " | ".join(cells) + " |")
    return lines


def write_report(rows: list[dict], out: Path, args: argparse.Namespace, seconds: float) -> None:
    lines = [
        "# Pruning benchmark",
        "",
        f"Generated by `nice -n 10 python benchmarks/pruning.py --part {args.part} "
        f"--orders {args.orders}` (Optuna {optuna.__version__}, wall time {seconds:.0f} s, "
        "one CPU core for the sweep). Both pruners check once every "
        f"{CHECK_EVERY:.0%} of the planned steps and start after the first finished trial "
        "(`n_startup_trials=1`). ForecastPruner: `confidence=0.9`, "
        f"`min_progress={MIN_PROGRESS}`. Compute: optimizer steps trained as a share of "
        "training every trial to the end. The oracle row prunes, before its first step, "
        "every trial that will not beat the best finished one: the floor for any pruner. "
        "Regret: objective of the best trial that was not "
        "pruned minus that of the best trial (0 when the best survives).",
        "",
    ]
    for part, title in (
        ("replay", "(a) Replay of the real curves in ../shared/data"),
        ("sweep", "(b) Real sweep: tiny char-level transformer on CPU"),
    ):
        if not any(r["part"] == part for r in rows):
            continue
        lines += [f"## {title}", ""]
        if part == "replay":
            lines += [
                "Runs sharing source, model and planned length form one study; each study "
                "is run in every trial order (or "
                f"{args.orders} random ones when there are more). ForecastPruner uses "
                "priors derived without the study's source.",
                "",
            ]
        else:
            sweep_meta = next(r for r in rows if r["part"] == "sweep-curves")
            lines += [
                f"{args.sweep_steps} steps per trial, batch {args.batch}, learning rates "
                f"{', '.join(f'{x:g}' for x in args.lrs)} x cosine/constant/WSD; trained "
                f"once in {sweep_meta['train_seconds']:.0f} s, then replayed in "
                f"{args.orders} random trial orders. Final losses:",
                "",
                "| trial | objective |",
                "|---|---|",
            ]
            for name, c in sorted(sweep_meta["curves"].items(), key=lambda kv: kv[1]["value"]):
                lines.append(f"| {name} | {c['value']:.4f} |")
            lines.append("")
        lines += [*table(summarise(rows, part)), "", "Per study (compute, best survives):", ""]
        lines += [*per_study(rows, part), ""]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("replay", "sweep", "all"), default="all")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--orders", type=int, default=6, help="random trial orders per study")
    parser.add_argument("--sweep-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pruning.md"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("lossforecast").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if args.part in ("replay", "all"):
        rows += run_replay(args.data, args.orders, args.seed)
    if args.part in ("sweep", "all"):
        rows += run_sweep(args.sweep_steps, args.lrs, args.batch, args.orders, args.seed)
    seconds = time.perf_counter() - t0
    write_report(rows, args.out, args, seconds)
    for part in ("replay", "sweep"):
        if any(r["part"] == part for r in rows):
            print(f"\n{part}")
            print("\n".join(table(summarise(rows, part))))


if __name__ == "__main__":
    main()
