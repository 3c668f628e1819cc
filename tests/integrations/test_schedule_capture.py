"""Tests for capturing a planned LR schedule by simulating a copy of torch schedulers."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lossforecast.integrations._schedule_capture import (  # noqa: E402
    capture_schedule,
    lightning_step_mask,
)
from torch.optim import lr_scheduler as sched  # noqa: E402

N = 120


def _optimizer(kind="adamw"):
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(3))]},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01, "weight_decay": 0.0},
    ]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.1)


SCHEDULERS = {
    "step": lambda o: [sched.StepLR(o, step_size=7, gamma=0.5)],
    "multistep": lambda o: [sched.MultiStepLR(o, milestones=[10, 50], gamma=0.3)],
    "cosine": lambda o: [sched.CosineAnnealingLR(o, T_max=N, eta_min=1e-4)],
    "warmup-lambda": lambda o: [
        sched.LambdaLR(o, lambda s: min((s + 1) / 10, 0.5 * (1 + math.cos(math.pi * s / N))))
    ],
    "onecycle": lambda o: [sched.OneCycleLR(o, max_lr=[0.1, 0.01], total_steps=N)],
    "cyclic": lambda o: [sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=15)],
    "sequential": lambda o: [
        sched.SequentialLR(
            o, [sched.LinearLR(o, 0.1, total_iters=10), sched.CosineAnnealingLR(o, N - 10)], [10]
        )
    ],
    "chained": lambda o: [
        sched.ChainedScheduler([sched.ExponentialLR(o, 0.99), sched.StepLR(o, 20, 0.5)])
    ],
    "two-schedulers": lambda o: [
        sched.LinearLR(o, 0.2, total_iters=8),
        sched.ExponentialLR(o, 0.98),
    ],
}


def _real_lrs(optimizer, schedulers, n, masks=None):
    """The group-0 LR at each of n real optimizer steps."""
    out = []
    for i in range(n):
        out.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        for k, s in enumerate(schedulers):
            if masks is None or masks[k][i]:
                s.step()
    return np.array(out)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_capture_matches_real_stepping(name):
    opt = _optimizer("sgd" if name == "cyclic" else "adamw")
    schedulers = SCHEDULERS[name](opt)
    captured = capture_schedule(opt, schedulers, N)
    assert captured.exact and captured.note is None
    np.testing.assert_allclose(captured.lr, _real_lrs(opt, schedulers, N), rtol=1e-12)


@pytest.mark.parametrize("name", ["cosine", "warmup-lambda", "sequential"])
def test_capture_from_a_resumed_state(name):
    opt = _optimizer()
    schedulers = SCHEDULERS[name](opt)
    _real_lrs(opt, schedulers, 37)  # the run so far
    captured = capture_schedule(opt, schedulers, N - 37)
    np.testing.assert_allclose(captured.lr, _real_lrs(opt, schedulers, N - 37), rtol=1e-12)


def test_capture_leaves_the_real_objects_untouched():
    opt = _optimizer()
    (cosine,) = SCHEDULERS["cosine"](opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    capture_schedule(opt, [cosine], N, keep=params)
    assert cosine.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.1
    assert cosine.optimizer is opt


def test_step_masks_follow_a_custom_cadence():
    opt = _optimizer()
    schedulers = [sched.StepLR(opt, step_size=1, gamma=0.9)]
    mask = np.arange(N) % 4 == 3
    captured = capture_schedule(opt, schedulers, N, step_masks=[mask])
    np.testing.assert_allclose(captured.lr, _real_lrs(opt, schedulers, N, [mask]), rtol=1e-12)


def test_plateau_assumes_the_current_lr():
    opt = _optimizer()
    captured = capture_schedule(opt, [sched.ReduceLROnPlateau(opt)], 50)
    assert not captured.exact and "ReduceLROnPlateau" in captured.note
    np.testing.assert_array_equal(captured.lr, np.full(50, 0.1))


def test_uncopyable_scheduler_assumes_the_current_lr():
    class Uncopyable(sched.LambdaLR):
        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    opt = _optimizer()
    captured = capture_schedule(opt, [Uncopyable(opt, lambda s: 0.5)], 20)
    assert (
        not captured.exact
        and "could not be copied" in captured.note
        and "no copies" in captured.note
    )
    np.testing.assert_array_equal(captured.lr, np.full(20, 0.05))


def test_scheduler_that_fails_midway_keeps_what_was_simulated():
    opt = _optimizer()
    onecycle = sched.OneCycleLR(opt, max_lr=0.1, total_steps=30)  # planned run is longer
    captured = capture_schedule(opt, [onecycle], 50)
    assert not captured.exact and "ValueError" in captured.note
    expected = _real_lrs(opt, [sched.OneCycleLR(_optimizer(), 0.1, total_steps=30)], 1)
    assert captured.lr[0] == pytest.approx(expected[0])
    assert np.all(captured.lr[30:] == captured.lr[30])


def test_no_scheduler_keeps_the_current_lr():
    captured = capture_schedule(_optimizer(), [], 5)
    assert captured.exact and captured.lr.tolist() == [0.1] * 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_steps": 0}, "`n_steps`"),
        ({"n_steps": 2.0}, "`n_steps`"),
        ({"n_steps": 3, "step_masks": [None, None]}, "`step_masks`"),
        ({"n_steps": 3, "step_masks": [[True]]}, "n_steps=3"),
    ],
)
def test_capture_rejects(kwargs, match):
    opt = _optimizer()
    with pytest.raises(ValueError, match=match):
        capture_schedule(opt, [sched.StepLR(opt, 2)], **kwargs)


@pytest.mark.parametrize(
    ("interval", "frequency", "start", "batches", "accumulate", "expected"),
    [
        ("step", 1, 0, 4, 1, [1, 1, 1, 1, 1, 1]),
        ("step", 2, 0, 4, 1, [0, 1, 0, 1, 0, 1]),
        ("step", 3, 0, 6, 2, [0, 0, 1, 0, 0, 1]),  # 2, 4, 6 batches seen: frequency counts batches
        ("step", 2, 0, 5, 2, [1, 1, 0, 1, 1, 0]),  # 2, 4, 5 (short last step), 2, 4, 5
        ("epoch", 1, 0, 4, 2, [0, 1, 0, 1, 0, 1]),
        ("epoch", 2, 0, 3, 1, [0, 0, 0, 0, 0, 1]),
        ("epoch", 1, 3, 4, 1, [1, 0, 0, 0, 1, 0]),  # resumed at global step 3
        ("step", 2, 0, math.inf, 1, [0, 1, 0, 1, 0, 1]),
        ("epoch", 1, 0, math.inf, 1, [0, 0, 0, 0, 0, 0]),
    ],
)
def test_lightning_step_mask(interval, frequency, start, batches, accumulate, expected):
    mask = lightning_step_mask(
        interval,
        frequency,
        start=start,
        n_steps=6,
        batches_per_epoch=batches,
        accumulate=accumulate,
    )
    assert mask.astype(int).tolist() == expected


def test_lightning_step_mask_rejects_an_unknown_interval():
    with pytest.raises(ValueError, match="`interval`"):
        lightning_step_mask("batch", 1, start=0, n_steps=3, batches_per_epoch=3, accumulate=1)
