"""Overhead of LossForecastCallback on a real Lightning training of a small transformer (CPU).

Trains the character GPT of ``examples/_chargpt.py`` with the same seed in three arms: without
the callback, with it and its instability probes off (``instability=False``: forecasts,
advice, compute and energy telemetry), and with everything on at default cadence (probes of
attention logits, log Z, norms and Adam state every 20 steps, loss/step-time detectors). The
arms alternate in mirrored order (ABCCBA) over several repeats; the median time per training
step of each is compared with the run without. Also times capturing a 1e6-step LR schedule.
Prints a table and writes ``overhead.md`` next to this file::

    python benchmarks/overhead.py            # about 6 minutes on 2 CPU cores
    python benchmarks/overhead.py --steps 60 --repeats 1 --out /tmp/overhead.md  # smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from chargpt_lightning import CharGPTModule  # noqa: E402
from lossforecast.integrations._schedule_capture import capture_schedule  # noqa: E402
from lossforecast.integrations.lightning import LossForecastCallback  # noqa: E402

WARMUP_STEPS = 20  # first steps of each run left out of the timing


class StepTimer(pl.Callback):
    """Wall time between the starts of consecutive training batches (everything in a step)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][WARMUP_STEPS:]


class TimedCallback(LossForecastCallback):
    """The callback, with the time spent in its per-batch hook recorded."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_seconds: list[float] = []

    def on_train_batch_end(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.hook_seconds.append(time.perf_counter() - start)


#: arm name -> callback options (None: no callback)
ARMS = {
    "without callback": None,
    "callback, probes off": {"instability": False},
    "callback, everything on": {},
}


def train(steps: int, options: dict | None, every: int) -> tuple[list[float], TimedCallback | None]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    forecast = None if options is None else TimedCallback(every_n_steps=every, **options)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=[c for c in (forecast, timer) if c is not None],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CharGPTModule(steps, batch_size=32, seed=0))
    return timer.step_times(), forecast


def capture_seconds(n: int) -> dict[str, float]:
    """Seconds to capture an n-step schedule for common schedulers (2 parameter groups)."""
    out = {}
    for name in ("CosineAnnealingLR", "LambdaLR (warmup + cosine)", "OneCycleLR"):
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(2)]
        opt = torch.optim.AdamW(groups, lr=1e-3)
        if name == "CosineAnnealingLR":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n)
        elif name == "OneCycleLR":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=n)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min((s + 1) / 1000, 0.5 * (1 + math.cos(math.pi * s / n)))
            )
        start = time.perf_counter()
        capture_schedule(opt, [sched], n)
        out[name] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="steps per training run (default 300)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="mirrored ABCCBA repeats (default 3)"
    )
    parser.add_argument("--every", type=int, default=10, help="callback every_n_steps (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    names = list(ARMS)
    times: dict[str, list[float]] = {name: [] for name in names}
    hook: dict[str, list[float]] = {name: [] for name in names[1:]}
    repeat_ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    for _ in range(args.repeats):
        medians: dict[str, list[float]] = {}
        for name in names + names[::-1]:
            step_times, cb = train(args.steps, ARMS[name], args.every)
            times[name] += step_times
            medians.setdefault(name, []).append(statistics.median(step_times))
            if cb is not None:
                if cb.forecaster.forecast(refit=False) is None:
                    raise RuntimeError(
                        "the callback made no forecast: the benchmark measured nothing"
                    )
                hook[name] += cb.hook_seconds[WARMUP_STEPS:]
        base_median = statistics.mean(medians[names[0]])
        for name in names[1:]:
            repeat_ratios[name].append(statistics.mean(medians[name]) / base_median)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: median[name] / median[names[0]] for name in names[1:]}
    capture = capture_seconds(1_000_000)

    lines = [
        "# LossForecastCallback overhead",
        "",
        f"Lightning {pl.__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{args.threads} torch threads. Character GPT of `examples/_chargpt.py` "
        f"(2 layers, 96 wide, 64 tokens x 32 sequences), {args.steps} steps per run, "
        f"first {WARMUP_STEPS} steps left out, "
        f"{args.repeats} mirrored repeats (ABCCBA), callback with "
        f"`every_n_steps={args.every}` (every run with the callback ends with a background "
        "forecast).",
        "",
        "| arm | steps timed | median step (ms) | ratio to without | per-repeat ratios "
        "| hook median / mean (us) |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
        f"| {names[0]} | {len(times[names[0]])} | {1e3 * median[names[0]]:.2f} | 1 | | |",
        *[
            f"| {name} | {len(times[name])} | {1e3 * median[name]:.2f} | "
            f"**{ratios[name]:.4f}** | {', '.join(f'{r:.4f}' for r in repeat_ratios[name])} | "
            f"{1e6 * statistics.median(hook[name]):.0f} / {1e6 * statistics.mean(hook[name]):.0f} |"
            for name in names[1:]
        ],
        "",
        f"Targets: ratio <= 1.01 with the probes off, <= 1.02 with everything on. The hook "
        f"time is the callback's per-batch hook (feeds every {args.every} steps, probe "
        "samples every 20 included); fitting runs on a background thread. On this machine "
        "there is no GPU and no readable RAPL counter, so the energy sampler is off (one "
        "info line) and its cost is not measured here.",
        "",
        "| capture of a 1e6-step schedule (2 param groups) | seconds |",
        "| --- | ---: |",
        *[f"| {name} | {sec:.2f} |" for name, sec in capture.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
