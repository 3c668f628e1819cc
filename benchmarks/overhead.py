"""Overhead of LossForecastCallback on a real Lightning training of a small transformer.

Trains the character GPT of ``examples/_chargpt.py`` with the same seed in three arms: without
the callback, with it and its instability probes off (``instability=False``: forecasts,
advice, compute and energy telemetry), and with everything on at default cadence (probes of
attention logits, log Z, norms and Adam state every 20 steps, loss/step-time detectors). The
arms alternate in mirrored order (ABCCBA) over several repeats; the median time per training
step of each is compared with the run without. Also times capturing a 1e6-step LR schedule.
Prints a table and writes ``overhead.md`` next to this file::

    python benchmarks/overhead.py            # about 6 minutes on 2 CPU cores
    python benchmarks/overhead.py --steps 60 --repeats 1 --out /tmp/overhead.md  # smoke run
    python benchmarks/overhead.py --accelerator gpu --precision bf16-mixed --batch-size 256 \
        --steps 1000 --out benchmarks/overhead_gpu.md   # on a CUDA GPU, energy through NVML
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
from lossforecast.integrations.torch import Probes  # noqa: E402

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
    """The callback, with the time it takes on the training thread recorded per step.

    Its three per-batch hooks and the probes' forward hooks (attention and output logits,
    patched in by :func:`_time_forward_probes`) add to the step's entry in ``hook_seconds``.
    Unlike the step-time ratios, this does not drown in the machine's run-to-run noise.
    """

    current: TimedCallback | None = None  # the one whose forward probes are being timed

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_seconds: list[float] = []
        TimedCallback.current = self

    def add(self, seconds: float) -> None:
        if self.hook_seconds:
            self.hook_seconds[-1] += seconds

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.hook_seconds.append(0.0)
        start = time.perf_counter()
        super().on_train_batch_start(*args, **kwargs)
        self.add(time.perf_counter() - start)

    def on_before_optimizer_step(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(*args, **kwargs)
        self.add(time.perf_counter() - start)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.add(time.perf_counter() - start)


def _time_forward_probes() -> None:
    """Make the probes' forward hooks add their time to the current TimedCallback."""
    for name in ("_record_attention", "_record_output"):
        method = getattr(Probes, name)

        def timed(self, *args, _method=method):
            start = time.perf_counter()
            try:
                return _method(self, *args)
            finally:
                if TimedCallback.current is not None:
                    TimedCallback.current.add(time.perf_counter() - start)

        setattr(Probes, name, timed)


#: arm name -> callback options (None: no callback)
ARMS = {
    "without callback": None,
    "callback, probes off": {"instability": False},
    "callback, everything on": {},
}


def train(
    args: argparse.Namespace, options: dict | None
) -> tuple[list[float], TimedCallback | None]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    forecast = None if options is None else TimedCallback(every_n_steps=args.every, **options)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        callbacks=[c for c in (forecast, timer) if c is not None],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CharGPTModule(args.steps, batch_size=args.batch_size, seed=0))
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
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (32-true)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (32)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    _time_forward_probes()

    names = list(ARMS)
    times: dict[str, list[float]] = {name: [] for name in names}
    hook: dict[str, list[float]] = {name: [] for name in names[1:]}
    fitting: dict[str, list[float]] = {name: [] for name in names[1:]}  # share of wall time
    energy: list[str] = []  # what the callback's energy sampler measured, if anything
    repeat_ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    for _ in range(args.repeats):
        medians: dict[str, list[float]] = {}
        for name in names + names[::-1]:
            step_times, cb = train(args, ARMS[name])
            times[name] += step_times
            medians.setdefault(name, []).append(statistics.median(step_times))
            if cb is not None:
                if cb.forecaster.forecast(refit=False) is None:
                    raise RuntimeError(
                        "the callback made no forecast: the benchmark measured nothing"
                    )
                hook[name] += cb.hook_seconds[WARMUP_STEPS:-1]
                wall = sum(step_times) * len(cb.hook_seconds) / max(len(step_times), 1)
                fitting[name].append(cb._monitor.fitter.fit_seconds / wall)
                watts = cb.status().cost.get("compute/watts")
                if watts is not None:
                    energy.append(f"{watts:.0f} W")
        base_median = statistics.mean(medians[names[0]])
        for name in names[1:]:
            repeat_ratios[name].append(statistics.mean(medians[name]) / base_median)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: median[name] / median[names[0]] for name in names[1:]}
    capture = capture_seconds(1_000_000)

    device = (
        torch.cuda.get_device_name()
        if args.accelerator in ("gpu", "cuda")
        else f"{platform.machine()}, {args.threads} torch threads"
    )
    if energy:
        sampler = (
            f"The callback's energy sampler was on in every run with it (recent power at "
            f"the end of each: {', '.join(energy)}), so its cost is in the ratios."
        )
    else:
        sampler = (
            "On this machine there is no GPU and no readable RAPL counter, so the energy "
            "sampler is off (one info line) and its cost is not measured here."
        )
    lines = [
        "# LossForecastCallback overhead",
        "",
        f"Lightning {pl.__version__}, torch {torch.__version__}, {device}, precision "
        f"{args.precision}. Character GPT of `examples/_chargpt.py` (2 layers, 96 wide, "
        f"64 tokens x {args.batch_size} sequences), {args.steps} steps per run, "
        f"first {WARMUP_STEPS} steps left out, "
        f"{args.repeats} mirrored repeats (ABCCBA), callback with "
        f"`every_n_steps={args.every}` (every run with the callback ends with a background "
        "forecast).",
        "",
        "| arm | steps timed | median step (ms) | ratio to without | per-repeat ratios "
        "| training-thread time per step: median / mean (us) | mean / median step "
        "| background fitting / wall time |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        f"| {names[0]} | {len(times[names[0]])} | {1e3 * median[names[0]]:.2f} | 1 | | | | |",
        *[
            f"| {name} | {len(times[name])} | {1e3 * median[name]:.2f} | "
            f"**{ratios[name]:.4f}** | {', '.join(f'{r:.4f}' for r in repeat_ratios[name])} | "
            f"{1e6 * statistics.median(hook[name]):.0f} / {1e6 * statistics.mean(hook[name]):.0f}"
            f" | **{statistics.mean(hook[name]) / median[names[0]]:.2%}** | "
            f"{statistics.mean(fitting[name]):.2%} |"
            for name in names[1:]
        ],
        "",
        *_probe_cost(names, median, hook),
        "Targets: ratio <= 1.01 with the probes off, <= 1.02 with everything on. The "
        "training-thread time is all the callback does on the training thread in a step: its "
        "batch-start, before-optimizer-step and batch-end hooks and the probes' forward hooks "
        f"(feeds every {args.every} steps and probe samples every 20 included). It is "
        "measured inside each step, so unlike the ratios it is not lost in run-to-run noise; "
        "its mean over the median step without the callback is what the callback adds. "
        "Fitting runs on a background thread, capped at 2% of wall time (the first fit starts "
        "at once, so short runs show more); the last column is "
        f"its measured share. {sampler}",
        "",
        "| capture of a 1e6-step schedule (2 param groups) | seconds |",
        "| --- | ---: |",
        *[f"| {name} | {sec:.2f} |" for name, sec in capture.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)


def _probe_cost(names: list[str], median: dict, hook: dict) -> list[str]:
    """What the probes add on top of the callback: the two arms' difference."""
    if len(names) < 3:
        return []
    base, off, on = names[0], names[1], names[2]
    ratio = median[on] / median[off] - 1.0
    thread = (statistics.mean(hook[on]) - statistics.mean(hook[off])) / median[base]
    return [
        f"The probes' own cost ({on} against {off}): step time {ratio:+.2%}, training-thread "
        f"time {thread:+.2%} of a step (budget for the probes: 2%).",
        "",
    ]


if __name__ == "__main__":
    main()
