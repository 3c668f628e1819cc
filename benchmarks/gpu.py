"""Measured power, energy, MFU and the energy-to-finish forecast on a CUDA GPU.

Trains the character GPT of ``examples/_chargpt.py`` (bf16 autocast, warmup + cosine) in a
plain loop with an ``EnergyMonitor`` (NVML) and a ``ComputeMeter``, feeds a ``Forecaster``,
and at 30% of the steps forecasts the energy to finish; at the end it compares that with
the energy the rest of the run actually used. Prints a table and, on CUDA, writes
``benchmarks/gpu.md``. Every number is measured on the machine it runs on::

    python benchmarks/gpu.py                  # CUDA; a few minutes at most
    python benchmarks/gpu.py --device cpu --steps 60 --batch-size 8   # smoke run, no file
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

import _chargpt  # noqa: E402
from lossforecast.integrations.flops import (  # noqa: E402
    count_flops,
    cuda_device_ids,
    device_peak_flops,
)

from lossforecast import Forecaster  # noqa: E402
from lossforecast._compute import JOULES_PER_KWH, ComputeMeter  # noqa: E402
from lossforecast._power import open_energy_monitor  # noqa: E402

FORECAST_AT = 0.3
EVERY = 10  # steps per observation fed to the forecaster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--interval", type=float, default=0.1, help="energy sampling (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --device cpu for a smoke run).")
    torch.manual_seed(args.seed)

    model = _chargpt.CharGPT().to(device)
    text = _chargpt.load_text()
    data = _chargpt.CharWindows(text, args.steps * args.batch_size, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=_chargpt.PEAK_LR, weight_decay=0.1)
    factor = _chargpt.warmup_cosine(args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    lr = np.array([_chargpt.PEAK_LR * factor(s) for s in range(args.steps)])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    first = {k: v.to(device) for k, v in next(iter(loader)).items()}
    with amp:
        flops = count_flops(model, **first)
    energy = open_energy_monitor(cuda_device_ids(device), interval=args.interval)
    meter = ComputeMeter(
        flops_per_step=flops.flops,
        tokens_per_step=first["input_ids"].numel(),
        peak_flops=device_peak_flops(device, torch.bfloat16),
        energy=energy,
        window=100,
    )
    fc = Forecaster(lr)
    at = int(FORECAST_AT * args.steps)
    forecast = None
    losses: list[float] = []
    window = []
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp:
            loss = model(**batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.detach())
        if (step + 1) % EVERY == 0:
            mean = float(torch.stack(window).float().mean())  # one sync per window
            window.clear()
            losses.append(mean)
            fc.update(step - EVERY // 2, mean)
        meter.record_step(step)
        if step == at:
            if device.type == "cuda":
                torch.cuda.synchronize()
            fc.refit()
            forecast = {
                "cost": meter.cost_to_finish(fc, step),
                "metrics": meter.metrics(prefix=""),
                "joules": None if energy is None else energy.joules(),
                "time": time.perf_counter(),
            }
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    if energy is not None:
        energy.close()  # takes a last sample now, at the end of training
    report(args, device, flops, meter, energy, forecast, start, end, losses, fc)


def report(args, device, flops, meter, energy, forecast, start, end, losses, fc) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    m = meter.metrics(prefix="")
    cost = forecast["cost"] if forecast else None
    rows = [
        ("device", name),
        ("steps x batch x tokens", f"{args.steps} x {args.batch_size} x {_chargpt.BLOCK}"),
        ("FLOPs per step", f"{flops.flops:.4g} ({flops.method})"),
        ("wall time (s)", f"{end - start:.1f}"),
        ("seconds per step (last 100)", _fmt(m.get("seconds_per_step"), ".4g")),
        ("tokens per second", _fmt(m.get("tokens_per_second"), ".4g")),
        ("achieved FLOP/s", _fmt(m.get("flops_per_second"), ".4g")),
        ("MFU (bf16 dense peak)", _fmt(m.get("mfu"), ".2%")),
    ]
    if energy is not None:
        total = energy.total()
        rows += [
            ("energy measured", ", ".join(energy.devices)),
            ("mean power over the run (W)", _fmt(total.watts, ".1f")),
            ("energy of the run (J)", f"{total.joules:.1f}"),
            ("samples / missing / resets / gaps", f"{total.n_samples} / {total.n_missing} / "
             f"{total.n_resets} / {total.n_gaps}"),
        ]  # fmt: skip
        if cost is not None and cost.joules_to_finish is not None:
            used = energy.joules() - forecast["joules"]
            error = (cost.joules_to_finish - used) / used
            at = f"forecast at {FORECAST_AT:.0%}"
            rows += [
                (f"{at}: energy to finish (J)", f"{cost.joules_to_finish:.1f}"),
                ("energy actually used after it (J)", f"{used:.1f}"),
                ("forecast error", f"{error:+.1%}"),
                (f"{at}: time to finish (s)", _fmt(cost.seconds_to_finish, ".1f")),
                ("time actually taken after it (s)", f"{end - forecast['time']:.1f}"),
                ("loss gain per kWh forecast", _fmt(cost.loss_gain_per_kwh, ".4g")),
            ]
    final = fc.forecast()
    reached = float(np.mean(losses[-max(len(losses) // 20, 1) :]))
    rows.append(("loss reached / forecast now", f"{reached:.4f} / {_fmt(final and final.loss)}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if device.type != "cuda":
        print("\n(not a CUDA run: benchmarks/gpu.md not written)")
        return
    lines = [
        "# GPU power, energy, MFU and energy-to-finish",
        "",
        f"Written by `python benchmarks/gpu.py --steps {args.steps} --batch-size "
        f"{args.batch_size}` ({time.strftime('%Y-%m-%d')}); torch {torch.__version__}, "
        f"energy sampled every {args.interval} s. Character GPT of `examples/_chargpt.py` "
        "with bf16 autocast, plain loop, forecast of the energy to finish made at "
        f"{FORECAST_AT:.0%} of the steps (kWh = J / {JOULES_PER_KWH:.0f}).",
        "",
        "| quantity | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
    ]
    (HERE / "gpu.md").write_text("\n".join(lines))
    print(f"\nwrote {HERE / 'gpu.md'}")


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
