"""Readers: curve and schedule CSVs, TensorBoard events, rebuilt schedules, run folders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lossforecast import (
    Curve,
    load_runs,
    read_curve_csv,
    read_schedule_csv,
    read_tensorboard,
    schedule_from_curve,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- curves
def test_read_curve_csv(tmp_path):
    p = _write(tmp_path, "c.csv", "step,lr,loss\n0,0.001,5.0\n10,0.002,4.0\n20,0.001,nan\n")
    c = read_curve_csv(p)
    assert c.steps.dtype == np.int64
    assert c.steps.tolist() == [0, 10, 20]
    assert c.lr.tolist() == [0.001, 0.002, 0.001]
    assert c.loss[:2].tolist() == [5.0, 4.0] and np.isnan(c.loss[2])
    assert len(c) == 3
    with pytest.raises(ValueError):
        c.loss[0] = 1.0  # read-only


def test_read_curve_csv_without_lr_and_other_layouts(tmp_path):
    c = read_curve_csv(_write(tmp_path, "a.csv", "step,loss\n1,3.0\n2,2.5\n"))
    assert c.lr is None and c.steps.tolist() == [1, 2]
    # BOM, CRLF, other column order, extra columns, blank lines, empty lr cells
    text = "\ufeffLoss, epoch ,Step,lr\r\n3.0,0,5,\r\n\r\n2.0,0,7,0.5\r\n"
    c = read_curve_csv(_write(tmp_path, "b.csv", text))
    assert c.steps.tolist() == [5, 7] and c.loss.tolist() == [3.0, 2.0]
    assert np.isnan(c.lr[0]) and c.lr[1] == 0.5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("step,lr,loss\n", "no data rows"),
        ("step,lr\n0,1\n", "no 'loss' column"),
        ("loss\n1\n", "no 'step' column"),
        ("step,loss\n0,3.0\n1,abc\n", r"line 3: the 'loss' value 'abc' is not a number"),
        ("step,loss\n0,3.0\n1,\n", r"line 3: the 'loss' value is empty"),
        (
            "step,loss\n0,3.0\n10,2.0\n5,1.0\n",
            r"line 4: steps must increase, got step 5 after step 10",
        ),
        ("step,loss\n0,3.0\n0,2.0\n", r"line 3: steps must increase, got step 0 after step 0"),
        ("step,loss\n-1,3.0\n", r"line 2: step -1.0 is not a non-negative whole number"),
        ("step,loss\n1.5,3.0\n", r"line 2: step 1.5 is not a non-negative whole number"),
    ],
)
def test_read_curve_csv_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_curve_csv(_write(tmp_path, "bad.csv", text))


def test_read_curve_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_curve_csv(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------- schedules
def test_read_schedule_csv(tmp_path):
    lr = read_schedule_csv(_write(tmp_path, "s.csv", "step,lr\n0,0\n1,1e-3\n2,5e-4\n"))
    assert lr.tolist() == [0.0, 1e-3, 5e-4]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("step,lr\n", "no data rows"),
        ("step,loss\n0,1\n", "no 'lr' column"),
        ("step,lr\n0,1\n1,1\n3,1\n", r"line 4: expected step 2, got step 3 \(step 2 is missing"),
        ("step,lr\n1,1\n2,1\n", r"line 2: expected step 0, got step 1"),
        ("step,lr\n0,1\n1,1\n1,1\n", r"line 4: steps must increase, got step 1 after step 1"),
        ("step,lr\n0,1\n2,1\n1,1\n", r"line 4: steps must increase"),
        ("step,lr\n0,1\n1,nan\n", r"line 3: the LR of step 1 is nan"),
        ("step,lr\n0,1\n1,inf\n", r"line 3: the LR of step 1 is inf"),
        ("step,lr\n0,1\n1,-0.1\n", r"line 3: the LR of step 1 is -0.1"),
        ("step,lr\n0,1\n1,fast\n", r"line 3: the 'lr' value 'fast' is not a number"),
        ("step,lr\n0,1\n1,\n", r"line 3: the 'lr' value is empty"),
    ],
)
def test_read_schedule_csv_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_schedule_csv(_write(tmp_path, "bad.lr.csv", text))


# ---------------------------------------------------------------------------- schedule from curve
def test_schedule_from_curve_interpolates_between_logged_points():
    c = Curve(np.array([2, 4, 8]), np.array([3.0, 2.9, 2.8]), np.array([1.0, 0.5, 0.5]))
    r = schedule_from_curve(c, 10)
    assert r.interpolated and r.n_logged == 3
    np.testing.assert_allclose(r.lr, [1.0, 1.0, 1.0, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_schedule_from_curve_exact_when_every_step_is_logged():
    lr = np.linspace(1.0, 0.1, 20)
    c = Curve(np.arange(25), np.ones(25), np.r_[lr, np.full(5, 7.0)])  # points at step >= T ignored
    r = schedule_from_curve(c, 20)
    assert not r.interpolated and r.n_logged == 20
    np.testing.assert_array_equal(r.lr, lr)


@pytest.mark.parametrize(
    ("curve", "total", "match"),
    [
        (Curve(np.array([0, 1]), np.ones(2), None), 5, "no `lr` column"),
        (Curve(np.array([0, 1]), np.ones(2), np.array([np.nan, np.nan])), 5, "no finite LR"),
        (Curve(np.array([8, 9]), np.ones(2), np.array([1.0, 1.0])), 5, "no finite LR"),
        (
            Curve(np.array([0, 1]), np.ones(2), np.array([1.0, -1.0])),
            5,
            "negative LR -1.0 at step 1",
        ),
        (
            Curve(np.array([0, 1]), np.ones(2), np.array([1.0, 1.0])),
            0,
            "`total_steps` must be a positive int, got 0",
        ),
        (
            Curve(np.array([0, 1]), np.ones(2), np.array([1.0, 1.0])),
            2.5,
            "`total_steps` must be a positive int",
        ),
    ],
)
def test_schedule_from_curve_errors(curve, total, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_curve(curve, total)


# ---------------------------------------------------------------------------- TensorBoard
def _tb_writer(logdir: Path):
    summary = pytest.importorskip("tensorboard.summary")
    return summary.Writer(str(logdir))


def test_read_tensorboard_tf2_style_tensors(tmp_path):
    w = _tb_writer(tmp_path)
    for s in range(0, 100, 10):
        w.add_scalar("train/loss", 4.0 - s / 100, step=s)
    for s in range(0, 100, 20):  # LR logged at other steps: interpolated onto the loss steps
        w.add_scalar("lr", 1e-3 * (1 - s / 100), step=s)
    w.add_scalar("val/loss", 3.0, step=50)
    w.close()
    c = read_tensorboard(tmp_path, "train/loss", "lr")
    assert c.steps.tolist() == list(range(0, 100, 10))
    np.testing.assert_allclose(c.loss, 4.0 - c.steps / 100, rtol=1e-6)
    np.testing.assert_allclose(c.lr[:9], 1e-3 * (1 - c.steps[:9] / 100), rtol=1e-6)
    assert c.lr[-1] == pytest.approx(1e-3 * 0.2)  # held after the last logged LR
    assert read_tensorboard(tmp_path, "val/loss").lr is None


def test_read_tensorboard_torch_summary_writer(tmp_path):
    tb = pytest.importorskip("torch.utils.tensorboard")
    w = tb.SummaryWriter(str(tmp_path))
    for s in range(5):
        w.add_scalar("loss", 3.0 - 0.1 * s, s)
        w.add_scalar("lr-AdamW", 1e-3, s)
    w.close()
    c = read_tensorboard(tmp_path, "loss", "lr-AdamW")
    assert c.steps.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(c.loss, [3.0, 2.9, 2.8, 2.7, 2.6], rtol=1e-6)
    np.testing.assert_allclose(c.lr, 1e-3)


def test_read_tensorboard_resumed_run_keeps_the_later_values(tmp_path):
    w = _tb_writer(tmp_path)
    for s in range(0, 50, 10):
        w.add_scalar("loss", 5.0, step=s)
    for s in range(20, 40, 10):  # resumed from step 20
        w.add_scalar("loss", 4.0, step=s)
    w.close()
    c = read_tensorboard(tmp_path, "loss")
    assert np.all(np.diff(c.steps) > 0)
    assert dict(zip(c.steps.tolist(), c.loss.tolist(), strict=True))[20] == 4.0


def test_read_tensorboard_missing_tag_lists_available(tmp_path):
    w = _tb_writer(tmp_path)
    w.add_scalar("train/loss", 3.0, step=1)
    w.add_scalar("lr-Adam", 1e-3, step=1)
    w.close()
    with pytest.raises(
        ValueError, match=r"no scalar tag 'loss' .*available tags: lr-Adam, train/loss"
    ):
        read_tensorboard(tmp_path, "loss")
    with pytest.raises(ValueError, match=r"no scalar tag 'lr' for the learning rate"):
        read_tensorboard(tmp_path, "train/loss", "lr")


def test_read_tensorboard_points_to_nested_event_files(tmp_path):
    w = _tb_writer(tmp_path / "version_0")
    w.add_scalar("loss", 3.0, step=1)
    w.close()
    with pytest.raises(ValueError, match=r"no TensorBoard event files .*found in: .*version_0"):
        read_tensorboard(tmp_path, "loss")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_tensorboard(tmp_path / "missing", "loss")


def test_read_tensorboard_without_tensorboard_suggests_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing", None)
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    with pytest.raises(ImportError, match=r'pip install "lossforecast\[tensorboard\]"'):
        read_tensorboard(tmp_path, "loss")


# ---------------------------------------------------------------------------- run folders
def _folder(tmp_path: Path) -> Path:
    (tmp_path / "curves").mkdir()
    (tmp_path / "schedules").mkdir()
    header = (
        "run,source,model,schedule,total_steps,n_points,first_step,final_step,final_loss,"
        "final_window,smoothed,lr_file,lr_max_rel_err\n"
    )
    rows = [
        "a,org/repo,10M,wsd,6,3,0,4,2.5,1,yes,schedules/a.lr.csv,0\n",
        "b,org/repo,10M,cosine,4,4,0,3,2.7,1,no,schedules/missing.lr.csv,0\n",
    ]
    (tmp_path / "index.csv").write_text(header + "".join(rows))
    (tmp_path / "schedules" / "a.lr.csv").write_text(
        "step,lr\n" + "".join(f"{i},{v}\n" for i, v in enumerate([0.5, 1, 1, 1, 0.5, 0]))
    )
    (tmp_path / "curves" / "a.csv").write_text("step,lr,loss\n0,0.5,4\n2,1,3\n4,0.5,2.5\n6,0,2.4\n")
    (tmp_path / "curves" / "b.csv").write_text(
        "step,lr,loss\n0,1,4\n1,0.8,3\n2,0.5,2.8\n3,0.2,2.7\n"
    )
    return tmp_path


def test_load_runs_small_folder(tmp_path):
    runs = load_runs(_folder(tmp_path))
    assert [r.name for r in runs] == ["a", "b"]
    a, b = runs
    assert (a.source, a.model, a.schedule, a.smoothed) == ("org/repo", "10M", "wsd", "yes")
    assert (a.total_steps, a.final_step, a.final_loss) == (6, 4, 2.5)
    assert a.steps.tolist() == [0, 2, 4]  # the point at step 6 >= T is dropped
    assert a.loss.tolist() == [4.0, 3.0, 2.5]
    assert a.lr_schedule.tolist() == [0.5, 1, 1, 1, 0.5, 0] and a.lr_source == "file"
    # b's schedule file does not exist: rebuilt exactly from its per-step lr column
    assert b.lr_source == "curve"
    assert b.lr_schedule.tolist() == [1.0, 0.8, 0.5, 0.2]


def test_load_runs_rejects_a_schedule_of_the_wrong_length(tmp_path):
    folder = _folder(tmp_path)
    (folder / "schedules" / "a.lr.csv").write_text("step,lr\n0,1\n1,1\n")
    with pytest.raises(ValueError, match="run 'a' has total_steps=6 but its schedule has 2 steps"):
        load_runs(folder)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder not present")
def test_load_runs_shared_data():
    runs = load_runs(SHARED_DATA)
    assert len(runs) == 51
    assert {r.source for r in runs} == {
        "thu-yao-01-luo/MultiPowerLaw",
        "zyyyyyy123/tdlt",
        "fabian-sp/lr-scheduling",
    }
    for r in runs:
        assert len(r.lr_schedule) == r.total_steps
        assert r.steps.size == r.loss.size > 0
        assert r.steps.max() < r.total_steps
        assert r.final_step in r.steps
        assert np.isfinite(r.final_loss) and r.final_loss > 0
        assert r.lr_source in ("file", "curve")
        assert r.smoothed in ("yes", "no", "val")
    per_step = [r for r in runs if r.name.startswith("tdlt-")]
    assert len(per_step) == 3 and all(r.steps.size == r.total_steps for r in per_step)
