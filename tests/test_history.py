"""Run summaries, reading a history folder, and priors sharpened by past runs."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from lossforecast import Forecaster, Priors, Schedule
from lossforecast._history import (
    HISTORY_ENV,
    SUMMARY_KIND,
    SUMMARY_VERSION,
    RunSummary,
    ScheduleShape,
    history_dir_from_env,
    history_priors,
    load_history,
    write_run_summary,
)
from lossforecast._laws import LawInputs, MultiPowerLaw

PEAK = 1e-3
LAW = "multi-power"
#: Multi-Power Law parameters of the synthetic "model": L0, log A, alpha, log_amp (for the
#: peak LR below), log C, beta, gamma. The cooldown drop is about twice what the shipped
#: prior expects, so only a history can tell a run about it before its cooldown.
THETA = np.array([2.5, np.log(10.0), 0.45, 2.0 + 0.5 * np.log(PEAK), -3.0, 0.6, 1.0])


def wsd(total: int, warmup: int = 200, cooldown: float = 0.2) -> np.ndarray:
    n = int(cooldown * total)
    return (
        PEAK
        * np.r_[
            np.linspace(0.01, 1.0, warmup), np.ones(total - warmup - n), np.linspace(1.0, 0.01, n)
        ]
    )


def curve(lr: np.ndarray, seed: int, every: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Losses from the Multi-Power Law with :data:`THETA`, plus seeded noise."""
    steps = np.arange(every, len(lr), every)
    clean = MultiPowerLaw().predict(THETA, LawInputs.at(Schedule(lr), steps))
    return steps, clean + np.random.default_rng(seed).normal(0.0, 0.003, steps.size)


def truth(lr: np.ndarray) -> float:
    x = LawInputs.at(Schedule(lr), np.array([len(lr) - 1]))
    return float(MultiPowerLaw().predict(THETA, x)[0])


def fed(lr, steps, loss, upto: float = 1.0, priors: Priors | None = None) -> Forecaster:
    fc = Forecaster(lr, priors=priors)
    for s, y in zip(steps.tolist(), loss.tolist(), strict=True):
        if s <= upto * len(lr):
            fc.update(s, y)
    return fc


def write_history(folder, totals=(3000, 5000), labels=None) -> list:
    paths = []
    for i, total in enumerate(totals):
        lr = wsd(total)
        steps, loss = curve(lr, seed=i)
        fc = fed(lr, steps, loss)
        paths.append(
            write_run_summary(
                folder,
                fc,
                final_loss=truth(lr),
                labels=labels or {"model": "m"},
                run_name=f"run {total}",
            )
        )
    return paths


@pytest.fixture(scope="module")
def history_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("history")
    write_history(folder)
    return folder


# ---------------------------------------------------------------------------- writing and reading
def test_write_then_load_round_trip(history_folder):
    files = sorted(history_folder.iterdir())
    assert len(files) == 2 and all(f.suffix == ".json" for f in files)
    assert all(f.name.startswith("run-") and " " not in f.name for f in files)  # safe names
    doc = json.loads(files[0].read_text())
    assert doc["kind"] == SUMMARY_KIND and doc["version"] == SUMMARY_VERSION
    assert set(doc) >= {"final_loss", "final_step", "law", "params", "schedule", "labels"}

    summaries = load_history(history_folder)
    assert [s.run_name for s in summaries] == ["run 3000", "run 5000"]
    first = summaries[0]
    assert isinstance(first, RunSummary)
    assert first.law == LAW and first.labels == {"model": "m"}
    assert first.final_loss == pytest.approx(truth(wsd(3000)))
    assert first.final_step == 2980
    assert first.schedule == ScheduleShape.of(Schedule(wsd(3000)))
    assert first.schedule.decay_start == pytest.approx(0.8, abs=0.01)
    assert first.schedule.final_lr_ratio == pytest.approx(0.01)
    # the whole-curve fit recovers the power law, and the cooldown's drop as an amplitude
    assert first.params["alpha"] == pytest.approx(THETA[2], abs=0.1)
    assert first.params["L0"] == pytest.approx(THETA[0], rel=0.03)
    assert first.cooldown_log_amp is not None
    assert set(first.cooldown_shape) == {"log_C", "beta", "gamma"}
    ratios = [r for _, r in first.l0_ratio]
    assert ratios == sorted(ratios) and 0.6 < ratios[0] < ratios[-1] <= 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.final_loss = 1.0


def test_writes_are_atomic_and_never_collide(tmp_path):
    lr = wsd(2000)
    steps, loss = curve(lr, seed=0)
    fc = fed(lr, steps, loss)
    a = write_run_summary(tmp_path, fc, final_loss=2.6, run_name="../same/../name")
    b = write_run_summary(tmp_path, fc, final_loss=2.6, run_name="../same/../name")
    assert a != b and a.parent == b.parent == tmp_path  # no path escapes the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])  # no temp files


def test_write_rejects_bad_input(tmp_path):
    lr = wsd(2000)
    steps, loss = curve(lr, seed=0)
    fc = fed(lr, steps, loss)
    with pytest.raises(ValueError, match="`final_loss`"):
        write_run_summary(tmp_path, fc, final_loss=float("nan"))
    with pytest.raises(ValueError, match="`labels`"):
        write_run_summary(tmp_path, fc, final_loss=2.6, labels={"model": 125})
    with pytest.raises(ValueError, match="could not be fitted"):
        write_run_summary(tmp_path, Forecaster(lr), final_loss=2.6)
    assert list(tmp_path.iterdir()) == []


def test_bad_files_are_skipped_with_one_message(history_folder, tmp_path, caplog):
    good = sorted(history_folder.iterdir())[0]
    (tmp_path / "good.json").write_text(good.read_text())
    (tmp_path / "corrupt.json").write_text('{"kind": "lossforecast-run-sum')
    (tmp_path / "foreign.json").write_text(json.dumps({"kind": "something-else", "a": 1}))
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    partial = json.loads(good.read_text())
    del partial["params"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    future = json.loads(good.read_text())
    future["version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(future))
    nan = json.loads(good.read_text())
    nan["final_loss"] = "NaN"
    (tmp_path / "nan.json").write_text(json.dumps(nan))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "notes.txt").write_text("not a summary, and not a .json file")
    (tmp_path / ".tmp-123.json").write_text("{")  # a write in progress
    with caplog.at_level(logging.INFO, logger="lossforecast"):
        summaries = load_history(tmp_path)
    assert [s.path.name for s in summaries] == ["good.json"]
    records = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "skipped 7 of 8 files" in records[0].getMessage()


def test_missing_folder_is_an_empty_history(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lossforecast"):
        assert load_history(tmp_path / "nowhere") == []
        assert load_history(None) == []
    assert caplog.records == []


def test_history_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(HISTORY_ENV, str(tmp_path))
    assert history_dir_from_env() == tmp_path
    monkeypatch.setenv(HISTORY_ENV, "  ")
    assert history_dir_from_env() is None
    monkeypatch.delenv(HISTORY_ENV)
    assert history_dir_from_env() is None


# ---------------------------------------------------------------------------- learning
def _fake(i: int, alpha: float, ratio: float, labels=None, amp=None) -> RunSummary:
    shipped = Priors.default().laws[LAW]
    shape = {k: v for k, v in shipped.mean.items() if k != "log_amp"}
    return RunSummary(
        path=None,
        run_name=f"r{i}",
        law=LAW,
        final_loss=3.0,
        final_step=9999,
        params={"L0": 2.5, "alpha": alpha},
        l0_ratio=tuple((log_area, ratio) for log_area, _, _ in shipped.l0_ratio),
        schedule=ScheduleShape.of(Schedule(wsd(10_000))),
        cooldown_log_amp=amp,
        cooldown_shape=shape if amp is not None else {},
        labels=labels or {},
        created=f"2025-01-01T00:00:{i:02d}+00:00",
    )


def test_empty_history_leaves_priors_unchanged():
    priors = Priors.default()
    assert history_priors(priors, [], law=LAW) is priors
    other_law = dataclasses.replace(_fake(0, 0.3, 0.7), law="lr-annealing")
    assert history_priors(priors, [other_law], law=LAW) is priors


def test_history_moves_priors_towards_consistent_runs():
    priors = Priors.default()
    base = priors.laws[LAW]
    one = history_priors(priors, [_fake(0, 0.3, 0.7, amp=3.0)], law=LAW).laws[LAW]
    many = history_priors(priors, [_fake(i, 0.3, 0.7, amp=3.0) for i in range(8)], law=LAW).laws[
        LAW
    ]
    for law in (one, many):
        assert 0.3 <= law.mean["alpha"] < base.mean["alpha"]
        assert base.mean["log_amp"] < law.mean["log_amp"] <= 3.0
        assert law.std["alpha"] < base.std["alpha"]
        for (_, m, s), (_, m0, s0) in zip(law.l0_ratio, base.l0_ratio, strict=True):
            assert min(m0, 0.7) - 1e-9 <= m <= max(m0, 0.7) + 1e-9  # between prior and runs
            assert 0.2 * s0 - 1e-12 <= s <= s0
    # more consistent runs: closer to them and sharper, but never below the floor
    assert abs(many.mean["alpha"] - 0.3) < abs(one.mean["alpha"] - 0.3)
    assert many.std["alpha"] < one.std["alpha"]
    assert many.std["alpha"] >= 0.2 * base.std["alpha"] - 1e-12
    # the parameters a history does not carry, and the calibration, stay as shipped
    assert {k: many.mean[k] for k in ("log_C", "beta", "gamma")} == {
        k: base.mean[k] for k in ("log_C", "beta", "gamma")
    }
    sharpened = history_priors(priors, [_fake(i, 0.3, 0.7) for i in range(8)], law=LAW)
    assert sharpened.calibration == priors.calibration
    assert sharpened.laws["lr-annealing"] == priors.laws["lr-annealing"]


def test_history_extends_the_l0_table_to_lrs_on_another_scale():
    # SGD-like runs: an LR area far beyond the shipped table's last row
    priors = Priors.default()
    base = priors.laws[LAW]
    levels = (5.0, 5.7, 6.4, 7.0)
    runs = [
        dataclasses.replace(_fake(i, 0.4, 0.9), l0_ratio=tuple((lv, 0.9) for lv in levels))
        for i in range(8)
    ]
    law = history_priors(priors, runs, law=LAW).laws[LAW]
    keys = [k for k, _, _ in law.l0_ratio]
    assert keys[: len(base.l0_ratio)] == [k for k, _, _ in base.l0_ratio]
    assert keys[len(base.l0_ratio) :] == [5.0, 5.5, 6.0, 6.5, 7.0]
    assert law.l0_ratio[: len(base.l0_ratio)] == base.l0_ratio  # nothing seen there
    end, _ = base.l0_ratio_at(np.inf)
    ratio, std = law.l0_ratio_at(6.0)
    assert 0.9 - 1e-9 <= ratio < end - 0.5 * (end - 0.9) and std < base.l0_ratio_at(6.0)[1]
    assert law.for_run(3.0, 0.1, np.exp(6.0)).mean["L0"] == pytest.approx(3.0 * ratio)


def test_history_priors_are_deterministic_and_prefer_same_labels():
    priors = Priors.default()
    runs = [_fake(i, 0.3, 0.7, {"model": "a"}) for i in range(3)]
    runs += [_fake(10 + i, 0.8, 0.9, {"model": "b"}) for i in range(3)]
    a = history_priors(priors, runs, law=LAW, labels={"model": "a"})
    assert (
        a.to_dict() == history_priors(priors, runs[::-1], law=LAW, labels={"model": "a"}).to_dict()
    )
    b = history_priors(priors, runs, law=LAW, labels={"model": "b"})
    assert a.laws[LAW].mean["alpha"] < 0.45 < b.laws[LAW].mean["alpha"]


def test_history_priors_rejects_unknown_law():
    with pytest.raises(ValueError, match="`law`"):
        history_priors(Priors.default(), [], law="cubic")
    priors = Priors.default()
    with pytest.raises(ValueError, match="`name`"):
        priors.with_law("cubic", priors.laws[LAW])


def test_history_sharpens_a_wsd_forecast_before_its_cooldown(history_folder):
    """Past runs of the same model (other lengths, same cooldown amplitude) tell a new WSD
    run how much its cooldown will bring, which its own data cannot before the cooldown."""
    lr = wsd(4000)
    steps, loss = curve(lr, seed=7)
    target = truth(lr)
    sharpened = history_priors(
        Priors.default(), load_history(history_folder), law=LAW, labels={"model": "m"}, schedule=lr
    )
    for upto in (0.25, 0.5):  # the cooldown starts at 80%
        alone = fed(lr, steps, loss, upto).forecast()
        with_history = fed(lr, steps, loss, upto, priors=sharpened).forecast()
        assert abs(with_history.loss - target) < 0.5 * abs(alone.loss - target)
        assert with_history.low <= target <= with_history.high
