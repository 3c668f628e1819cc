"""scripts/measure_drop_share.py: the joint fit behind ``DROP_SHARE`` recovers an exact law."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lossforecast import LRAnnealingLaw, MultiPowerLaw, Schedule
from lossforecast._laws import LawInputs

THETA = {
    MultiPowerLaw: np.array([2.5, 3.78, 0.47, -1.65, -5.0, 0.7, 0.8]),
    LRAnnealingLaw: np.array([2.5, 3.78, 0.47, -8.0, 6.0]),
}
T, WARM = 8000, 400


def _schedules() -> dict[str, np.ndarray]:
    warm = np.linspace(0.01, 1.0, WARM)
    t = np.arange(T - WARM) / (T - WARM)
    cool = T // 5
    return {
        "constant": 1e-3 * np.r_[warm, np.ones(T - WARM)],
        "cosine": 1e-3 * np.r_[warm, 0.1 + 0.45 * (1 + np.cos(np.pi * t))],
        "wsd": 1e-3 * np.r_[warm, np.ones(T - WARM - cool), np.linspace(1.0, 0.0, cool)],
    }


@pytest.mark.parametrize("law_cls", [MultiPowerLaw, LRAnnealingLaw])
def test_joint_fit_of_curves_from_the_law_leaves_no_shape_error(law_cls, load_script):
    law, theta_true, rng = law_cls(), THETA[law_cls], np.random.default_rng(0)
    runs = []
    for lr in _schedules().values():
        steps = np.arange(WARM + 20, T, 20)
        loss = law.predict(theta_true, LawInputs.at(Schedule(lr), steps))
        runs.append(
            SimpleNamespace(
                steps=steps,
                loss=loss + rng.normal(0.0, 1e-3, steps.size),
                lr_schedule=lr,
                final_step=int(steps[-1]),
                final_loss=float(loss[-1]),
            )
        )
    theta = load_script("scripts/measure_drop_share.py").joint_fit(law, runs)
    for run in runs[1:]:  # the annealed ones
        end = LawInputs.at(Schedule(run.lr_schedule), np.array([run.final_step]))
        error = float(law.predict(theta, end)[0]) - run.final_loss
        drop = float(law.annealing_drop(theta_true, end)[0])
        assert drop > 0.05
        assert abs(error) < 0.01 * drop
