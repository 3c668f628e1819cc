"""Speed of the online forecaster: ``update()`` per call and a refit, against the issue's targets.

Targets (issue 12): ``update()`` under 5 µs per call; a refit under 50 ms median on a
100k-step schedule with 2,000 observed points.

Measured on two 100k-step schedules (warmup + cosine, and WSD with a 20% linear cooldown),
for both laws, with 2,000 observed points spread over the first 60% of the run:

* ``update`` -- median over batches of 1,000 calls of the time per call (a per-call timer
  would cost more than the call itself);
* ``first fit`` -- the first fit (multi-start), once;
* ``refit`` -- median and 90th percentile over 25 refits, each after 10 new points
  (the warm-started refit a training loop pays);
* ``forecast`` -- median over batches of 20 calls of ``forecast(refit=False)`` on the last
  fit: reading the final-loss forecast with its interval, which needs no fit.

A fit holds BLAS to one thread itself (``lossforecast._fit``: SciPy's L-BFGS-B calls BLAS
on tiny matrices, where threads only add synchronisation, badly so when training keeps the
cores busy), so the BLAS thread pool as found is the only setting measured.

Run ``python benchmarks/speed.py`` (add ``--profile`` for where a refit's time goes); it
prints a table and writes ``benchmarks/speed.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOTAL = 100_000
WARMUP = 1_000
N_POINTS = 2_000
N_UPDATE_BATCHES = 200
BATCH = 1_000
N_REFITS = 25
N_FORECAST_BATCHES = 50
FORECAST_BATCH = 20
UPDATE_TARGET_US = 5.0
REFIT_TARGET_MS = 50.0


def cosine_schedule(total: int = TOTAL) -> np.ndarray:
    t = np.arange(total - WARMUP) / (total - WARMUP)
    return 3e-4 * np.r_[np.linspace(0.01, 1.0, WARMUP), 0.1 + 0.45 * (1 + np.cos(np.pi * t))]


def wsd_schedule(total: int = TOTAL) -> np.ndarray:
    cool = total // 5
    return (
        3e-4
        * np.r_[
            np.linspace(0.01, 1.0, WARMUP),
            np.ones(total - WARMUP - cool),
            np.linspace(1.0, 0.0, cool),
        ]
    )


SCHEDULES = {"warmup+cosine": cosine_schedule, "wsd": wsd_schedule}


def _loss(steps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 2.8 + 6.0 * (steps + 200.0) ** -0.3 + rng.normal(0.0, 0.01, np.shape(steps))


def measure(schedule: str, law: str) -> dict:
    """Timings of one configuration, in this process."""
    from lossforecast import Forecaster

    lr = SCHEDULES[schedule]()
    rng = np.random.default_rng(0)

    # update(): a long stream at every step, timed per batch of calls
    fc = Forecaster(lr, law=law)
    steps = np.arange(N_UPDATE_BATCHES * BATCH) % TOTAL
    losses = _loss(steps, rng).tolist()
    steps = steps.tolist()
    per_call = []
    for b in range(N_UPDATE_BATCHES):
        if b * BATCH % TOTAL == 0:
            fc = Forecaster(lr, law=law)
        lo, hi = b * BATCH, (b + 1) * BATCH
        t0 = time.perf_counter()
        for s, v in zip(steps[lo:hi], losses[lo:hi], strict=True):
            fc.update(s, v)
        per_call.append((time.perf_counter() - t0) / BATCH * 1e6)

    # refit: 2,000 points over the first 60% of the run, then 10 new points per refit
    every = int(0.6 * TOTAL) // N_POINTS
    obs = np.arange(WARMUP, WARMUP + N_POINTS * every, every)
    fc = Forecaster(lr, law=law)
    for s, v in zip(obs.tolist(), _loss(obs, rng).tolist(), strict=True):
        fc.update(s, v)
    t0 = time.perf_counter()
    fc.refit()
    first = time.perf_counter() - t0
    refits = []
    step = int(obs[-1])
    for _ in range(N_REFITS):
        new = step + every * np.arange(1, 11)
        for s, v in zip(new.tolist(), _loss(new, rng).tolist(), strict=True):
            fc.update(s, v)
        step = int(new[-1])
        t0 = time.perf_counter()
        ok = fc.refit()
        refits.append(time.perf_counter() - t0)
    reads = []
    for _ in range(N_FORECAST_BATCHES):
        t0 = time.perf_counter()
        for _ in range(FORECAST_BATCH):
            fc.forecast(refit=False)
        reads.append((time.perf_counter() - t0) / FORECAST_BATCH * 1e6)
    return {
        "schedule": schedule,
        "law": law,
        "update_us": statistics.median(per_call),
        "forecast_us": statistics.median(reads),
        "first_fit_ms": first * 1e3,
        "refit_ms": statistics.median(refits) * 1e3,
        "refit_p90_ms": float(np.percentile(refits, 90)) * 1e3,
        "fit_ok": bool(ok),
        "n_points": fc.n_points,
        "last_error": fc.last_error,
    }


def profile(schedule: str, law: str) -> str:
    """cProfile of the refits of one configuration, top functions by internal time."""
    prof = cProfile.Profile()
    prof.enable()
    measure(schedule, law)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def _ok(value: float, target: float) -> str:
    return "yes" if value < target else "**no**"


def table(results: list[dict]) -> str:
    head = (
        "| schedule | law | update (µs/call) | < 5 µs | first fit (ms) "
        "| refit median (ms) | refit p90 (ms) | < 50 ms | forecast (µs/call) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        lines.append(
            f"| {r['schedule']} | {r['law']} | {r['update_us']:.2f} | "
            f"{_ok(r['update_us'], UPDATE_TARGET_US)} | {r['first_fit_ms']:.1f} | "
            f"{r['refit_ms']:.1f} | {r['refit_p90_ms']:.1f} | "
            f"{_ok(r['refit_ms'], REFIT_TARGET_MS)} | {r['forecast_us']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print where a refit's time goes")
    parser.add_argument("--out", default=str(HERE / "speed.md"), help="results file")
    args = parser.parse_args(argv)
    if args.profile:
        for schedule in SCHEDULES:
            print(f"== {schedule}, multi-power ==")
            print(profile(schedule, "multi-power"))
        return 0

    import numpy
    import scipy

    results = []
    for schedule in SCHEDULES:
        for law in ("multi-power", "lr-annealing"):
            r = measure(schedule, law)
            results.append(r)
            print(
                f"{schedule:14s} {law:13s} update {r['update_us']:.2f} µs  "
                f"first fit {r['first_fit_ms']:.1f} ms  refit {r['refit_ms']:.1f} ms "
                f"(p90 {r['refit_p90_ms']:.1f})  forecast {r['forecast_us']:.0f} µs  "
                f"ok={r['fit_ok']}",
                flush=True,
            )
    text = table(results)
    print()
    print(text)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = f"""# Speed benchmark

Written by `python benchmarks/speed.py` ({time.strftime("%Y-%m-%d")}). Targets (issue 12):
`update()` < {UPDATE_TARGET_US:g} µs per call; a refit < {REFIT_TARGET_MS:g} ms median on a
100k-step schedule with 2,000 observed points.

Setup: {TOTAL:,}-step schedules (warmup + cosine to 10%; WSD with a 20% linear cooldown);
`update` is the median over {N_UPDATE_BATCHES} batches of {BATCH:,} calls; the refits follow
{N_POINTS:,} points spread over the first 60% of the run, each after 10 new points
({N_REFITS} refits, warm-started); "first fit" is the first, multi-start fit. Each fit holds
BLAS to one thread itself. "forecast" is the median over {N_FORECAST_BATCHES} batches of
{FORECAST_BATCH} calls of `forecast(refit=False)` on the last fit (no fitting).

{text}

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average
{load:.2f} when the run started; Python {platform.python_version()}, numpy {numpy.__version__},
scipy {scipy.__version__}.

The law's `predict_jac` takes most of a refit's time (`python benchmarks/speed.py --profile`).
Before fits held BLAS to one thread, SciPy's L-BFGS-B (`setulb`, BLAS on tiny arrays) took most
of it whenever other work kept the cores busy, and refits were 5-50x slower.
"""
    Path(args.out).write_text(md)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
