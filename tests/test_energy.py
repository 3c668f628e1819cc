"""Tests for the energy accounting on recorded counter and power streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lossforecast._energy import CounterAccumulator, EnergyTotal, PowerIntegrator

RAPL_RANGE_UJ = 262_143_328_850  # a real max_energy_range_uj (about 262 kJ)


def feed(acc, readings, times=None):
    times = range(len(readings)) if times is None else times
    for value, t in zip(readings, times, strict=False):
        acc.add(value, float(t))
    return acc.total()


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ["scale", "modulus", "max_watts"])
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True])
def test_counter_rejects_bad_numbers(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive finite number"):
        CounterAccumulator(**{name: value})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"interval": 0.0}, "`interval`"),
    ({"interval": -1.0}, "`interval`"),
    ({"max_gap": 0.5}, "`max_gap`"),
    ({"max_gap": math.nan}, "`max_gap`"),
])  # fmt: skip
def test_power_integrator_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PowerIntegrator(**kwargs)


# ------------------------------------------------------------------ counters
def test_nvml_like_counter_at_constant_power():
    # NVML: millijoules since the driver loaded, 300 W sampled every second for 10 minutes
    start = 123_456_789_000
    readings = [start + 300_000 * t for t in range(601)]
    total = feed(CounterAccumulator(scale=1e-3), readings)
    assert total.joules == pytest.approx(300.0 * 600)
    assert (total.n_samples, total.n_missing, total.n_wraps, total.n_resets) == (601, 0, 0, 0)
    assert total.seconds == 600.0
    assert total.watts == pytest.approx(300.0)


def test_rapl_counter_wraps_at_its_range():
    # 150 W for 2000 s sampled every 2 s: the microjoule counter wraps once (262 kJ range)
    times = np.arange(0, 2001, 2.0)
    readings = [(200_000_000_000 + int(150e6 * t)) % RAPL_RANGE_UJ for t in times]
    total = feed(CounterAccumulator(scale=1e-6, modulus=RAPL_RANGE_UJ), readings, times)
    assert total.n_wraps == 1 and total.n_resets == 0
    assert total.joules == pytest.approx(150.0 * 2000)


def test_several_wraps_between_samples_are_impossible_to_see_but_one_is_counted():
    # a wrap right after a missing sample: the difference still spans one wrap
    acc = CounterAccumulator(scale=1e-6, modulus=1_000_000)
    total = feed(acc, [800_000, None, 200_000], [0.0, 1.0, 2.0])
    assert (total.n_wraps, total.n_missing) == (1, 1)
    assert total.joules == pytest.approx(0.4)


def test_driver_reset_restarts_from_the_new_baseline():
    # 200 W; the driver reloads between t=5 and t=6 and the counter restarts near zero
    readings = [1_000_000 + 200_000 * t for t in range(6)] + [3_000 + 200_000 * k for k in range(5)]
    total = feed(CounterAccumulator(scale=1e-3), readings)
    assert total.n_resets == 1 and total.n_wraps == 0
    assert total.joules == pytest.approx(200.0 * 9)  # 10 intervals, the reset one lost


def test_reset_on_a_wrapping_counter_is_not_taken_for_a_wrap():
    # far below the range: jumping back to a small value cannot be a wrap (it would be 262 kJ)
    acc = CounterAccumulator(scale=1e-6, modulus=RAPL_RANGE_UJ)
    total = feed(acc, [5_000_000_000, 5_100_000_000, 40_000, 140_040_000], [0, 1, 2, 3])
    assert (total.n_resets, total.n_wraps) == (1, 0)
    assert total.joules == pytest.approx(100.0 + 140.0)


def test_implausible_jump_up_counts_as_a_reset():
    acc = CounterAccumulator(scale=1e-3, max_watts=2_000.0)
    # +1 kJ in one second is 1 kW (fine); +10 MJ in one second is not
    total = feed(acc, [0, 1_000_000, 10_001_000_000, 10_001_500_000], [0, 1, 2, 3])
    assert total.n_resets == 1
    assert total.joules == pytest.approx(1_000.0 + 500.0)


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -5.0, "n/a"])
def test_missing_samples_are_skipped_and_lose_no_energy(bad):
    readings = [0, 100_000, bad, bad, 400_000, 500_000]
    total = feed(CounterAccumulator(scale=1e-3), readings)
    assert total.n_missing == 2 and total.n_samples == 4
    assert total.joules == pytest.approx(500.0)


def test_samples_out_of_time_order_are_missing():
    acc = CounterAccumulator(scale=1.0)
    total = feed(acc, [0.0, 10.0, 15.0, 20.0], [0.0, 1.0, 1.0, 2.0])
    assert total.n_missing == 1
    assert total.joules == pytest.approx(20.0)


def test_counter_add_returns_the_joules_of_each_reading():
    acc = CounterAccumulator(scale=1e-3)
    assert [acc.add(v, t) for t, v in enumerate([1_000, 3_000, None, 6_000])] == [
        0.0,
        2.0,
        0.0,
        3.0,
    ]


def test_counter_without_times_still_wraps_and_resets():
    acc = CounterAccumulator(modulus=100.0)
    for value in [10.0, 90.0, 20.0, 25.0, 10.0]:  # wrap (+30), then back 15: not a wrap (85)
        acc.add(value)
    total = acc.total()
    assert (total.n_wraps, total.n_resets) == (1, 1)
    assert total.joules == pytest.approx(80.0 + 30.0 + 5.0)


# ------------------------------------------------------------------ power integration
def test_trapezoid_of_a_power_ramp_is_exact():
    times = np.linspace(0.0, 60.0, 61)
    watts = 100.0 + 2.0 * times  # 100 W -> 220 W
    total = feed(PowerIntegrator(interval=1.0), watts, times)
    assert total.joules == pytest.approx(160.0 * 60.0)
    assert (total.n_gaps, total.n_missing) == (0, 0)


def test_long_gap_is_bridged_by_the_mean_of_its_ends_and_counted():
    p = PowerIntegrator(interval=1.0, max_gap=5)
    times = [0.0, 1.0, 2.0, 12.0, 13.0]  # a 10 s stall of the sampler
    watts = [100.0, 100.0, 100.0, 300.0, 300.0]
    total = feed(p, watts, times)
    assert total.n_gaps == 1 and total.gap_seconds == 10.0
    assert total.joules == pytest.approx(200.0 + 200.0 * 10.0 + 300.0)


def test_missing_power_samples_widen_the_interval_but_a_short_one_is_no_gap():
    p = PowerIntegrator(interval=1.0, max_gap=5)
    total = feed(p, [50.0, None, math.nan, 50.0, 50.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert (total.n_missing, total.n_gaps) == (2, 0)
    assert total.joules == pytest.approx(200.0)


def test_power_sample_out_of_time_order_is_missing():
    p = PowerIntegrator(interval=1.0)
    total = feed(p, [10.0, 10.0, 10.0], [0.0, 2.0, 1.0])
    assert total.n_missing == 1 and total.joules == pytest.approx(20.0)


# ------------------------------------------------------------------ totals
def test_totals_add_up():
    a = EnergyTotal(joules=10.0, seconds=5.0, n_samples=6, n_wraps=1)
    b = EnergyTotal(joules=4.0, seconds=8.0, n_samples=9, n_missing=2, n_gaps=1, gap_seconds=7.0)
    c = a + b
    assert (c.joules, c.seconds, c.n_samples, c.n_missing, c.n_wraps, c.n_gaps) == (
        14.0,
        8.0,
        15,
        2,
        1,
        1,
    )
    assert c.watts == pytest.approx(14.0 / 8.0)
    assert EnergyTotal().watts is None
