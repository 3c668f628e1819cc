"""Tests for the instability detectors (lossforecast._detectors, _trends, _health, _spikes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lossforecast._detectors import (
    DEFAULT_RULES,
    BadBatchLog,
    InstabilityDetector,
    MeanStdSpikeRule,
    TrendRule,
)
from lossforecast._trends import growth_of

EVERY = 20


def feed(det: InstabilityDetector, name: str, values, start: int = 0, every: int = EVERY):
    events = []
    for i, v in enumerate(values):
        events += det.observe_metrics(start + i * every, {name: float(v)})
    return events


# ---------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 2}, "`window`"),
        ({"spike_sigma": 0}, "`spike_sigma`"),
        ({"spike_window": 16, "min_history": 32}, "`min_history`"),
        ({"divergence_factor": 1.0}, "`divergence_factor`"),
        ({"patience": 0}, "`patience`"),
        ({"throughput_drop": 1.5}, "`throughput_drop`"),
        ({"amp_skip_run": 0}, "`amp_skip_run`"),
        ({"stall_seconds": -1}, "`stall_seconds`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InstabilityDetector(**kwargs)


def test_bad_rule_and_unknown_option():
    with pytest.raises(TypeError, match="TrendRule"):
        InstabilityDetector(rules={"x": 3})
    with pytest.raises(TypeError, match="unexpected"):
        InstabilityDetector(stal_factor=3)
    with pytest.raises(TypeError, match="BadBatchLog"):
        InstabilityDetector(bad_batches="x.json")


# ---------------------------------------------------------------------------- growth
def test_growth_of_exact_doubling_time_and_deceleration():
    s = np.arange(0, 160, 20.0)
    g = growth_of(s, 3.0 * 2.0 ** (s / 50.0))
    assert g.doubling_steps == pytest.approx(50.0)
    assert g.growth == pytest.approx(2 ** (140 / 50))
    assert g.rising == 1.0 and g.accel == pytest.approx(1.0)
    sat = growth_of(s, 10 - 9 * np.exp(-s / 40))
    assert sat.accel < 0.5


@pytest.mark.parametrize("doubling", [30, 60, 120])
def test_exponential_attention_growth_warns_with_its_doubling_time(doubling):
    det = InstabilityDetector()
    steps = np.arange(0, 2000, EVERY)
    values = 5.0 * 2.0 ** (steps / doubling)
    events = feed(det, "attn_logit_max", values[values < 7e4])
    assert events, "no warning on exponential growth"
    first = events[0]
    assert first.kind == "warning"
    assert first.data["doubling_steps"] == pytest.approx(doubling, rel=1e-6)
    assert first.data["value"] >= DEFAULT_RULES["attn_logit_max"].floor
    assert f"doubling every {doubling} steps" in first.message
    assert "qk-layernorm" in first.message and "since" not in first.message.split(":")[0]
    assert "up from" in first.message
    # one warning and one critical per episode, no repeats
    severities = [e.severity for e in events]
    assert severities.count("critical") == 1
    assert severities.count("warning") <= 1
    assert severities.index("critical") == len(severities) - 1


def test_critical_when_past_the_literature_level():
    det = InstabilityDetector()
    events = feed(det, "attn_logit_max", [2e4] * 5)
    assert [e.severity for e in events] == ["critical"]
    assert "1e+04" in events[0].message


def test_per_layer_values_name_the_worst_layer():
    det = InstabilityDetector()
    events = []
    for s in range(0, 600, EVERY):
        v = 5.0 * 2 ** (s / 40)
        m = {"attn_logit_max": v, "attn_logit_max/layer0": v / 3, "attn_logit_max/layer1": v}
        events += det.observe_metrics(s, m)
        if events:
            break
    assert events[0].data["worst"] == "layer1"
    assert "layer1" in events[0].message


def _saturating(lo, hi, steps, tau, noise, seed):
    rng = np.random.default_rng(seed)
    base = lo + (hi - lo) * (1 - np.exp(-np.maximum(steps - 100, 0) / tau))
    return base * np.exp(rng.normal(0, noise, len(steps)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_saturating_growth_does_not_warn(seed):
    """Healthy controls: log Z and grad norm rise 2-3.6x after step 100, logits settle."""
    det = InstabilityDetector()
    steps = np.arange(0, 3000, EVERY)
    logz = _saturating(4.0, 14.0, steps, 300, 0.05, seed)
    grad = _saturating(0.5, 1.8, steps, 200, 0.3, seed + 10)
    attn = _saturating(3.0, 45.0, steps, 400, 0.1, seed + 20)
    logit = _saturating(5.0, 25.0, steps, 300, 0.05, seed + 30)
    events = []
    for i, s in enumerate(steps):
        metrics = {
            "output_logsumexp": logz[i],
            "grad_norm": grad[i],
            "attn_logit_max": attn[i],
            "output_logit_max": logit[i],
            "adam_v_rms_over_eps": 1e4,
            "nonfinite_grads": 0.0,
        }
        events += det.observe_metrics(int(s), metrics)
    assert events == []


def test_slow_growth_below_the_floor_does_not_warn():
    det = InstabilityDetector()
    steps = np.arange(0, 2000, EVERY)
    assert feed(det, "attn_logit_max", 2.0 * 2 ** (steps / 800)) == []


def test_trend_rearms_only_after_it_clears():
    det = InstabilityDetector(horizon=0)
    rise = 60.0 * 2.0 ** (np.arange(12) / 2)
    first = feed(det, "attn_logit_max", rise)
    assert [e.severity for e in first] == ["warning"]
    # still growing, then flat for a while: nothing new
    flat = [rise[-1]] * 4
    assert feed(det, "attn_logit_max", flat, start=12 * EVERY) == []
    # calm for a full window, then a new episode warns again
    calm = [60.0] * det.window
    assert feed(det, "attn_logit_max", calm, start=16 * EVERY) == []
    again = feed(det, "attn_logit_max", rise, start=(16 + det.window) * EVERY)
    assert [e.severity for e in again] == ["warning"]


def test_custom_rule_adds_a_metric():
    rule = TrendRule("update ratio", floor=0.01, critical=None, min_growth=2.0, remedy="lower LR")
    det = InstabilityDetector(rules={**DEFAULT_RULES, "update_ratio": rule})
    events = feed(det, "update_ratio", 0.01 * 2 ** (np.arange(20) / 3))
    assert events and events[0].data["metric"] == "update_ratio"


# ---------------------------------------------------------------------------- other metrics
def test_nonfinite_gradients_warn_without_amp_only():
    det = InstabilityDetector()
    events = det.observe_metrics(0, {"nonfinite_grads": 2.0, "grad_norm": math.inf})
    assert [e.severity for e in events] == ["critical"]
    assert det.observe_metrics(20, {"nonfinite_grads": 2.0}) == []  # not repeated

    amp = InstabilityDetector()
    amp.observe_amp(0, 65536.0, True)
    assert amp.observe_metrics(0, {"nonfinite_grads": 2.0, "grad_norm": math.inf}) == []


def test_overflowed_probe_value_is_critical():
    det = InstabilityDetector()
    events = det.observe_metrics(0, {"attn_logit_max": math.inf})
    assert [e.severity for e in events] == ["critical"]
    assert "attn_logit_max" in events[0].message


def test_gradient_rms_at_adam_eps_warns_once():
    det = InstabilityDetector()
    assert det.observe_metrics(0, {"adam_v_rms_over_eps": 50.0}) == []
    events = det.observe_metrics(20, {"adam_v_rms_over_eps": 0.5})
    assert len(events) == 1 and "ε" in events[0].message
    assert det.observe_metrics(40, {"adam_v_rms_over_eps": 0.4}) == []


# ---------------------------------------------------------------------------- loss
def forecast(step):
    return 2.0 + 3.0 * (step + 10) ** -0.3


def test_spike_is_a_residual_against_the_forecast():
    rng = np.random.default_rng(0)
    det = InstabilityDetector()
    events = []
    for s in range(300):
        loss = forecast(s) + rng.normal(0, 0.01)
        if s == 250:
            loss += 0.4
        events += det.observe_loss(s, loss, predicted=forecast(s))
    assert [(e.step, e.severity) for e in events] == [(250, "warning")]
    e = events[0]
    assert "forecast" in e.message and "lower the LR" in e.message
    assert e.data["expected"] == pytest.approx(forecast(250))
    assert e.data["z"] > 8


def test_forecast_residual_tracks_a_steep_expected_drop():
    """An LR cooldown makes the loss fall fast; against the forecast that is no spike, and a
    bump the forecast did not expect is one even though it stays below the moving median."""
    rng = np.random.default_rng(1)

    def cooldown(s):
        return 3.0 - 0.6 * max(0, s - 200) / 100 if s < 300 else 2.4

    det, bare = InstabilityDetector(spike_rel=0.02), InstabilityDetector(spike_rel=0.02)
    with_fc, without = [], []
    for s in range(300):
        loss = cooldown(s) + rng.normal(0, 0.005) + (0.08 if s == 290 else 0.0)
        with_fc += det.observe_loss(s, loss, predicted=cooldown(s))
        without += bare.observe_loss(s, loss)
    assert [e.step for e in with_fc] == [290]
    assert without == []  # the moving median lags the drop and misses it


def test_given_scale_replaces_the_robust_sigma():
    det = InstabilityDetector(spike_rel=0.0)
    for s in range(40):
        det.observe_loss(s, 3.0, predicted=3.0)
    assert det.observe_loss(40, 3.5, predicted=3.0, scale=0.1) == []  # 5σ < 8σ
    assert len(det.observe_loss(41, 4.0, predicted=3.0, scale=0.1)) == 1


def test_nan_loss_warns_once_per_episode_and_diverges():
    det = InstabilityDetector()
    for s in range(50):
        det.observe_loss(s, 3.0 - s * 0.01)
    events = det.observe_loss(50, math.nan)
    assert [e.severity for e in events] == ["critical"]
    assert "non-finite loss" in events[0].message
    assert not det.diverged
    more = det.observe_loss(51, math.nan) + det.observe_loss(52, math.inf)
    assert det.diverged
    assert [("diverged" in e.message) for e in more] == [True]
    det.observe_loss(53, 2.6)
    assert not det.diverged
    assert len(det.observe_loss(54, math.nan)) == 1  # re-armed by the finite loss


def test_loss_above_twice_its_best_is_divergence():
    det = InstabilityDetector()
    for s in range(40):
        det.observe_loss(s, 2.0)
    det.observe_loss(40, 4.5)
    det.observe_loss(41, 4.6)
    assert not det.diverged
    events = det.observe_loss(42, 4.7)
    assert det.diverged and any("diverged" in e.message for e in events)
    assert det.best_loss == 2.0


def test_single_nan_under_amp_is_not_news():
    det = InstabilityDetector()
    det.observe_amp(0, 1024.0, False)
    assert det.observe_loss(1, math.nan) == []
    assert det.observe_loss(2, 3.0) == []
    assert det.observe_loss(3, math.nan) == []
    assert [e.severity for e in det.observe_loss(4, math.nan)] == ["critical"]


def test_rollback_advice_names_the_checkpoint_before_the_spike(tmp_path):
    log = BadBatchLog(tmp_path / "skip.json")
    det = InstabilityDetector(bad_batches=log)
    det.note_checkpoint(100, "ckpt/step100.pt")
    det.note_checkpoint(200, "ckpt/step200.pt")
    for s in range(150):
        det.observe_loss(s, 3.0 + 0.01 * (s % 3), predicted=3.0)
    events = det.observe_loss(150, 5.0, predicted=3.0, batch_idx=17)
    assert "roll back to ckpt/step100.pt (step 100)" in events[0].message
    assert json.loads((tmp_path / "skip.json").read_text()) == [16, 17]
    details = json.loads((tmp_path / "skip.details.json").read_text())
    assert details["records"] == [
        {
            "step": 150,
            "batch_idx": 17,
            "loss": 5.0,
            "reason": "spike",
            "checkpoint": "ckpt/step100.pt",
        }
    ]


# ---------------------------------------------------------------------------- run health
def test_stall_far_above_the_rolling_baseline():
    rng = np.random.default_rng(0)
    det = InstabilityDetector()
    times = 0.5 + rng.normal(0, 0.02, 100)
    assert [e for s, t in enumerate(times) for e in det.observe_step_time(s, t)] == []
    assert det.observe_step_time(100, 1.2) == []  # slower, but not a stall
    events = det.observe_step_time(101, 30.0)
    assert len(events) == 1 and "stalled" in events[0].message
    assert det.observe_step_time(102, 31.0) == []  # same stall
    det.observe_step_time(103, 0.5)
    assert len(det.observe_step_time(104, 30.0)) == 1  # re-armed


def test_short_steps_never_stall_on_jitter():
    det = InstabilityDetector()
    for s in range(100):
        det.observe_step_time(s, 0.01)
    assert det.observe_step_time(100, 0.2) == []  # 20x, but only 0.19 s longer


def test_slowdown_and_throughput_drop():
    det = InstabilityDetector()
    events = []
    for s in range(100):
        events += det.observe_step_time(s, 0.5 if s < 70 else 1.2)
    assert len(events) == 1 and "step time rose" in events[0].message
    drops = []
    for s in range(100):
        drops += det.observe_throughput(s, 1000.0 if s < 70 else 600.0, name="tokens/s")
    assert len(drops) == 1 and "tokens/s dropped" in drops[0].message


def test_amp_single_skips_are_normal_runs_and_collapse_warn():
    det = InstabilityDetector()
    scale, events = 65536.0, []
    for s in range(4):  # the usual calibration at the start: several skips in a row
        scale /= 2
        events += det.observe_amp(s, scale, True)
    for s in range(4, 100):
        skipped = s % 25 == 0  # an occasional skip
        scale = scale / 2 if skipped else scale
        events += det.observe_amp(s, scale, skipped)
    assert events == []
    for s in range(100, 108):
        scale /= 2
        events += det.observe_amp(s, scale, True)
    assert [e.severity for e in events] == ["warning"]
    assert "8 optimizer steps in a row" in events[0].message
    critical = []
    for s in range(108, 120):
        scale /= 2
        critical += det.observe_amp(s, scale, True)
    assert [e.severity for e in critical] == ["critical"]
    assert "collapsed" in critical[0].message


# ---------------------------------------------------------------------------- state
def test_state_dict_round_trip_is_json_safe_and_continues_identically():
    rng = np.random.default_rng(3)
    a = InstabilityDetector()
    for s in range(0, 200):
        a.observe_loss(s, 3.0 + rng.normal(0, 0.01), predicted=3.0)
        a.observe_step_time(s, 0.3)
        if s % EVERY == 0:
            a.observe_metrics(s, {"attn_logit_max": 5.0 * 2 ** (s / 60)})
    a.note_checkpoint(150, "c150")
    state = json.loads(json.dumps(a.state_dict()))
    assert state["version"] == 1
    b = InstabilityDetector()
    frozen = json.dumps(state)
    b.load_state_dict(state)
    assert json.dumps(state) == frozen  # not modified
    for s in range(200, 600):
        m = {"attn_logit_max": 5.0 * 2 ** (s / 60)} if s % EVERY == 0 else None
        ea = (a.observe_metrics(s, m) if m else []) + a.observe_loss(s, 3.0, predicted=3.0)
        eb = (b.observe_metrics(s, m) if m else []) + b.observe_loss(s, 3.0, predicted=3.0)
        assert [e.message for e in ea] == [e.message for e in eb]
    with pytest.raises(ValueError, match="version"):
        b.load_state_dict({**state, "version": 99})


# ---------------------------------------------------------------------------- baseline rule
def test_mean_std_rule_matches_the_production_definition():
    with pytest.raises(ValueError, match="`min_history`"):
        MeanStdSpikeRule(window=10, min_history=20)
    with pytest.raises(ValueError, match="`n_sigma`"):
        MeanStdSpikeRule(n_sigma=0)
    rng = np.random.default_rng(0)
    rule = MeanStdSpikeRule()
    values = 3.0 + rng.normal(0, 0.01, 200)
    events = [e for s, v in enumerate(values) for e in rule.observe(s, v)]
    events += rule.observe(200, math.nan)  # filtered, as in OLMo/levanter
    assert events == []
    window = values[-128:]
    threshold = window.mean() + 6 * window.std()
    assert rule.observe(201, threshold - 1e-4) == []
    spike = rule.observe(202, threshold + 0.05)
    assert len(spike) == 1 and spike[0].data["rule"] == "mean_std"
    assert MeanStdSpikeRule(min_history=64).observe(0, 100.0) == []  # inactive before 64 values


# ---------------------------------------------------------------------------- bad batches
def test_bad_batch_log_has_lightnings_exact_file_shape(tmp_path):
    pytest.importorskip("torchmetrics")
    spike = pytest.importorskip("lightning.fabric.utilities.spike")

    class Fabric:
        global_rank = 0

    theirs = spike.SpikeDetection(exclude_batches_path=str(tmp_path / "lightning.json"))
    ours = BadBatchLog(tmp_path / "ours.json")
    for batch in (5, 9):
        with pytest.raises(spike.TrainingSpikeException):
            theirs._handle_spike(Fabric(), batch)
        ours.record(1000 + batch, batch_idx=batch, loss=7.0)
    assert (tmp_path / "ours.json").read_text() == (tmp_path / "lightning.json").read_text()


def test_bad_batch_log_defaults_and_never_raises(tmp_path, caplog):
    log = BadBatchLog(tmp_path)
    assert log.path == tmp_path / "skip_batches.json"
    log.record(0, loss=math.inf, reason="nonfinite")  # no batch index: the step stands in
    assert json.loads(log.path.read_text()) == [0]
    assert log.records[0]["loss"] is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    bad = BadBatchLog(blocked / "sub" / "x.json")  # parent is a file
    bad.record(3)
    bad.record(4)
    assert caplog.text.count("could not write the bad-batch log") == 1
    with pytest.raises(ValueError, match="`path`"):
        BadBatchLog("")
