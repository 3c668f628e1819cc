"""Tests for the shipped priors, their file format and their per-run units."""

import json

import numpy as np
import pytest

from lossforecast import Priors
from lossforecast._laws import LAWS


def test_shipped_priors_cover_every_law():
    priors = Priors.default()
    assert set(priors.laws) == set(LAWS)
    assert set(priors.calibration) == set(LAWS)
    for name, law in LAWS.items():
        p = priors.laws[name]
        assert set(p.mean) <= set(law.params)
        assert all(p.std[k] > 0 for k in p.mean)
        log_area = [row[0] for row in p.l0_ratio]
        assert log_area == sorted(log_area)
        assert all(0.5 < mean < 1.0 and std > 0 for _, mean, std in p.l0_ratio)


def test_round_trip_through_json(tmp_path):
    priors = Priors.default()
    path = tmp_path / "p.json"
    path.write_text(json.dumps(priors.to_dict()))
    again = Priors.load(path)
    assert again.to_dict() == priors.to_dict()


def test_files_written_before_the_drop_share_read_as_zero():
    d = Priors.default().to_dict()
    assert all(c["drop_share"] > 0 for c in d["calibration"].values())
    for c in d["calibration"].values():
        del c["drop_share"]
    assert all(c.drop_share == 0.0 for c in Priors.from_dict(d).calibration.values())


def test_wrong_version_is_rejected():
    d = Priors.default().to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        Priors.from_dict(d)


def test_amplitude_prior_scales_with_square_root_of_peak_lr():
    law = Priors.default().laws["multi-power"]
    a = law.for_run(3.0, 1e-4).mean["log_amp"]
    b = law.for_run(3.0, 4e-4).mean["log_amp"]
    assert b - a == pytest.approx(law.amp_lr_exponent * np.log(4.0))


def test_l0_prior_is_relative_to_lowest_loss_and_follows_the_lr_area_seen():
    law = Priors.default().laws["multi-power"]
    first, last = law.l0_ratio[0], law.l0_ratio[-1]
    early = law.for_run(2.0, 1e-3, np.exp(first[0]))
    late = law.for_run(2.0, 1e-3, np.exp(last[0]))
    assert early.mean["L0"] == pytest.approx(2.0 * first[1])
    assert early.std["L0"] == pytest.approx(2.0 * first[2])
    assert late.mean["L0"] == pytest.approx(2.0 * last[1])
    # early in training the lowest loss seen is far above the irreducible loss
    assert early.mean["L0"] < late.mean["L0"]
    # held at the table's ends, and past its end by default
    assert law.for_run(2.0, 1e-3, 1e-9).mean["L0"] == pytest.approx(early.mean["L0"])
    assert law.for_run(2.0, 1e-3).mean["L0"] == pytest.approx(late.mean["L0"])


def test_calibration_interpolates_and_clamps():
    cal = Priors.default().calibration["multi-power"]
    assert cal.scale(-1.0) == pytest.approx(cal.rel_std[0])
    assert cal.scale(2.0) == pytest.approx(cal.rel_std[-1])
    mid = 0.5 * (cal.progress[0] + cal.progress[1])
    lo, hi = min(cal.rel_std[:2]), max(cal.rel_std[:2])
    assert lo * (1 - 1e-9) <= cal.scale(mid) <= hi * (1 + 1e-9)
