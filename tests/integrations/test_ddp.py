"""A real 2-process DDP training (gloo, CPU): rank zero forecasts from the rank-averaged loss.

Each rank also measures its "energy" from a RAPL counter of its own: no GPU or readable RAPL
here, so each rank gets a fake powercap folder whose counter a thread advances at a fixed
power (rank r draws 10 * (r + 1) W); rank zero must report the sum over both ranks.

Run by pytest, this file starts itself as a script (``python test_ddp.py OUTDIR``); Lightning's
DDP launcher then starts the second rank the same way.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers, also in the ranks
from _ddp import (
    WATTS,
    assert_stopped_together,
    fit_back_to_back,
    free_port,
    measure_with_fake_rapl,
    run_two_ranks,
)

STEPS = 20
EVERY = 2


def _train(out: Path, mode: str) -> None:
    import time

    import lightning.pytorch as pl
    import torch
    from lossforecast.integrations.lightning import LossForecastCallback

    measure_with_fake_rapl(out, int(os.environ.get("LOCAL_RANK", "0")))

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 4, 1.0))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(STEPS * 2 * 4, 4, generator=g)
            data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
            return torch.utils.data.DataLoader(data, batch_size=4)

    torch.manual_seed(0)

    class SlowSteps(pl.Callback):  # ~1.5 s of training: the energy sampler needs samples
        def on_train_batch_end(self, *args):
            time.sleep(0.075)

    options = {}
    if mode != "forecast":
        fit_back_to_back()
    if mode == "stop":  # an unreachable target: auto_stop saves a checkpoint and stops
        options = {"target_loss": 1e-3, "auto_stop": True}
    elif mode == "prune":  # every rank holds a trial; rank zero's pruner decides
        import optuna
        from lossforecast.integrations.optuna import ForecastPruner

        study = optuna.create_study(pruner=ForecastPruner(min_progress=0.2))
        study.add_trial(optuna.trial.create_trial(value=1e-3))
        options = {"trial": study.ask()}
    cb = LossForecastCallback(every_n_steps=EVERY, **options)
    model = Tiny()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, SlowSteps()],
    )
    trainer.fit(model)
    result = {
        "rank": trainer.global_rank,
        "losses": model.losses,
        "state": None if cb.forecaster is None else cb.forecaster.state_dict()["observations"],
        "compute": None if cb.status() is None else cb.status().cost,
        "global_step": trainer.global_step,
        "pruned": cb.pruned,
        "stop_reason": None if cb.status() is None else cb.status().stop_reason,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _run_ddp(out: Path, mode: str) -> tuple[dict, dict]:
    """Train on 2 gloo ranks in a subprocess; the two ranks' results."""
    pytest.importorskip("lightning")
    pytest.importorskip("torch")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return run_two_ranks([sys.executable, __file__, str(out), mode], out, env)


@pytest.mark.parametrize("mode", ["stop", "prune"])
def test_ddp_ranks_stop_together_when_rank_zero_decides(tmp_path, mode):
    if mode == "prune":
        pytest.importorskip("optuna")
    rank0, rank1 = _run_ddp(tmp_path, mode)
    assert_stopped_together(rank0, rank1, mode, STEPS)
    if mode == "stop":
        (checkpoint,) = (tmp_path / "checkpoints").glob("lossforecast-stop-step=*.ckpt")
        assert checkpoint.name == f"lossforecast-stop-step={rank0['global_step']}.ckpt"


def test_ddp_forecasts_on_rank_zero_from_the_rank_averaged_loss(tmp_path):
    rank0, rank1 = _run_ddp(tmp_path, "forecast")
    assert rank1["state"] is None  # only global rank zero forecasts
    assert len(rank0["losses"]) == len(rank1["losses"]) == STEPS
    assert rank0["losses"] != rank1["losses"]  # the ranks saw different data

    mean = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"], strict=True)]
    windows = [sum(mean[i : i + EVERY]) / EVERY for i in range(EVERY, STEPS, EVERY)]
    observed = [
        v
        for v, n in zip(
            rank0["state"]["bins"]["sum_loss"], rank0["state"]["bins"]["n"], strict=True
        )
        if n
    ]
    assert rank0["state"]["n_total"] == STEPS // EVERY - 1  # one point per window, once
    assert observed == pytest.approx(windows, rel=1e-5)
    # energy: the sum over both ranks' counters, not rank zero's times two
    assert rank1["compute"] is None
    assert rank0["compute"]["compute/watts"] == pytest.approx(sum(WATTS), rel=0.25)


if __name__ == "__main__":
    _train(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "forecast")
