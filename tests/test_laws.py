"""Loss laws: analytic Jacobians against finite differences, shapes and basic behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from lossforecast import LRAnnealingLaw, MultiPowerLaw, Schedule
from lossforecast._laws import LAWS, LawInputs


def _wsd(total: int = 3000) -> np.ndarray:
    warm, cool = total // 20, total // 5
    return np.r_[
        np.linspace(0.05, 1.0, warm), np.ones(total - warm - cool), np.linspace(1.0, 0.01, cool)
    ]


def _cosine(total: int = 3000) -> np.ndarray:
    warm = total // 20
    t = np.arange(total - warm) / (total - warm)
    return np.r_[np.linspace(0.05, 1.0, warm), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t))]


def _step_rewarm(total: int = 3000) -> np.ndarray:
    lr = np.ones(total)
    lr[: total // 10] = np.linspace(0.1, 1.0, total // 10)
    lr[total // 2 :] = 0.3
    lr[2 * total // 3 :] = 0.6  # rewarm
    lr[5 * total // 6 :] = 0.05
    return lr


def _random_theta(law, rng: np.random.Generator) -> np.ndarray:
    """Random parameters well inside the law's bounds."""
    bounds = law.bounds(3.0)
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    theta = lo + (hi - lo) * rng.uniform(0.2, 0.8, size=len(bounds))
    theta[law.params.index("log_A")] = rng.uniform(-1.0, 2.0)
    theta[law.params.index("log_amp")] = rng.uniform(-3.0, 0.0)
    return theta


@pytest.mark.parametrize("law_cls", [LRAnnealingLaw, MultiPowerLaw])
@pytest.mark.parametrize("lr_fn", [_wsd, _cosine, _step_rewarm])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_matches_finite_differences(law_cls, lr_fn, seed):
    rng = np.random.default_rng(seed)
    law = law_cls()
    sched = Schedule(lr_fn())
    steps = np.unique(rng.integers(sched.warmup_steps + 1, sched.total_steps, size=60))
    x = LawInputs.at(sched, steps)
    theta = _random_theta(law, rng)
    y, jac = law.predict_jac(theta, x)
    assert y.shape == (len(steps),)
    assert jac.shape == (len(steps), len(law.params))
    assert np.all(np.isfinite(jac))
    for j, name in enumerate(law.params):
        h = 1e-6 * max(1.0, abs(theta[j]))
        up, down = theta.copy(), theta.copy()
        up[j] += h
        down[j] -= h
        numeric = (law.predict(up, x) - law.predict(down, x)) / (2 * h)
        scale = max(np.abs(numeric).max(), 1e-8)
        np.testing.assert_allclose(
            jac[:, j], numeric, rtol=0, atol=1e-5 * scale, err_msg=f"{law.name}: d/d{name}"
        )


@pytest.mark.parametrize("law_cls", [LRAnnealingLaw, MultiPowerLaw])
def test_bounds_match_params(law_cls):
    law = law_cls()
    bounds = law.bounds(2.5)
    assert len(bounds) == len(law.params)
    assert all(lo < hi for lo, hi in bounds)
    assert bounds[law.params.index("L0")][1] == 2.5


def _without_annealing(law, theta: np.ndarray, x: LawInputs) -> np.ndarray:
    """Reference: the prediction with the annealing amplitude set to zero."""
    off = theta.copy()
    off[law.params.index("log_amp")] = -800.0  # exp(-800) == 0.0
    return law.predict(off, x)


@pytest.mark.parametrize("law_cls", [LRAnnealingLaw, MultiPowerLaw])
@pytest.mark.parametrize("lr_fn", [_wsd, _cosine, _step_rewarm])
def test_annealing_drop_is_the_loss_the_annealing_term_removes(law_cls, lr_fn):
    law = law_cls()
    theta = _random_theta(law, np.random.default_rng(5))
    x = LawInputs.at(Schedule(lr_fn()), np.arange(0, 3000, 37))
    expected = _without_annealing(law, theta, x) - law.predict(theta, x)
    np.testing.assert_allclose(law.annealing_drop(theta, x), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("law_cls", [LRAnnealingLaw, MultiPowerLaw])
def test_cooldown_lowers_the_loss(law_cls):
    """The annealing term removes loss after a decay and nothing on a constant schedule."""
    rng = np.random.default_rng(3)
    law = law_cls()
    theta = _random_theta(law, rng)
    wsd, const = Schedule(_wsd()), Schedule(np.r_[_wsd()[:150], np.ones(2850)])
    end = np.array([2999])
    assert law.annealing_drop(theta, LawInputs.at(wsd, end))[0] > 0
    assert law.annealing_drop(theta, LawInputs.at(const, end))[0] == pytest.approx(0.0, abs=1e-12)


def test_registry_names():
    assert set(LAWS) == {"multi-power", "lr-annealing"}
    assert LAWS["multi-power"] is MultiPowerLaw
