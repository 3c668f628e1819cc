"""Tests for the Hugging Face callback, on real Trainers with a tiny GPT-2 built from a config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lossforecast.integrations.transformers import LossForecastCallback  # noqa: E402

from lossforecast import Forecaster  # noqa: E402

STEPS = 40
VOCAB = 16


class LRRecorder(transformers.TrainerCallback):
    """Records the LR of group 0 at every optimizer step."""

    def __init__(self):
        self.lr: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lr.append(float(optimizer.param_groups[0]["lr"]))


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _dataset(n=80):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(16)) % VOCAB  # counting sequences: learnable
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(tmp_path, callbacks, **kwargs):
    options = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    options.update(kwargs)
    args = transformers.TrainingArguments(**options)
    return transformers.Trainer(
        model=_model(),
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(8),
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monitor": ""}, ValueError, "`monitor`"),
        ({"lr_schedule": [-1.0]}, ValueError, "negative"),
        ({"law": "cubic"}, ValueError, "`law`"),
        ({"min_points": 1}, ValueError, "`min_points`"),
    ],
)
def test_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossForecastCallback(**kwargs)


def test_state_rebuilds_the_callback():
    cb = LossForecastCallback("eval_loss", lr_schedule=[1.0, 0.5], coverage=0.9)
    state = json.loads(json.dumps(cb.state()))
    rebuilt = LossForecastCallback.from_state(state)
    assert (rebuilt.monitor, rebuilt.state()["args"]) == ("eval_loss", state["args"])


# ---------------------------------------------------------------------------- real training
def test_forecasts_on_a_real_trainer(tmp_path):
    cb, lr = LossForecastCallback(), LRRecorder()
    trainer = _trainer(tmp_path, [cb, lr], gradient_accumulation_steps=2)
    trainer.train()

    fc = cb.forecaster
    assert isinstance(fc, Forecaster)
    np.testing.assert_allclose(fc.schedule.lr, lr.lr, rtol=1e-12)
    # logged losses are means over 2 steps, placed at the mean step of their window
    assert fc.n_points == STEPS // 2 - 1
    assert fc.last_step == (2 * STEPS - 2 - 3) // 2
    final = fc.forecast()
    assert final.step == STEPS - 1 and final.low <= final.loss <= final.high
    logged = [h for h in trainer.state.log_history if "lossforecast/forecast/final_loss" in h]
    assert logged and all(math.isfinite(h["lossforecast/forecast/high"]) for h in logged)


def test_eval_metric_is_forecast(tmp_path):
    cb = LossForecastCallback("eval_loss")
    _trainer(tmp_path, [cb], eval_strategy="steps", eval_steps=10).train()
    assert cb.forecaster.n_points == 4
    assert cb.forecaster.last_step == STEPS - 1


def test_resumed_run_continues_the_same_forecast(tmp_path):
    full = LossForecastCallback()
    _trainer(tmp_path / "full", [full]).train()

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= STEPS // 2

    first = LossForecastCallback()
    _trainer(
        tmp_path / "run", [first, StopAt()], save_strategy="steps", save_steps=STEPS // 2
    ).train()
    ckpt = tmp_path / "run" / f"checkpoint-{STEPS // 2}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    observed = saved["LossForecastCallback"]["attributes"]["saved_state"]["forecaster"][
        "observations"
    ]
    assert observed["n_total"] == STEPS // 4 - 1  # 2-step windows up to step 20, less the first

    resumed = LossForecastCallback()
    _trainer(tmp_path / "run", [resumed]).train(resume_from_checkpoint=str(ckpt))
    np.testing.assert_allclose(resumed.forecaster.schedule.lr, full.forecaster.schedule.lr)
    a = full.forecaster.state_dict()["observations"]
    b = resumed.forecaster.state_dict()["observations"]
    assert a["n_total"] == b["n_total"] and a["bins"]["sum_step"] == b["bins"]["sum_step"]
    np.testing.assert_allclose(b["bins"]["sum_loss"], a["bins"]["sum_loss"], rtol=1e-4)
    assert resumed.forecaster.forecast().loss == pytest.approx(
        full.forecaster.forecast().loss, rel=1e-3
    )


def test_broken_forecaster_never_stops_training(tmp_path, monkeypatch, caplog):
    def boom(self, *args, **kwargs):
        raise RuntimeError("deliberately broken")

    monkeypatch.setattr(Forecaster, "refit", boom)
    cb = LossForecastCallback()
    trainer = _trainer(tmp_path, [cb])
    with caplog.at_level("WARNING", logger="lossforecast"):
        trainer.train()
    assert trainer.state.global_step == STEPS
    assert cb.forecast() is None
    assert sum("deliberately broken" in r.getMessage() for r in caplog.records) == 1
