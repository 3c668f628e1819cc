"""Online binning of observations: exact means and counts under merging, state round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lossforecast._observations import Observations


def _reference_bins(steps, losses, origin, width):
    """Brute force: group by (step - origin) // width, mean step (rounded) and loss, count."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for s, v in zip(steps, losses, strict=True):
        groups.setdefault((s - origin) // width, []).append((s, v))
    keys = sorted(groups)
    step = [int(np.rint(np.mean([s for s, _ in groups[k]]))) for k in keys]
    loss = [float(np.mean([v for _, v in groups[k]])) for k in keys]
    count = [len(groups[k]) for k in keys]
    return step, loss, count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_bins", [8, 16, 128])
def test_binning_keeps_means_and_counts_exact(seed, max_bins):
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.integers(1, 20, size=3000)) + rng.integers(0, 100)
    losses = 3.0 + rng.normal(0, 0.05, size=steps.size)
    obs = Observations(max_bins)
    for s, v in zip(steps.tolist(), losses.tolist(), strict=True):
        obs.add(s, v)
    b = obs.binned()
    assert obs.width > 1  # merging happened
    assert len(b) <= max_bins
    ref_step, ref_loss, ref_count = _reference_bins(
        steps.tolist(), losses.tolist(), obs.origin, obs.width
    )
    assert b.step.tolist() == ref_step
    assert b.count.tolist() == ref_count
    np.testing.assert_allclose(b.loss, ref_loss, rtol=1e-12)
    assert b.count.sum() == obs.n_total == steps.size
    assert obs.last_step == steps[-1]


def test_point_noise_estimates_the_noise_of_one_observation():
    rng = np.random.default_rng(4)
    obs = Observations(32)
    for s in range(20000):
        obs.add(s, 3.0 - 1e-5 * s + rng.normal(0, 0.03))
    assert obs.binned().point_noise == pytest.approx(0.03, rel=0.15)


def test_empty_and_single():
    obs = Observations()
    b = obs.binned()
    assert len(b) == 0 and b.point_noise == 0.0
    obs.add(7, 2.5)
    b = obs.binned()
    assert b.step.tolist() == [7] and b.loss.tolist() == [2.5] and b.count.tolist() == [1]


def test_state_round_trip_through_json():
    rng = np.random.default_rng(5)
    a = Observations(16)
    for s in range(0, 5000, 3):
        a.add(s, float(rng.normal(3.0, 0.1)))
    state = a.state_dict()
    frozen = json.dumps(state, sort_keys=True)
    b = Observations.from_state_dict(json.loads(frozen))
    assert json.dumps(state, sort_keys=True) == frozen  # input not modified
    for x, y in [(a.binned(), b.binned())]:
        assert x.step.tolist() == y.step.tolist()
        assert x.loss.tolist() == y.loss.tolist()
        assert x.count.tolist() == y.count.tolist()
        assert x.point_noise == y.point_noise
    # both continue identically
    for s in range(5001, 9000, 7):
        v = float(rng.normal(3.0, 0.1))
        a.add(s, v)
        b.add(s, v)
    assert a.state_dict() == b.state_dict()


def test_max_bins_validated():
    with pytest.raises(ValueError, match="`max_bins` must be at least 8, got 4"):
        Observations(4)
