"""The ``lossforecast backtest`` command on real curves, TensorBoard event files and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lossforecast import read_curve_csv
from lossforecast.cli import main

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder not present")

OWT2 = "owt2-60m-wsd-linear0.2-lr0.001-T7500"
OWT2_LR = "owt2-wsd-linear-0.2-lr0.001-T7500"


def _curve(run: str) -> str:
    return str(SHARED_DATA / "curves" / f"{run}.csv")


def _schedule(name: str) -> str:
    return str(SHARED_DATA / "schedules" / f"{name}.lr.csv")


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("------"))
    return [line.split() for line in lines[start + 1 :] if line.strip()]


def _one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lossforecast backtest: error: "), err
    for needle in needles:
        assert needle in lines[-1], err


# ---------------------------------------------------------------------------- real curves
@needs_data
def test_backtest_real_curve_with_schedule(capsys, tmp_path):
    out_json = tmp_path / "out.json"
    code = main(["backtest", _curve(OWT2), "--lr", _schedule(OWT2_LR), "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "interpolated" not in err
    assert "Final loss to forecast: 3.3810 at step 7,400" in out  # index.csv: final_loss 3.38097
    header = out.splitlines()[3]
    assert header.split()[:4] == ["cutoff", "observed", "step", "forecast"]
    rows = _table_rows(out)
    assert [r[0] for r in rows] == ["10%", "25%", "50%", "75%", "90%"]
    for r in rows:
        assert r[-1] in ("yes", "no") and r[-2].endswith("%")
    data = json.loads(out_json.read_text())
    assert data["total_steps"] == 7500 and data["final_step"] == 7400
    assert data["lr_source"] == "file" and data["law"] == "multi-power" and data["coverage"] == 0.8
    assert [p["cutoff"] for p in data["points"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    for p in data["points"]:
        f = p["forecast"]
        assert f["step"] == 7400 and f["low"] <= f["loss"] <= f["high"]
        assert p["observed_step"] <= p["cutoff"] * 7500
        assert p["rel_error"] == pytest.approx((f["loss"] - p["truth"]) / p["truth"])
        assert abs(p["rel_error"]) < 0.2  # loose sanity only


@needs_data
def test_backtest_of_a_run_that_ended_early(capsys, tmp_path):
    # The 60M WSD run cut at step 3,700 of its 7,500: no forecast from 50% of the schedule on.
    lines = Path(_curve(OWT2)).read_text().splitlines()
    kept = [lines[0]] + [row for row in lines[1:] if int(row.split(",")[0]) <= 3700]
    curve = tmp_path / "stopped.csv"
    curve.write_text("\n".join(kept) + "\n")
    out_json = tmp_path / "out.json"
    code = main(["backtest", str(curve), "--lr", _schedule(OWT2_LR), "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "at step 3,600 (the last logged point, 48.0% of the planned steps)" in out
    rows = {r[0]: r for r in _table_rows(out)}
    assert rows["10%"][-1] in ("yes", "no") and rows["25%"][-1] in ("yes", "no")
    for cut in ("50%", "75%", "90%"):
        assert rows[cut][1:3] == ["-", "-"] and "(after the final step)" in " ".join(rows[cut])
    points = json.loads(out_json.read_text())["points"]
    assert [p["after_final"] for p in points] == [False, False, True, True, True]
    assert all(p["forecast"] is None for p in points[2:])
    assert all(p["forecast"]["step"] == 3600 for p in points[:2])


@needs_data
def test_backtest_without_schedule_interpolates_and_says_so(capsys):
    code = main(
        ["backtest", _curve("mpl-25m-wsdcon-3"), "--total-steps", "16000", "--cutoffs", "25%,0.5"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "no --lr" in err and "interpolated" in err
    assert [r[0] for r in _table_rows(out)] == ["25%", "50%"]


@needs_data
def test_backtest_per_step_curve_needs_no_interpolation(capsys):
    code = main(
        [
            "backtest",
            _curve("tdlt-100m-cosine"),
            "--total-steps",
            "33908",
            "--cutoffs",
            "0.5",
            "--law",
            "lr-annealing",
            "--coverage",
            "0.95",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "interpolated" not in err
    assert "95% interval" in out and "law lr-annealing" in out


@needs_data
def test_backtest_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bt.png"
    code = main(
        [
            "backtest",
            _curve(OWT2),
            "--lr",
            _schedule(OWT2_LR),
            "--cutoffs",
            "0.25,0.75",
            "--plot",
            str(png),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


# ---------------------------------------------------------------------------- TensorBoard
def _event_dir(tmp_path: Path) -> Path:
    """A real event file with a real curve: the owt2 run (or a synthetic one without the data)."""
    summary = pytest.importorskip("tensorboard.summary")
    if SHARED_DATA.is_dir():
        c = read_curve_csv(_curve(OWT2))
        steps, loss, lr = c.steps, c.loss, c.lr
    else:
        steps = np.arange(0, 7500, 200)
        loss = 3.5 + 3.0 * (steps + 100.0) ** -0.3
        lr = np.where(steps < 6000, 1e-3, 1e-3 * (7500 - steps) / 1500)
    logdir = tmp_path / "tb"
    w = summary.Writer(str(logdir))
    for s, v, r in zip(steps.tolist(), loss.tolist(), lr.tolist(), strict=True):
        w.add_scalar("train/loss", v, step=s)
        w.add_scalar("lr-AdamW", r, step=s)
    w.close()
    return logdir


def test_backtest_tensorboard(capsys, tmp_path):
    logdir = _event_dir(tmp_path)
    code = main(
        [
            "backtest",
            "--tb",
            str(logdir),
            "--loss-tag",
            "train/loss",
            "--lr-tag",
            "lr-AdamW",
            "--total-steps",
            "7500",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "interpolated" in err
    assert "[train/loss]" in out
    assert len(_table_rows(out)) == 5


def test_backtest_tensorboard_errors(capsys, tmp_path):
    logdir = _event_dir(tmp_path)
    assert main(["backtest", "--tb", str(logdir), "--loss-tag", "loss"]) == 2
    _one_line_error(capsys.readouterr().err, "'loss'", "available tags: lr-AdamW, train/loss")
    assert main(["backtest", "--tb", str(logdir), "--loss-tag", "train/loss"]) == 2
    _one_line_error(capsys.readouterr().err, "logs no learning rate", "--lr-tag")
    assert main(["backtest", "--tb", str(logdir)]) == 2
    _one_line_error(capsys.readouterr().err, "--loss-tag")


# ---------------------------------------------------------------------------- bad input
def _bad_curve(tmp_path: Path) -> str:
    p = tmp_path / "bad.csv"
    p.write_text("step,lr,loss\n0,0.001,3.0\n10,0.001,oops\n")
    return str(p)


def _no_lr_curve(tmp_path: Path) -> str:
    p = tmp_path / "nolr.csv"
    p.write_text("step,loss\n0,3.0\n10,2.9\n")
    return str(p)


def _short_schedule(tmp_path: Path) -> str:
    p = tmp_path / "s.lr.csv"
    p.write_text("step,lr\n" + "".join(f"{i},0.001\n" for i in range(20)))
    return str(p)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (lambda t: ["backtest", str(t / "missing.csv")], ["missing.csv", "No such file"]),
        (lambda t: ["backtest", _bad_curve(t)], ["line 3", "'oops' is not a number"]),
        (lambda t: ["backtest", _no_lr_curve(t)], ["logs no learning rate", "--lr SCHEDULE.csv"]),
        (lambda t: ["backtest"], ["CURVE.csv or --tb DIR"]),
        (lambda t: ["backtest", _no_lr_curve(t), "--tb", str(t)], ["one of them"]),
        (lambda t: ["backtest", _no_lr_curve(t), "--loss-tag", "x"], ["go with --tb"]),
        (
            lambda t: [
                "backtest",
                _no_lr_curve(t),
                "--lr",
                _short_schedule(t),
                "--total-steps",
                "50",
            ],
            ["--total-steps 50 differs from the 20 steps"],
        ),
        (lambda t: ["backtest", _no_lr_curve(t), "--lr", str(t / "none.lr.csv")], ["none.lr.csv"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, needles):
    assert main(argv(tmp_path)) == 2
    _one_line_error(capsys.readouterr().err, *needles)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cutoffs", "0.5,2"], "argument --cutoffs: '2' is not a share of the run in (0, 1]"),
        (["--cutoffs", "a"], "argument --cutoffs: 'a' is not a number"),
        (["--coverage", "1.2"], "argument --coverage: '1.2' is not in (0, 1)"),
        (["--total-steps", "-3"], "argument --total-steps: '-3' is not positive"),
        (["--law", "power"], "argument --law: invalid choice: 'power'"),
    ],
)
def test_bad_options_exit_2_argparse_style(capsys, tmp_path, args, needle):
    assert main(["backtest", _no_lr_curve(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lossforecast backtest: error: ")
    assert needle in err


def test_missing_matplotlib_suggests_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["backtest", _no_lr_curve(tmp_path), "--plot", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys.readouterr().err, 'pip install "lossforecast[plot]"')
    assert not (tmp_path / "x.png").exists()


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert main(["backtest", "--help"]) == 0
    assert "--tb DIR" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "lossforecast", "backtest", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: lossforecast backtest" in proc.stdout
