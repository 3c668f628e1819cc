"""Events from the callbacks to the sinks, on real Trainers with real TensorBoard event files."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from lossforecast.integrations.lightning import LossForecastCallback  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2, metadata  # noqa: E402

from lossforecast import Event  # noqa: E402
from lossforecast.sinks import ConsoleSink, MetricsSink, Sink, TensorBoardSink  # noqa: E402
from lossforecast.sinks._tensorboard import TRAJECTORY_RUN  # noqa: E402

STEPS = 60
WAIT_AT = (20, 40)  # steps at which training waits for a new background fit


class Collect(Sink):
    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.closed = False

    def write(self, event: Event) -> None:
        self.seen.append(event)

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class Boom(Sink):
    def write(self, event: Event) -> None:
        raise RuntimeError("sink deliberately broken")


def wait_for_new_fit(forecast_cb, last_step: int, timeout: float = 30.0) -> int:
    """Block until the callback has a forecast from a fit newer than ``last_step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = forecast_cb.forecast()
        if f is not None and f.observed_step > last_step:
            return f.observed_step
        time.sleep(0.01)
    return last_step


class WaitForFits(pl.Callback):
    """Makes the short run deterministic: a new background fit is ready at each WAIT_AT step."""

    def __init__(self, forecast_cb: LossForecastCallback) -> None:
        self.forecast_cb, self.last = forecast_cb, -1

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in WAIT_AT:
            self.last = wait_for_new_fit(self.forecast_cb, self.last)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / 5, 0.5 * (1 + math.cos(math.pi * s / STEPS)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(STEPS * 8, 8, generator=g)
        y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(STEPS * 8, 1, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Steady(Tiny):
    """Tiny with a lower LR: a smooth loss curve, so the forecast's interval is narrow."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        config["lr_scheduler"]["scheduler"].base_lrs = [0.01]
        return config


def fit(cb: LossForecastCallback, logger=False, module: type[Tiny] = Tiny) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, WaitForFits(cb)],
    )
    trainer.fit(module())
    return trainer


def read(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def check_events(events: list[Event], total: int = STEPS) -> list[Event]:
    """At least two forecasts, then exactly one summary, last; returns the forecasts."""
    forecasts = [e for e in events if e.kind == "forecast" and not e.is_summary]
    assert len(forecasts) >= 2
    assert [e.is_summary for e in events].count(True) == 1 and events[-1].is_summary
    for e in forecasts:
        d = e.data
        assert d["low"] <= d["final_loss"] <= d["high"] and d["target_step"] == total - 1
        assert math.isfinite(d["observed_loss"]) and math.isfinite(d["residual"])
        t = e.trajectory
        assert t.steps[0] == e.step and t.steps[-1] == total - 1 and len(t.steps) > 2
        assert d["residual"] == pytest.approx(d["observed_loss"] - t.loss[0], abs=1e-9)
    assert "seconds_to_finish" in forecasts[-1].data
    summary = events[-1]
    assert summary.step == total - 1 and summary.data["forecasts"] == len(forecasts)
    assert summary.data["observed_step"] == forecasts[-1].data["observed_step"]
    return forecasts


# ---------------------------------------------------------------------------- Lightning
def test_lightning_writes_into_the_tensorboard_logger_run_folder(tmp_path, caplog, monkeypatch):
    import lossforecast.sinks._console as console

    monkeypatch.setattr(console, "_stdout_is_tty", lambda: True)  # as in a terminal
    caplog.set_level(logging.INFO, logger="lossforecast.sinks._console")
    cb = LossForecastCallback(every_n_steps=2)
    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = fit(cb, logger=[tb, csv])
    assert trainer.global_step == STEPS

    forecasts = check_events(cb.events)
    assert forecasts[-1].data["probe/grad_norm"] > 0 and forecasts[-1].data["probe/param_norm"] > 0
    # a healthy run: no alarms (but a stall, when WaitForFits holds training for a slow fit)
    assert not [e for e in cb.events if e.kind == "warning" and "stalled" not in e.message]
    run = Path(tb.log_dir)
    acc = read(run)
    tags = set(acc.Tags()["scalars"])
    for tag in ("final_loss", "low", "high", "residual"):
        steps = [e.step for e in acc.Scalars(f"lossforecast/forecast/{tag}")]
        assert steps == [e.step for e in forecasts], tag
    values = [e.value for e in acc.Scalars("lossforecast/observed/smoothed_loss")]
    np.testing.assert_allclose(values, [e.data["observed_loss"] for e in forecasts], rtol=1e-6)
    assert {"lossforecast/seconds_to_finish", "lossforecast/summary/reached_loss"} <= tags
    (tensor,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    (category,) = layout_pb2.Layout.FromString(tensor.tensor_proto.string_val[0]).category
    assert [c.title for c in category.chart] == [
        "final loss forecast (band: interval)",
        "predicted trajectory vs observed loss",
    ]
    trajectories = sorted((run / TRAJECTORY_RUN).iterdir())
    assert trajectories and "lossforecast/trajectory" in read(trajectories[0]).Tags()["scalars"]
    # other loggers still get the forecast through the trainer's loggers
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert {"lossforecast/forecast/low", "lossforecast/seconds_to_finish"} <= set(header.split(","))
    # the live console line is rate-limited: one in this short run, then the summary
    lines = [r.getMessage() for r in caplog.records if r.name == console.__name__]
    assert sum(m.startswith("lossforecast step") for m in lines) == 1
    assert sum(m.startswith("lossforecast summary") for m in lines) == 1


def test_lightning_default_sinks_without_tensorboard_logger_are_console_and_loggers(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="lossforecast.sinks._console")
    cb = LossForecastCallback(every_n_steps=2)
    trainer = fit(cb, logger=CSVLogger(tmp_path))
    assert [type(s) for s in cb._monitor.bus.sinks] == [ConsoleSink, MetricsSink]
    assert (Path(trainer.log_dir) / "lossforecast_scorecard.json").is_file()
    check_events(cb.events)
    # not a terminal: no live lines, only the end-of-training summary
    lines = [r.getMessage() for r in caplog.records if r.name == "lossforecast.sinks._console"]
    assert len(lines) == 1 and lines[0].startswith("lossforecast summary")


def test_a_raising_sink_never_stops_lightning_training(tmp_path, caplog):
    collect = Collect()
    cb = LossForecastCallback(every_n_steps=2, sinks=[Boom(), collect])
    with caplog.at_level("WARNING", logger="lossforecast"):
        trainer = fit(cb, logger=TensorBoardLogger(tmp_path))
    assert trainer.global_step == STEPS
    check_events(collect.seen)
    assert collect.seen == cb.events and collect.closed
    broken = [r for r in caplog.records if "sink deliberately broken" in r.getMessage()]
    assert len(broken) == 1 and "Boom" in broken[0].getMessage()
    # sinks=[...] replaces the defaults: nothing of lossforecast in the TensorBoard run
    tags = read(tmp_path / "lightning_logs" / "version_0").Tags()["scalars"]
    assert not [t for t in tags if t.startswith("lossforecast/")]


@pytest.mark.parametrize("auto_stop", [False, True])
def test_lightning_advice_and_auto_stop(tmp_path, auto_stop):
    cb = LossForecastCallback(every_n_steps=2, target_loss=1e-3, auto_stop=auto_stop, sinks=[])
    trainer = fit(cb, logger=CSVLogger(tmp_path), module=Steady)
    stops = [e for e in cb.events if e.kind == "advice" and e.data["stop"] == 1]
    assert stops and stops[0].data["advice"] == "target_unreachable"
    assert stops[0].data["eta"] and 0 < stops[0].data["progress"] < 1
    checkpoints = list(Path(trainer.log_dir, "checkpoints").glob("lossforecast-stop-step=*.ckpt"))
    if auto_stop:
        assert trainer.global_step < STEPS and cb.status().stop_reason == stops[0].message
        assert [c.name for c in checkpoints] == [
            f"lossforecast-stop-step={trainer.global_step}.ckpt"
        ]
        assert (
            "LossForecastCallback{'monitor': 'train_loss'}"
            in torch.load(checkpoints[0], weights_only=False)["callbacks"]
        )
    else:  # advice only: the run goes on
        assert trainer.global_step == STEPS and not checkpoints
        assert cb.status().stop_reason is None


def optuna_trial_against(best: float):
    """A fresh trial of a study whose finished trial reached ``best``, with a ForecastPruner."""
    optuna = pytest.importorskip("optuna")
    from lossforecast.integrations.optuna import ForecastPruner

    study = optuna.create_study(pruner=ForecastPruner(min_progress=0.2))
    study.add_trial(optuna.trial.create_trial(value=best))
    return study, study.ask()


@pytest.mark.parametrize(("best", "pruned"), [(1e-3, True), (10.0, False)])
def test_lightning_trial_is_pruned_only_when_the_forecast_loses(best, pruned):
    from lossforecast.integrations.optuna import forecast_value

    study, trial = optuna_trial_against(best)
    cb = LossForecastCallback(every_n_steps=2, trial=trial, sinks=[])
    trainer = fit(cb, module=Steady)
    assert cb.pruned == pruned and (trainer.global_step < STEPS) == pruned
    assert len(study.trials[-1].intermediate_values) >= 5  # the window losses, reported
    if pruned:
        stored = study.trials[-1].user_attrs["lossforecast_forecast"]
        assert forecast_value(trial) == stored > best
    else:
        assert forecast_value(trial) is None


def test_sinks_must_have_write():
    with pytest.raises(TypeError, match="write"):
        LossForecastCallback(sinks=[object()])
    with pytest.raises(TypeError, match="`sinks` must be a list"):
        LossForecastCallback(sinks="console")
    assert LossForecastCallback().events == []


# ---------------------------------------------------------------------------- Hugging Face
def hf_train(tmp_path, report_to: str | list[str], *, check: bool = True, **options):
    """A 40-step GPT-2 run of a real HF Trainer with the callback; returns (callback, trainer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lossforecast.integrations.transformers import LossForecastCallback as HFCallback

    class Wait(transformers.TrainerCallback):
        def __init__(self, cb):
            self.cb, self.last = cb, -1

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (14, 28):
                self.last = wait_for_new_fit(self.cb, self.last)

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0
    )
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 16, (80, 1), generator=g) + torch.arange(16)) % 16
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        logging_steps=2,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    cb = HFCallback(**options)
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=[{"input_ids": r, "labels": r} for r in ids],
        callbacks=[cb, Wait(cb)],
    )
    trainer.train()
    if not check:
        return cb, trainer
    forecasts = check_events(cb.events, total=40)
    # the probes ran on the GPT-2 (its sdpa attention and LM head found automatically)
    probed = forecasts[-1].data
    assert probed["probe/attn_logit_max"] > 0 and math.isfinite(probed["probe/output_logsumexp"])
    assert probed["probe/grad_norm"] > 0 and probed["probe/update_ratio"] > 0
    card = json.loads((tmp_path / "lossforecast_scorecard.json").read_text())  # output_dir
    assert card["reached_loss"] == pytest.approx(cb.events[-1].data["reached_loss"])
    assert cb.status().progress == 1.0 and cb.status().forecast is not None
    return cb, trainer


def test_hf_report_to_tensorboard_gets_the_lossforecast_scalars(tmp_path):
    hf_train(tmp_path, "tensorboard")
    (run,) = (tmp_path / "runs").iterdir()  # HF's own run folder, shared
    tags = set(read(run).Tags()["scalars"])
    assert {"train/loss", "lossforecast/forecast/final_loss", "lossforecast/forecast/high"} <= tags
    assert "lossforecast/summary/reached_loss" in tags
    assert not any(t.startswith("train/lossforecast") for t in tags)  # one place: the sink
    assert (run / TRAJECTORY_RUN).is_dir()


def test_hf_auto_stop_saves_a_checkpoint_and_stops(tmp_path, caplog):
    cb, trainer = hf_train(tmp_path, [], check=False, target_loss=1e-3, auto_stop=True)
    stops = [e for e in cb.events if e.kind == "advice" and e.data["stop"] == 1]
    assert stops and stops[0].data["advice"] == "target_unreachable"
    assert trainer.state.global_step < 40 and cb.status().stop_reason == stops[0].message
    (checkpoint,) = tmp_path.glob("checkpoint-*")
    assert checkpoint.name == f"checkpoint-{trainer.state.global_step}"
    assert any("auto_stop" in r.getMessage() for r in caplog.records)


def test_hf_trial_is_pruned_with_its_forecast_stored(tmp_path):
    study, trial = optuna_trial_against(1e-3)
    cb, trainer = hf_train(tmp_path, [], check=False, trial=trial)
    assert cb.pruned and trainer.state.global_step < 40
    assert study.trials[-1].user_attrs["lossforecast_forecast"] > 1e-3


# ---------------------------------------------------------------------------- other trackers
@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A local MLflow file store, set as the tracking URI (HF's reporter reads the variable)."""
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "0")
    return uri


def mlflow_metrics(tracking_uri: str) -> dict[str, list]:
    """Metric name -> history of the single MLflow run in a local file store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {name: client.get_metric_history(run.info.run_id, name) for name in run.data.metrics}


def test_hf_report_to_mlflow_gets_the_forecasts(tmp_path, mlflow_uri):
    cb, _ = hf_train(tmp_path, "mlflow")
    metrics = mlflow_metrics(mlflow_uri)
    forecasts = [e for e in cb.events if e.kind == "forecast" and not e.is_summary]
    logged = metrics["lossforecast/forecast/final_loss"]
    assert len(logged) == len(forecasts)  # the reporter ran before the callback: told directly
    np.testing.assert_allclose(
        [m.value for m in logged], [e.data["final_loss"] for e in forecasts], rtol=1e-6
    )
    assert {"lossforecast/summary/reached_loss", "lossforecast/seconds_to_finish"} <= set(metrics)
    assert "loss" in metrics  # the Trainer's own metrics are still there


def test_hf_log_to_loggers_false_keeps_reporters_clean(tmp_path, mlflow_uri):
    _, trainer = hf_train(tmp_path, "mlflow", log_to_loggers=False)
    assert not [m for m in mlflow_metrics(mlflow_uri) if m.startswith("lossforecast/")]
    assert not any("lossforecast/forecast/final_loss" in h for h in trainer.state.log_history)


def test_lightning_mlflow_logger_gets_the_forecasts(mlflow_uri):
    from lightning.pytorch.loggers import MLFlowLogger

    cb = LossForecastCallback(every_n_steps=2)
    fit(cb, logger=MLFlowLogger(tracking_uri=mlflow_uri))
    forecasts = check_events(cb.events)
    metrics = mlflow_metrics(mlflow_uri)
    logged = metrics["lossforecast/forecast/final_loss"]
    np.testing.assert_allclose(
        [m.value for m in logged], [e.data["final_loss"] for e in forecasts], rtol=1e-6
    )
    assert "lossforecast/summary/reached_loss" in metrics


def test_lightning_wandb_offline_gets_the_forecasts(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cb = LossForecastCallback(every_n_steps=2)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lossforecast-test")
    try:
        fit(cb, logger=logger)
        summary = logger.experiment.summary._as_dict()  # the last value logged per key
        forecasts = check_events(cb.events)
        assert summary["lossforecast/summary/reached_loss"] == pytest.approx(
            cb.events[-1].data["reached_loss"]
        )
        assert summary["lossforecast/forecast/final_loss"] == pytest.approx(
            forecasts[-1].data["final_loss"]
        )
    finally:
        logger.experiment.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


# ---------------------------------------------------------------------------- defaults
def test_default_sinks_helper(tmp_path):
    from lossforecast._monitor import default_sinks

    assert [type(s) for s in default_sinks()] == [ConsoleSink]
    sinks = default_sinks(log_dir=tmp_path)
    assert [type(s) for s in sinks] == [ConsoleSink, TensorBoardSink]
    assert sinks[1].log_dir == str(tmp_path)
