"""Measured power, energy, MFU and the energy-to-finish forecast on a CUDA GPU.

Trains the character GPT of ``examples/_chargpt.py`` (bf16, warmup + cosine) twice:

- in a plain loop with an ``EnergyMonitor`` (NVML) and a ``ComputeMeter`` feeding a
  ``Forecaster`` by hand, and
- as the Lightning example does, with ``LossForecastCallback`` doing all of it itself (its
  own NVML sampler, FLOPs counted on the first batch, MFU against the peak table).

At 30% of the steps each forecasts the energy and time to finish; at the end they are
compared with what the rest of the run actually used. Prints a table and, on CUDA, writes
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

import lightning.pytorch as pl
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

import _chargpt  # noqa: E402
from chargpt_lightning import CharGPTModule  # noqa: E402
from lossforecast.integrations.flops import (  # noqa: E402
    count_flops,
    cuda_device_ids,
    device_peak_flops,
)
from lossforecast.integrations.lightning import LossForecastCallback  # noqa: E402

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
    rows = plain_rows(args, device, flops, meter, energy, forecast, start, end, losses, fc)
    rows += lightning_rows(args, device)
    report(args, device, rows)


class StatusAt(pl.Callback):
    """The forecasting callback's status (and the time) at step ``at`` and at the end."""

    def __init__(self, forecast: LossForecastCallback, at: int, cuda: bool) -> None:
        self.forecast, self.at, self.cuda = forecast, at, cuda
        self.seen: dict[str, tuple] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at and "at" not in self.seen:
            self._keep("at")

    def on_train_end(self, trainer, pl_module):
        self._keep("end")

    def _keep(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seen[name] = (self.forecast.status(), time.perf_counter())


def lightning_rows(args, device: torch.device) -> list[tuple[str, str]]:
    """Train as ``examples/chargpt_lightning.py`` does and read the callback's own figures."""
    pl.seed_everything(args.seed, verbose=False)
    forecast = LossForecastCallback(every_n_steps=EVERY)
    cuda = device.type == "cuda"
    probe = StatusAt(forecast, int(FORECAST_AT * args.steps), cuda)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        callbacks=[forecast, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CharGPTModule(args.steps, args.batch_size, args.seed))
    (early, t_at), (_, t_end) = probe.seen["at"], probe.seen["end"]
    final = forecast.status()  # after the callback closed its sampler (last sample taken)
    c0, c1 = early.cost, final.cost
    rows = [
        ("**Lightning + LossForecastCallback**", f"{trainer.precision}, `every_n_steps={EVERY}`"),
        ("callback: MFU / tokens per second", f"{_fmt(c1.get('compute/mfu'), '.2%')} / "
         f"{_fmt(c1.get('compute/tokens_per_second'), '.4g')}"),
        ("callback: recent power (W)", _fmt(c1.get("compute/watts"), ".1f")),
        ("callback: energy of the run (J)", _fmt(c1.get("compute/joules"), ".1f")),
    ]  # fmt: skip
    at_text = f"callback at {FORECAST_AT:.0%}"
    if "joules_to_finish" in c0 and "compute/joules" in c0 and "compute/joules" in c1:
        used = c1["compute/joules"] - c0["compute/joules"]
        forecast_j = c0["joules_to_finish"]
        rows += [
            (f"{at_text}: energy to finish (J)", f"{forecast_j:.1f}"),
            ("energy actually used after it (J)", f"{used:.1f}"),
            ("forecast error", f"{(forecast_j - used) / used:+.1%}"),
        ]
    if early.seconds_to_finish is not None:
        rows += [
            (f"{at_text}: time to finish (s)", f"{early.seconds_to_finish:.1f}"),
            ("time actually taken after it (s)", f"{t_end - t_at:.1f}"),
        ]
    reached = float(np.mean(trainer.lightning_module.losses[-max(args.steps // 20, 1) :]))
    final_loss = _fmt(final.forecast and final.forecast.loss)
    rows.append(("callback: loss reached / final forecast", f"{reached:.4f} / {final_loss}"))
    return rows


def plain_rows(args, device, flops, meter, energy, forecast, start, end, losses, fc):
    """The plain loop's figures, as (quantity, value) rows."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    m = meter.metrics(prefix="")
    cost = forecast["cost"] if forecast else None
    rows = [
        ("device", name),
        ("**plain loop**", "bf16 autocast, core parts fed by hand"),
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
    return rows


def report(args, device, rows: list[tuple[str, str]]) -> None:
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
        f"plain loop's energy sampled every {args.interval} s (the callback's at its "
        "default, 1 s). Character GPT of `examples/_chargpt.py` in bf16, trained in a plain "
        "loop and then with Lightning and the callback; forecasts of the energy and time to "
        f"finish made at {FORECAST_AT:.0%} of the steps (kWh = J / {JOULES_PER_KWH:.0f}).",
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
