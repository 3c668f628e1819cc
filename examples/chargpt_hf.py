"""Forecast the final loss of a Hugging Face ``Trainer`` run: a character-level GPT-2.

The GPT-2 is built from a config (no downloads) with the same size as ``_chargpt.CharGPT``
and trained on the Python standard library's own source with warmup + cosine::

    python examples/chargpt_hf.py             # about 3 minutes on 2 CPU cores
    python examples/chargpt_hf.py --steps 60  # a quick smoke run
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _chargpt
from lossforecast.integrations.transformers import LossForecastCallback


class PrintForecast(transformers.TrainerCallback):
    """Prints the latest forecast at each log (the forecasting itself is LossForecastCallback)."""

    def __init__(self, forecast: LossForecastCallback, report: _chargpt.Report) -> None:
        self.forecast, self.report = forecast, report

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.report.live(state.global_step, logs["loss"], self.forecast.forecast())


def main() -> None:
    args = _chargpt.parse_args(__doc__.splitlines()[0], steps=2000)
    transformers.set_seed(args.seed)
    data = _chargpt.CharWindows(_chargpt.load_text(), args.steps * args.batch_size, seed=args.seed)
    model = transformers.GPT2LMHeadModel(_chargpt.gpt2_config())
    every = max(args.steps // 12, 1)
    logging_steps = max(args.steps // 200, 1)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = transformers.TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=_chargpt.PEAK_LR,
            weight_decay=0.1,
            warmup_steps=max(int(_chargpt.WARMUP_FRACTION * args.steps), 1),
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": _chargpt.MIN_LR_FRACTION},
            logging_steps=logging_steps,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=args.seed,
        )
        forecast = LossForecastCallback()
        report = _chargpt.Report(args.steps, every=every - every % logging_steps or logging_steps)
        trainer = transformers.Trainer(
            model=model,
            args=training_args,
            train_dataset=data,
            callbacks=[forecast, PrintForecast(forecast, report)],
        )
        trainer.remove_callback(transformers.PrinterCallback)  # the report prints instead
        trainer.train()  # ends with the summary: forecasts at 10-90% against the loss reached


if __name__ == "__main__":
    main()
