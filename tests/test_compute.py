"""Tests for the peak-FLOPs table, the ComputeMeter and the cost-to-finish forecast."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lossforecast import Forecaster
from lossforecast._compute import (
    JOULES_PER_KWH,
    PEAK_FLOPS,
    ComputeMeter,
    CostForecast,
    WorldEnergy,
    cost_to_finish,
    device_key,
    peak_flops,
)

T = 1e12


# ------------------------------------------------------------------ peak table
@pytest.mark.parametrize(("name", "dtype", "expected"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4 * T),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.7 * T),
    ("NVIDIA H100 PCIe", "fp16", 756 * T),
    ("NVIDIA H100 NVL", "bf16", 835.5 * T),
    ("NVIDIA H200", "bf16", 989.4 * T),
    ("NVIDIA H200 NVL", "bf16", 835.5 * T),
    ("NVIDIA GH200 480GB", "bf16", 989.4 * T),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312 * T),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156 * T),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5 * T),
    ("NVIDIA A100 80GB PCIe", "bf16", 312 * T),
    ("NVIDIA A10", "bf16", 125 * T),
    ("NVIDIA A10G", "bf16", 125 * T),
    ("NVIDIA L4", "bf16", 121 * T),
    ("NVIDIA L40", "bf16", 181.05 * T),
    ("NVIDIA L40S", "bf16", 362.05 * T),
    ("Tesla V100-SXM2-16GB", "fp16", 125 * T),
    ("Tesla V100-PCIE-32GB", "fp16", 112 * T),
    ("Tesla V100S-PCIE-32GB", "fp16", 130 * T),
    ("Tesla T4", "fp16", 65 * T),
    ("NVIDIA GeForce RTX 3090", "bf16", 71 * T),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2 * T),
    ("AMD Instinct MI250X", "bf16", 383 * T),
    ("AMD Instinct MI250X/MI250", "fp16", 383 * T),
    ("AMD Instinct MI300X", "bf16", 1307.4 * T),
    ("nvidia h100 80gb hbm3", "torch.bfloat16", 989.4 * T),  # case and torch names
    ("NVIDIA H100 80GB HBM3", "float32", 67 * T),
    ("NVIDIA H100 80GB HBM3", "half", 989.4 * T),
])  # fmt: skip
def test_peak_flops_of_common_accelerators(name, dtype, expected):
    assert peak_flops(name, dtype) == pytest.approx(expected)


@pytest.mark.parametrize("name", [
    "NVIDIA GeForce RTX 3090 Ti",
    "NVIDIA GeForce RTX 4090 Laptop GPU",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA A40",
    "NVIDIA RTX A6000",
    "cpu",
    "",
])  # fmt: skip
def test_unknown_devices_have_no_peak(name):
    assert device_key(name) is None
    assert peak_flops(name) is None


@pytest.mark.parametrize(("name", "dtype"), [
    ("Tesla V100-SXM2-16GB", "bf16"),  # no bf16 on Volta
    ("Tesla T4", "tf32"),
    ("AMD Instinct MI250X", "tf32"),
])  # fmt: skip
def test_dtype_without_a_fast_path_has_no_peak(name, dtype):
    assert peak_flops(name, dtype) is None


def test_peak_flops_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        peak_flops("NVIDIA H100 80GB HBM3", "int3")


def test_table_holds_dense_figures_in_a_sane_order():
    for device, peaks in PEAK_FLOPS.items():
        assert set(peaks) <= {"bf16", "fp16", "tf32", "fp32"}, device
        assert max(peaks.values()) < 1.5e15, device  # sparse figures would go past this
        if "tf32" in peaks:
            assert peaks["fp32"] <= peaks["tf32"] <= peaks["bf16"], device


# ------------------------------------------------------------------ ComputeMeter
class FixedEnergy:
    """An energy source with fixed readings (what an EnergyMonitor returns)."""

    def __init__(self, joules=7_200.0, watts=250.0):
        self._joules, self._watts = joules, watts

    def joules(self):
        return self._joules

    def watts(self):
        return self._watts


def run_meter(meter, seconds_per_step=0.25, steps=21):
    for step in range(steps):
        meter.record_step(step, now=100.0 + seconds_per_step * step)
    return meter


def test_meter_throughput_and_mfu_arithmetic():
    meter = run_meter(ComputeMeter(flops_per_step=5e13, tokens_per_step=8192, peak_flops=989.4e12))
    m = meter.metrics()
    assert m["compute/seconds_per_step"] == pytest.approx(0.25)
    assert m["compute/tokens_per_second"] == pytest.approx(8192 / 0.25)
    assert m["compute/flops_per_second"] == pytest.approx(2e14)
    assert m["compute/mfu"] == pytest.approx(2e14 / 989.4e12)
    assert not any(k.endswith(("watts", "joules", "kwh", "joules_per_step")) for k in m)


def test_meter_energy_metrics_and_world_size():
    meter = run_meter(
        ComputeMeter(flops_per_step=1e12, peak_flops=1e14, energy=FixedEnergy(), world_size=4)
    )
    m = meter.metrics(prefix="")
    assert m["watts"] == 1_000.0 and m["joules"] == 28_800.0
    assert m["kwh"] == pytest.approx(28_800.0 / JOULES_PER_KWH)
    assert m["joules_per_step"] == pytest.approx(1_000.0 * 0.25)
    assert meter.joules_per_step == pytest.approx(250.0)
    assert m["flops_per_second"] == pytest.approx(4 * 4e12)
    assert m["mfu"] == pytest.approx(4e12 / 1e14)  # the same on every rank


def test_world_energy_stands_in_for_ranks_that_did_not_measure():
    energy = WorldEnergy()
    assert energy.joules() is None and energy.watts() is None  # before the first sum
    energy.update(joules=900.0, watts=300.0, ranks=3, world_size=3)
    assert (energy.joules(), energy.watts()) == (900.0, 300.0)  # every rank measured
    # one rank has no power reading yet: its share is the others' mean, not 0 W
    energy.update(joules=900.0, watts=200.0, ranks=3, world_size=3, watt_ranks=2)
    assert (energy.joules(), energy.watts()) == (900.0, 300.0)
    energy.update(joules=0.0, watts=0.0, ranks=0, world_size=3, watt_ranks=0)
    assert energy.joules() is None and energy.watts() is None and energy.ranks == 0
    meter = ComputeMeter(energy=energy, world_size=3)
    assert "compute/watts" not in meter.metrics()


def test_meter_rolls_over_its_window_and_ignores_repeated_steps():
    meter = ComputeMeter(window=10)
    for step in range(50):
        meter.record_step(step, now=float(step))  # 1 s per step ...
    for step in range(50, 60):
        meter.record_step(step, now=49.0 + 0.1 * (step - 49))  # ... then 0.1 s
        meter.record_step(step, now=1e9)  # a second call for the same step is ignored
    assert meter.seconds_per_step == pytest.approx(0.1)


def test_meter_without_data_gives_no_rates():
    meter = ComputeMeter(energy=FixedEnergy(watts=None))
    assert meter.metrics() == {"compute/joules": 7_200.0, "compute/kwh": 7_200.0 / 3.6e6}
    meter.record_step(0, now=1.0)
    assert meter.seconds_per_step is None and meter.joules_per_step is None


def test_meter_survives_an_energy_source_that_raises():
    class Broken:
        def joules(self):
            raise RuntimeError("gone")

        def watts(self):
            return math.nan

    meter = run_meter(ComputeMeter(energy=Broken()))
    assert set(meter.metrics()) == {"compute/seconds_per_step"}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"flops_per_step": 0}, "`flops_per_step`"),
    ({"tokens_per_step": -1}, "`tokens_per_step`"),
    ({"peak_flops": math.inf}, "`peak_flops`"),
    ({"window": 0}, "`window`"),
    ({"world_size": 1.5}, "`world_size`"),
])  # fmt: skip
def test_meter_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ComputeMeter(**kwargs)


def test_meter_rejects_an_energy_object_without_joules():
    with pytest.raises(TypeError, match="`energy`"):
        ComputeMeter(energy=object())


def test_meter_flops_can_be_set_later_and_are_checked():
    meter = ComputeMeter()
    meter.flops_per_step = 3e9
    assert meter.flops_per_step == 3e9
    with pytest.raises(ValueError, match="`flops_per_step`"):
        meter.flops_per_step = -1.0


# ------------------------------------------------------------------ cost to finish
TOTAL = 2_000


@pytest.fixture(scope="module")
def fitted():
    """A Forecaster fitted on 40% of a synthetic warmup + cosine run."""
    rng = np.random.default_rng(0)
    warmup = 100
    s = np.arange(TOTAL)
    lr = np.where(
        s < warmup,
        1e-3 * (s + 1) / warmup,
        1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * (s - warmup) / (TOTAL - warmup))),
    )
    area = np.cumsum(lr) / 1e-3
    loss = 2.5 + 3.0 * (area + 1) ** -0.4 - 0.3 * (1e-3 - lr) / 1e-3
    fc = Forecaster(lr)
    for step in range(0, 800, 4):
        fc.update(step, loss[step] + rng.normal(0, 0.01))
    assert fc.refit()
    return fc


def test_costs_to_finish_are_remaining_steps_times_per_step(fitted):
    c = cost_to_finish(fitted, 799, seconds_per_step=0.2, joules_per_step=50.0, flops_per_step=1e12)
    assert isinstance(c, CostForecast)
    assert c.steps_to_finish == TOTAL - 1 - 799 == 1200
    assert c.seconds_to_finish == pytest.approx(1200 * 0.2)
    assert c.joules_to_finish == pytest.approx(1200 * 50.0)
    assert c.kwh_to_finish == pytest.approx(1200 * 50.0 / 3.6e6)
    assert c.flops_to_finish == pytest.approx(1.2e15)
    loss, _, _ = fitted.trajectory([799, TOTAL - 1], refit=False)
    assert c.loss_now == pytest.approx(loss[0]) and c.final_loss == pytest.approx(loss[1])
    assert c.loss_gain == pytest.approx(loss[0] - loss[1]) and c.loss_gain > 0
    assert c.loss_gain_per_kwh == pytest.approx(c.loss_gain / c.kwh_to_finish)
    assert c.target_loss_step is None


def test_target_step_is_the_first_on_the_trajectory(fitted):
    steps = np.arange(799, TOTAL)
    loss = fitted.trajectory(steps, refit=False)[0]
    target = float(0.5 * (loss[0] + loss[-1]))
    expected = int(steps[np.argmax(loss <= target)])
    c = cost_to_finish(fitted, 799, seconds_per_step=0.2, joules_per_step=50.0, target_loss=target)
    assert c.target_loss_step == expected
    assert c.seconds_to_target == pytest.approx((expected - 799) * 0.2)
    assert c.joules_to_target == pytest.approx((expected - 799) * 50.0)
    assert c.kwh_to_target == pytest.approx((expected - 799) * 50.0 / 3.6e6)
    data = c.data()
    assert data["cost/target_loss_step"] == expected
    assert data["cost/kwh_to_target"] == pytest.approx(c.kwh_to_target)
    assert data["joules_to_finish"] == pytest.approx(60_000.0)
    assert f"at step {expected}" in c.summary()


def test_target_already_reached_and_unreachable(fitted):
    loss = fitted.trajectory([799, TOTAL - 1], refit=False)[0]
    now = cost_to_finish(fitted, 799, joules_per_step=1.0, target_loss=float(loss[0]) + 0.5)
    assert now.target_loss_step == 799 and now.joules_to_target == 0.0
    never = cost_to_finish(fitted, 799, joules_per_step=1.0, target_loss=float(loss[1]) - 0.05)
    assert never.target_loss_step is None and never.kwh_to_target is None
    assert "cost/target_loss_step" not in never.data()
    assert never.data()["cost/target_loss"] == pytest.approx(float(loss[1]) - 0.05)
    assert "not reached" in never.summary()


def test_cost_without_per_step_figures_or_fit():
    fc = Forecaster(np.full(100, 1e-3))
    c = cost_to_finish(fc, 10, target_loss=1.0)
    assert (c.steps_to_finish, c.seconds_to_finish, c.loss_gain, c.target_loss_step) == (
        89,
        None,
        None,
        None,
    )
    assert c.data() == {"cost/target_loss": 1.0}
    assert c.summary().startswith("to finish: unknown cost")


def test_meter_cost_to_finish_uses_its_rates(fitted):
    meter = run_meter(
        ComputeMeter(flops_per_step=2e12, energy=FixedEnergy(watts=400.0), world_size=2),
        seconds_per_step=0.5,
    )
    c = meter.cost_to_finish(fitted, 1_499)
    assert c.seconds_to_finish == pytest.approx(500 * 0.5)
    assert c.joules_to_finish == pytest.approx(500 * 0.5 * 800.0)
    assert c.flops_to_finish == pytest.approx(500 * 4e12)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"step": TOTAL}, "`step` must be in"),
    ({"step": -1}, "`step` must be in"),
    ({"step": 5, "joules_per_step": 0.0}, "`joules_per_step`"),
    ({"step": 5, "seconds_per_step": -2.0}, "`seconds_per_step`"),
    ({"step": 5, "target_loss": math.nan}, "`target_loss`"),
])  # fmt: skip
def test_cost_to_finish_rejects_bad_arguments(fitted, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cost_to_finish(fitted, **kwargs)
