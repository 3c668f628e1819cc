"""What-if cooldown schedules: shapes, defaults and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lossforecast._cooldown import cooldown_schedule

PEAK = 1e-3


def _plan(kind: str) -> np.ndarray:
    """2,000 steps: 100 of warmup, then constant, or constant with a linear decay over 20%."""
    lr = np.r_[np.linspace(0.01, 1.0, 100), np.ones(1900)]
    if kind == "wsd":
        lr[1600:] = np.linspace(1.0, 0.1, 400)
    return PEAK * lr


_P = np.arange(1, 5) / 4  # progress through a 4-step cooldown


@pytest.mark.parametrize(
    ("shape", "fall"),
    [
        ("linear", 1 - _P),
        ("1-sqrt", 1 - np.sqrt(_P)),
        ("cosine", 0.5 * (1 + np.cos(np.pi * _P))),
    ],
)
def test_cooldown_schedule_shapes(shape, fall):
    out = cooldown_schedule([2.0, 2.0, 2.0, 2.0], 2, 4, shape)
    assert out.shape == (6,)  # start + length steps: may outgrow the plan
    np.testing.assert_allclose(out, np.r_[2.0, 2.0, 2.0 * fall])
    assert out[-1] == 0.0


def test_cooldown_schedule_final_lr_defaults():
    wsd = _plan("wsd")
    out = cooldown_schedule(wsd, 800, 200)
    assert out.shape == (1000,) and out[-1] == pytest.approx(wsd[-1])  # a WSD plan's final LR
    assert np.all(np.diff(out[799:]) < 0)
    assert cooldown_schedule(_plan("constant"), 800, 200)[-1] == 0.0  # no decay planned: 0
    assert cooldown_schedule(_plan("constant"), 800, 200, final_lr=1e-4)[-1] == 1e-4
    np.testing.assert_array_equal(out[:800], wsd[:800])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], 1, 1), r"`lr` must be a non-empty 1-d"),
        (([1.0, math.nan], 1, 1), r"`lr` must be a non-empty 1-d"),
        (([1.0, 1.0], 0, 1), r"`start` must be an int in 1..2, got 0"),
        (([1.0, 1.0], 3, 1), r"`start` must be an int in 1..2, got 3"),
        (([1.0, 1.0], 1, 0), r"`length` must be a positive int, got 0"),
        (([1.0, 1.0], 1, 2, "step"), r"`shape` must be one of .*got 'step'"),
        (([1.0, 1.0], 1, 2, "linear", 2.0), r"`final_lr` must be in \[0, 1.0\]"),
    ],
)
def test_cooldown_schedule_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        cooldown_schedule(*args)
