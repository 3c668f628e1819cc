"""Tests for the Lightning callback, on real Trainers with a tiny model."""

from __future__ import annotations

import importlib
import json
import math
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lossforecast.integrations.lightning import LossForecastCallback  # noqa: E402

from lossforecast import Forecaster  # noqa: E402

STEPS = 40


def _module_class(pl):
    """A tiny regression LightningModule for the given Lightning namespace."""

    class Tiny(pl.LightningModule):
        def __init__(self, schedule="cosine", interval="step", frequency=1, groups=1, batches=20):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
            )
            self.schedule, self.interval, self.frequency = schedule, interval, frequency
            self.groups, self.batches = groups, batches
            self.seen_lr: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def on_before_optimizer_step(self, optimizer):
            self.seen_lr.append(float(optimizer.param_groups[0]["lr"]))

        def configure_optimizers(self):
            if self.groups == 1:
                params = self.parameters()
            else:  # group 0 is the second layer, with another LR than group 1
                params = [
                    {"params": self.net[2].parameters()},
                    {"params": self.net[0].parameters(), "lr": 0.01},
                ]
            opt = torch.optim.AdamW(params, lr=0.05)
            sched = _scheduler(self.schedule, opt, self.trainer.estimated_stepping_batches)
            if sched is None:
                return opt
            config = {"scheduler": sched, "interval": self.interval, "frequency": self.frequency}
            if self.schedule == "plateau":
                config["monitor"] = "val_loss"
            return {"optimizer": opt, "lr_scheduler": config}

        def train_dataloader(self):
            return _loader(self.batches, seed=0)

        def val_dataloader(self):
            return _loader(2, seed=1)

    return Tiny


def _scheduler(kind, opt, total):
    sched = torch.optim.lr_scheduler
    if kind == "cosine":  # warmup then cosine, as a lambda
        return sched.LambdaLR(
            opt, lambda s: min((s + 1) / 5, 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
        )
    if kind == "sequential":
        warm = sched.LinearLR(opt, start_factor=0.1, total_iters=5)
        return sched.SequentialLR(opt, [warm, sched.CosineAnnealingLR(opt, 30)], milestones=[5])
    if kind == "onecycle":
        return sched.OneCycleLR(opt, max_lr=0.05, total_steps=int(total))
    if kind == "step":
        return sched.StepLR(opt, step_size=1, gamma=0.7)
    if kind == "plateau":
        return sched.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    return None


def _loader(batches, seed, batch_size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 8, generator=g)
    y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(batches * batch_size, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _trainer(pl, callbacks, tmp_path=None, **kwargs):
    options = dict(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def pl(request):
    return pytest.importorskip(request.param)


# ---------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monitor": ""}, ValueError, "`monitor`"),
        ({"monitor": 3}, ValueError, "`monitor`"),
        ({"every_n_steps": 0}, ValueError, "`every_n_steps`"),
        ({"every_n_steps": 2.5}, ValueError, "`every_n_steps`"),
        ({"lr_schedule": [float("nan")]}, ValueError, "NaN"),
        ({"coverage": 1.5}, ValueError, "`coverage`"),
        ({"target_step": -1}, ValueError, "`target_step`"),
        ({"colour": "red"}, TypeError, "colour"),
    ],
)
def test_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossForecastCallback(**kwargs)


def test_state_key_names_the_monitored_metric():
    assert LossForecastCallback().state_key == "LossForecastCallback{'monitor': 'train_loss'}"
    assert (
        LossForecastCallback("val_loss").state_key == "LossForecastCallback{'monitor': 'val_loss'}"
    )


def test_callback_pickles_before_training():
    cb = pickle.loads(pickle.dumps(LossForecastCallback("val_loss", every_n_steps=3)))
    assert (cb.monitor, cb.every_n_steps, cb.forecaster) == ("val_loss", 3, None)


# ---------------------------------------------------------------------------- real training
def test_forecasts_and_logs_on_a_real_trainer(pl, tmp_path):
    torch.manual_seed(0)
    cb = LossForecastCallback(every_n_steps=2)
    model = _module_class(pl)()
    logger = CSVLogger(tmp_path) if pl.__name__ == "lightning.pytorch" else False
    _trainer(pl, [cb], logger=logger).fit(model)

    fc = cb.forecaster
    assert isinstance(fc, Forecaster)
    np.testing.assert_allclose(fc.schedule.lr, model.seen_lr, rtol=1e-12)
    # windows of 2 steps end at steps 2, 4, ..., 40; the first holds the initial loss only
    assert fc.n_points == STEPS // 2 - 1
    assert fc.last_step == (2 * STEPS - 2 - 3) // 2
    final = fc.forecast()
    assert final is not None and final.step == STEPS - 1
    assert final.low <= final.loss <= final.high and math.isfinite(final.loss)
    if logger:
        text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
        assert "lossforecast/forecast/low" in text.splitlines()[0]


@pytest.mark.parametrize(
    ("schedule", "interval", "frequency", "accumulate", "groups"),
    [
        ("sequential", "step", 1, 1, 2),
        ("onecycle", "step", 1, 2, 1),
        ("step", "step", 3, 2, 1),
        ("step", "epoch", 1, 1, 1),
        ("step", "epoch", 2, 3, 2),
    ],
)
def test_captured_schedule_matches_the_lrs_used(schedule, interval, frequency, accumulate, groups):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    cb = LossForecastCallback(every_n_steps=5)
    model = _module_class(pl)(schedule, interval, frequency, groups, batches=10)
    _trainer(pl, [cb], max_steps=-1, max_epochs=6, accumulate_grad_batches=accumulate).fit(model)
    assert len(model.seen_lr) == cb.forecaster.schedule.total_steps
    np.testing.assert_allclose(cb.forecaster.schedule.lr, model.seen_lr, rtol=1e-12)
    assert cb.schedule_note is None


def test_gradient_accumulation_feeds_the_mean_of_the_unscaled_batch_losses():
    import lightning.pytorch as pl

    class Recording(_module_class(pl)):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(float(loss.detach()))
            return loss

    torch.manual_seed(0)
    every, accumulate = 5, 2
    cb = LossForecastCallback(every_n_steps=every)
    model = Recording(batches=80)
    model.losses = []
    _trainer(pl, [cb], max_steps=40, accumulate_grad_batches=accumulate).fit(model)
    per_step = np.asarray(model.losses).reshape(-1, accumulate).mean(axis=1)  # Lightning's loss
    windows = [per_step[i : i + every].mean() for i in range(0, 40, every)]
    bins = cb.forecaster.state_dict()["observations"]["bins"]
    observed = [v for v, n in zip(bins["sum_loss"], bins["n"], strict=True) if n]
    np.testing.assert_allclose(observed, windows, rtol=1e-5)


def test_plateau_scheduler_is_reported_and_current_lr_assumed(caplog):
    import lightning.pytorch as pl

    cb = LossForecastCallback(every_n_steps=5)
    model = _module_class(pl)("plateau", "epoch")
    trainer = _trainer(pl, [cb], max_steps=-1, max_epochs=2, limit_val_batches=2)
    with caplog.at_level("WARNING", logger="lossforecast"):
        trainer.fit(model)
    assert trainer.global_step == 40
    assert "ReduceLROnPlateau" in cb.schedule_note
    assert sum("ReduceLROnPlateau" in r.getMessage() for r in caplog.records) == 1
    np.testing.assert_allclose(cb.forecaster.schedule.lr, 0.05)


def test_validation_metric_is_forecast():
    import lightning.pytorch as pl

    cb = LossForecastCallback("val_loss")
    trainer = _trainer(pl, [cb], val_check_interval=10, limit_val_batches=2, num_sanity_val_steps=1)
    trainer.fit(_module_class(pl)())
    # one point per validation after steps 10, 20, 30, 40; the sanity check is not fed
    assert cb.forecaster.n_points == 4
    assert cb.forecaster.last_step == STEPS - 1


def test_resumed_run_continues_the_same_forecast(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= STEPS // 2

    def run(callbacks, ckpt_path=None):
        torch.manual_seed(0)
        cb = LossForecastCallback(every_n_steps=2)
        trainer = _trainer(
            pl, [cb, *callbacks], enable_checkpointing=True, default_root_dir=tmp_path
        )
        trainer.fit(_module_class(pl)(), ckpt_path=ckpt_path)
        return cb, trainer

    full, _ = run([])
    save = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=STEPS // 2, save_top_k=-1)
    first, trainer = run([StopAt(), save])
    assert trainer.global_step == STEPS // 2
    ckpt = tmp_path / "ckpt" / f"epoch=0-step={STEPS // 2}.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    json.dumps(saved)  # the callback's state is JSON-safe
    resumed, trainer = run([], ckpt_path=ckpt)
    assert trainer.global_step == STEPS

    np.testing.assert_allclose(resumed.forecaster.schedule.lr, full.forecaster.schedule.lr)
    a = full.forecaster.state_dict()["observations"]
    b = resumed.forecaster.state_dict()["observations"]
    assert a["n_total"] == b["n_total"] and a["bins"]["sum_step"] == b["bins"]["sum_step"]
    np.testing.assert_allclose(b["bins"]["sum_loss"], a["bins"]["sum_loss"], rtol=1e-5)
    fa, fb = full.forecaster.forecast(), resumed.forecaster.forecast()
    assert fb.loss == pytest.approx(fa.loss, rel=1e-3)


@pytest.mark.parametrize("broken", ["refit", "update"])
def test_broken_forecaster_never_stops_training(broken, monkeypatch, caplog):
    import lightning.pytorch as pl

    def boom(self, *args, **kwargs):
        raise RuntimeError("deliberately broken")

    monkeypatch.setattr(Forecaster, broken, boom)
    cb = LossForecastCallback(every_n_steps=1)
    trainer = _trainer(pl, [cb])
    with caplog.at_level("WARNING", logger="lossforecast"):
        trainer.fit(_module_class(pl)())
    assert trainer.global_step == STEPS
    assert cb.forecast() is None
    messages = [r.getMessage() for r in caplog.records if "deliberately broken" in r.getMessage()]
    assert len(messages) == 1  # told once, not once per step


def test_broken_schedule_capture_never_stops_training(monkeypatch, caplog):
    import lightning.pytorch as pl

    module = importlib.import_module("lossforecast.integrations.lightning")
    monkeypatch.setattr(module, "_capture", lambda *a: 1 / 0)
    cb = LossForecastCallback(every_n_steps=1)
    trainer = _trainer(pl, [cb])
    with caplog.at_level("WARNING", logger="lossforecast"):
        trainer.fit(_module_class(pl)())
    assert trainer.global_step == STEPS and cb.forecaster is None
    assert any("on_train_start failed" in r.getMessage() for r in caplog.records)
