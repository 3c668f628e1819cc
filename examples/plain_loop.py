"""Forecast the final loss from a plain PyTorch training loop with ``lossforecast.Monitor``.

Trains the small character-level GPT of ``_chargpt.py`` on the standard library's source and
prints the forecast of the final loss as training goes::

    python examples/plain_loop.py            # about 3 minutes on 2 CPU cores
    python examples/plain_loop.py --steps 60 # a quick smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _chargpt

from lossforecast import Monitor


def main() -> None:
    args = _chargpt.parse_args(__doc__.splitlines()[0], steps=3000)
    torch.manual_seed(args.seed)
    text = _chargpt.load_text()
    data = _chargpt.CharWindows(text, args.steps * args.batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    model = _chargpt.CharGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_chargpt.PEAK_LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _chargpt.warmup_cosine(args.steps))

    # The planned schedule is captured from the scheduler; nothing else to configure.
    monitor = Monitor(
        optimizer=optimizer, scheduler=scheduler, total_steps=args.steps, every_n_steps=10
    )
    report = _chargpt.Report(args.steps, every=max(args.steps // 12, 1))
    losses = []
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        monitor.step(loss)  # after optimizer.step(): O(1), fitting happens in the background
        losses.append(loss.item())
        report.live(step, sum(losses[-10:]) / len(losses[-10:]), monitor.forecast())
    monitor.finish()  # prints the summary: forecasts at 10-90% against the loss reached


if __name__ == "__main__":
    main()
