"""Forecast the final loss of a Lightning run: a character-level GPT on the standard library.

The README's main demo. One line adds the forecast to a Lightning ``Trainer``::

    trainer = pl.Trainer(max_steps=..., callbacks=[LossForecastCallback()])

It trains the small GPT of ``_chargpt.py`` with a warmup + cosine schedule on the Python
standard library's own source, prints the forecast of the final loss live, and compares it
with the loss reached at the end. The forecasts also go to TensorBoard, into the run folder
of the trainer's ``TensorBoardLogger`` (``lightning_logs/chargpt/version_N``; see them with
``tensorboard --logdir lightning_logs``, or plot them with
``scripts/render_tensorboard_panels.py``)::

    python examples/chargpt_lightning.py             # about 3 minutes on 2 CPU cores
    python examples/chargpt_lightning.py --steps 60  # a quick smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _chargpt
from lossforecast.integrations.lightning import LossForecastCallback


class CharGPTModule(pl.LightningModule):
    """The character GPT with its optimizer and warmup + cosine schedule."""

    def __init__(self, steps: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.model = _chargpt.CharGPT()
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=_chargpt.PEAK_LR, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _chargpt.warmup_cosine(self.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        data = _chargpt.CharWindows(_chargpt.load_text(), self.steps * self.batch_size, self.seed)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)


class PrintForecast(pl.Callback):
    """Prints the latest forecast now and then (the forecasting itself is LossForecastCallback)."""

    def __init__(self, forecast: LossForecastCallback, report: _chargpt.Report) -> None:
        self.forecast, self.report = forecast, report

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        recent = pl_module.losses[-10:]
        self.report.live(trainer.global_step, sum(recent) / len(recent), self.forecast.forecast())


def main() -> None:
    args = _chargpt.parse_args(__doc__.splitlines()[0], steps=3000, log_dir="lightning_logs")
    pl.seed_everything(args.seed, verbose=False)
    forecast = LossForecastCallback(every_n_steps=10)  # console + TensorBoard by default
    report = _chargpt.Report(args.steps, every=max(args.steps // 12, 1))
    module = CharGPTModule(args.steps, args.batch_size, args.seed)
    logger = TensorBoardLogger(args.log_dir, name="chargpt") if args.log_dir else False
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",  # the GPU where there is one
        callbacks=[forecast, PrintForecast(forecast, report)],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    n = sum(e.kind == "forecast" and not e.is_summary for e in forecast.events)
    print(f"\n{n} forecast events (forecast.events)", end="")
    print(f"; TensorBoard run folder: {logger.log_dir}" if logger else "")


if __name__ == "__main__":
    main()
