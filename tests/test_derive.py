"""Tests for deriving priors and calibration from finished runs."""

from dataclasses import dataclass, replace

import numpy as np
import pytest

from lossforecast import Forecaster, Priors
from lossforecast._derive import MIN_ALPHA_STD, MIN_L0_RATIO_STD, derive_priors
from lossforecast._laws import LawInputs, MultiPowerLaw
from lossforecast._schedule import Schedule


@dataclass
class _Run:
    steps: np.ndarray
    loss: np.ndarray
    lr_schedule: np.ndarray
    final_step: int
    final_loss: float
    source: str | None = None


def _wsd(total: int, peak: float, cooldown: float = 0.2) -> np.ndarray:
    warm = total // 20
    start = int(total * (1 - cooldown))
    lr = np.full(total, peak)
    lr[:warm] = np.linspace(0, peak, warm, endpoint=False)
    lr[start:] = np.linspace(peak, 0.0, total - start)
    return lr


def _synthetic_run(
    total: int, peak: float, l0: float, seed: int, amp: float = 6.0, alpha: float = 0.45
) -> _Run:
    """A curve drawn from the Multi-Power Law itself, with small noise."""
    law = MultiPowerLaw()
    lr = _wsd(total, peak)
    schedule = Schedule(lr)
    theta = np.array([l0, 1.2, alpha, np.log(amp) + 0.5 * np.log(peak), -5.0, 0.7, 0.8])
    steps = np.arange(total // 20, total, 50)
    clean = law.predict(theta, LawInputs.at(schedule, steps))
    loss = clean + np.random.default_rng(seed).normal(0, 2e-3, len(steps))
    return _Run(steps, loss, lr, int(steps[-1]), float(clean[-1]))


@pytest.fixture(scope="module")
def derived():
    runs = [
        _synthetic_run(4000, 1e-3, 3.0, 0),
        _synthetic_run(6000, 5e-4, 2.6, 1),
        _synthetic_run(5000, 2e-3, 3.3, 2),
    ]
    return runs, derive_priors(runs, provenance="synthetic")


def test_needs_two_runs():
    with pytest.raises(ValueError, match="at least 2 runs"):
        derive_priors([_synthetic_run(4000, 1e-3, 3.0, 0)])


def test_recovers_the_generating_amplitude(derived):
    _, priors = derived
    mp = priors.laws["multi-power"]
    # the amplitude was drawn as log(6) + 0.5 log(peak): per unit sqrt(peak) it is log(6)
    assert mp.mean["log_amp"] == pytest.approx(np.log(6.0), abs=0.5)
    assert mp.mean["alpha"] == pytest.approx(0.45, abs=0.15)
    assert priors.provenance == "synthetic"


def test_power_law_priors_stay_weak_when_the_runs_agree(derived):
    # The three runs share alpha = 0.45 exactly, so their spread alone would give a prior
    # far tighter than the exponent's spread between sources; L0 likewise.
    _, priors = derived
    for law in priors.laws.values():
        assert law.std["alpha"] >= MIN_ALPHA_STD
        assert all(std >= MIN_L0_RATIO_STD for _, _, std in law.l0_ratio)
    # the annealing amplitude, which the data cannot tell before a decay, keeps its learned
    # std (here the hyperprior's floor, 0.2)
    assert priors.laws["multi-power"].std["log_amp"] == pytest.approx(0.2, abs=0.05)


def test_calibration_is_non_increasing_in_progress(derived):
    _, priors = derived
    for cal in priors.calibration.values():
        assert list(cal.progress) == sorted(cal.progress)
        assert all(a >= b for a, b in zip(cal.rel_std, cal.rel_std[1:], strict=False))


def test_derived_priors_round_trip_and_forecast(derived):
    runs, priors = derived
    again = Priors.from_dict(priors.to_dict())
    run = runs[0]
    fc = Forecaster(run.lr_schedule, target_step=run.final_step, priors=again)
    for s, y in zip(run.steps[:40], run.loss[:40], strict=False):
        fc.update(int(s), float(y))
    f = fc.forecast()
    assert f is not None
    assert f.low <= run.final_loss <= f.high


def test_early_intervals_widen_to_what_a_held_out_source_needs():
    # Two sources whose curves fall by very different amounts: priors learned from one
    # forecast the other's early progress badly, which an in-sample backtest cannot see.
    runs = [
        replace(_synthetic_run(4000, 1e-3, 3.0, 0), source="a"),
        replace(_synthetic_run(5000, 2e-3, 3.3, 1), source="a"),
        replace(_synthetic_run(4000, 1e-3, 2.0, 2, amp=30.0, alpha=0.25), source="b"),
        replace(_synthetic_run(5000, 2e-3, 2.2, 3, amp=30.0, alpha=0.25), source="b"),
    ]
    pooled = derive_priors([replace(r, source=None) for r in runs])
    by_source = derive_priors(runs)
    for law, cal in by_source.calibration.items():
        plain = pooled.calibration[law]
        assert cal.scale(0.05) > 2 * plain.scale(0.05), law
        # late knots rest on the run's own data: only the source weighting differs there
        assert cal.rel_std[-1] == pytest.approx(plain.rel_std[-1], rel=0.1)


def test_l0_table_is_keyed_by_the_lr_area_seen(derived):
    runs, priors = derived
    reached = [np.log(Schedule(r.lr_schedule).lr_area(r.final_step)) for r in runs]
    for law in priors.laws.values():
        keys = [k for k, _, _ in law.l0_ratio]
        means = [m for _, m, _ in law.l0_ratio]
        assert keys == sorted(keys) and keys[-1] <= max(reached) + 0.5
        # the lowest loss seen closes in on L0 as the LR area grows
        assert means[0] < means[-1] <= 1.0
