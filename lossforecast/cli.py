"""The ``lossforecast`` command line: ``lossforecast backtest`` replays a logged run.

Run ``lossforecast backtest --help`` (or ``python -m lossforecast backtest --help``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ._backtest import DEFAULT_CUTOFFS, BacktestPoint, backtest
from ._io import Curve, read_curve_csv, read_schedule_csv, read_tensorboard, schedule_from_curve
from ._laws import LAWS

__all__ = ["main"]

PROG = "lossforecast"

_EPILOG = """\
examples:
  lossforecast backtest run.csv --lr run.lr.csv --plot run.png
  lossforecast backtest run.csv --total-steps 24000 --cutoffs 0.25,0.5,0.75
  lossforecast backtest --tb lightning_logs/version_0 --loss-tag train_loss --lr-tag lr-AdamW
"""


class _InputError(Exception):
    """Bad input found after parsing: reported as one line, exit code 2."""


def _cutoffs(text: str) -> tuple[float, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part[:-1]) / 100.0 if part.endswith("%") else float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"{part!r} is not a share of the run in (0, 1]")
        out.append(value)
    return tuple(out)


def _coverage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Forecast the final loss of a training run from its LR schedule."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bt = sub.add_parser(
        "backtest",
        help="replay a logged run and compare forecasts of its final loss with the truth",
        description=(
            "Replay a logged run: for each cutoff, fit on the points up to that share of the "
            "planned steps and forecast the loss at the last logged step; print forecast, "
            "interval, truth and error. A cutoff at or past the last logged step (a run that "
            "ended early) gets no forecast: there is nothing left to forecast."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bt.add_argument(
        "curve", nargs="?", metavar="CURVE.csv", help="logged run, CSV with step,lr,loss"
    )
    bt.add_argument("--tb", metavar="DIR", help="read the run from TensorBoard event files in DIR")
    bt.add_argument("--loss-tag", metavar="TAG", help="loss scalar tag (with --tb)")
    bt.add_argument("--lr-tag", metavar="TAG", help="learning-rate scalar tag (with --tb)")
    bt.add_argument(
        "--lr", metavar="SCHEDULE.csv", help="planned LR of every step, CSV with step,lr"
    )
    bt.add_argument(
        "--total-steps",
        type=_positive_int,
        metavar="T",
        help="planned optimizer steps (default: the schedule's length, else last step + 1)",
    )
    bt.add_argument(
        "--cutoffs",
        type=_cutoffs,
        default=DEFAULT_CUTOFFS,
        metavar="LIST",
        help="comma-separated shares of the planned steps (default: 0.1,0.25,0.5,0.75,0.9)",
    )
    bt.add_argument(
        "--coverage", type=_coverage, default=0.8, help="interval probability (default: 0.8)"
    )
    bt.add_argument("--law", choices=sorted(LAWS), default="multi-power", help="law to fit")
    bt.add_argument(
        "--plot", metavar="OUT.png", help="draw curve, forecasts and bands (matplotlib)"
    )
    bt.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the message
        return int(exc.code or 0)
    prog = f"{PROG} {args.command}"
    try:
        return _backtest(args, prog)
    except (_InputError, ValueError, ImportError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
    return 2


def _note(prog: str, text: str) -> None:
    print(f"{prog}: note: {text}", file=sys.stderr)


def _load(args) -> tuple[Curve, str]:
    if (args.curve is None) == (args.tb is None):
        raise _InputError("give either a CURVE.csv or --tb DIR (one of them).")
    if args.tb is not None:
        if not args.loss_tag:
            raise _InputError("--tb needs --loss-tag TAG.")
        return read_tensorboard(args.tb, args.loss_tag, args.lr_tag), f"{args.tb} [{args.loss_tag}]"
    if args.loss_tag or args.lr_tag:
        raise _InputError("--loss-tag and --lr-tag go with --tb DIR.")
    return read_curve_csv(args.curve), str(args.curve)


def _schedule(args, curve: Curve, prog: str) -> tuple[np.ndarray, str]:
    if args.lr is not None:
        lr = read_schedule_csv(args.lr)
        if args.total_steps is not None and args.total_steps != len(lr):
            raise _InputError(
                f"--total-steps {args.total_steps} differs from the {len(lr)} steps in {args.lr}."
            )
        return lr, "file"
    if curve.lr is None:
        hint = "--lr-tag TAG or " if args.tb is not None else ""
        raise _InputError(
            f"the run logs no learning rate: give {hint}--lr SCHEDULE.csv (the LR of every step)."
        )
    total = args.total_steps
    if total is None:
        total = int(curve.steps[-1]) + 1
        _note(prog, f"no --total-steps: assuming the run planned {total:,} steps (last step + 1).")
    rebuilt = schedule_from_curve(curve, total)
    if rebuilt.interpolated:
        _note(
            prog,
            f"no --lr: the LR of the {total - rebuilt.n_logged:,} of {total:,} steps that were not "
            "logged is interpolated between logged points; pass --lr SCHEDULE.csv for the exact "
            "planned LR.",
        )
    return rebuilt.lr, "curve-interpolated" if rebuilt.interpolated else "curve"


def _backtest(args, prog: str) -> int:
    if args.plot:
        _require_matplotlib()
    curve, label = _load(args)
    lr, lr_source = _schedule(args, curve, prog)
    total = len(lr)
    keep = curve.steps < total
    if not keep.all():
        _note(
            prog,
            f"dropped {int((~keep).sum()):,} points at step >= {total:,} (outside the schedule).",
        )
    steps, loss = curve.steps[keep], curve.loss[keep]
    finite = np.flatnonzero(np.isfinite(loss))
    if not finite.size:
        raise _InputError(f"{label}: no finite loss below step {total:,}.")
    last = int(finite[-1])
    final_step, truth = int(steps[last]), float(loss[last])
    traj = None
    if args.plot:
        traj = np.unique(np.linspace(0, final_step, 240).astype(np.int64))
    points = backtest(
        steps,
        loss,
        lr,
        cutoffs=args.cutoffs,
        final_step=final_step,
        truth=truth,
        trajectory_steps=traj,
        law=args.law,
        coverage=args.coverage,
    )
    print(
        f"Backtest of {label}: {len(steps):,} points, {total:,} planned steps, law {args.law}\n"
        f"Final loss to forecast: {truth:.4f} at step {final_step:,} (the last logged point, "
        f"{final_step / total:.1%} of the planned steps)\n"
    )
    print(_table(points, args.coverage))
    if args.json:
        _write_json(args.json, label, total, lr_source, final_step, truth, args, points)
    if args.plot:
        _plot(args.plot, label, steps, loss, points, final_step, truth, total)
    return 0


# ---------------------------------------------------------------------------- output
def _table(points: list[BacktestPoint], coverage: float) -> str:
    """An aligned plain-text table, one row per cutoff."""
    header = [
        "cutoff",
        "observed step",
        "forecast",
        f"{coverage:.0%} interval",
        "truth",
        "error",
        "in interval",
    ]
    rows = []
    for p in points:
        f = p.forecast
        observed = "-" if p.observed_step is None else f"{p.observed_step:,}"
        if f is None:
            why = "(after the final step)" if p.after_final else "(no forecast yet)"
            rows.append([f"{p.cutoff:.0%}", observed, "-", why, f"{p.truth:.4f}", "-", "-"])
            continue
        rows.append(
            [
                f"{p.cutoff:.0%}",
                observed,
                f"{f.loss:.4f}",
                f"{f.low:.4f} .. {f.high:.4f}",
                f"{p.truth:.4f}",
                f"{100 * p.rel_error:+.2f}%",
                "yes" if p.covered else "no",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {3, 6}

    def fmt(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path, label, total, lr_source, final_step, truth, args, points) -> None:
    out = {
        "run": label,
        "total_steps": total,
        "lr_source": lr_source,
        "law": args.law,
        "coverage": args.coverage,
        "final_step": final_step,
        "truth": truth,
        "points": [
            {
                "cutoff": p.cutoff,
                "observed_step": p.observed_step,
                "forecast": None
                if p.forecast is None
                else {k: _jsonable(v) for k, v in asdict(p.forecast).items()},
                "truth": p.truth,
                "rel_error": p.rel_error,
                "covered": p.covered,
                "after_final": p.after_final,
            }
            for p in points
        ],
    }
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError('--plot needs matplotlib: pip install "lossforecast[plot]"') from None


def _plot(path, label, steps, loss, points, final_step, truth, total) -> None:
    """Curve, each cutoff's predicted trajectory with its band, and the final forecasts."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="0.35", lw=0.8, label="logged loss")
    cmap = colormaps["viridis"]
    n = len(points)
    lows, highs = [truth], [truth]
    for i, p in enumerate(points):
        color = cmap(0.85 * i / max(n - 1, 1))
        if p.observed_step is not None:
            ax.axvline(p.observed_step, color=color, ls=":", lw=0.8)
        if p.trajectory is not None:
            t = p.trajectory
            ax.plot(t.steps, t.loss, color=color, lw=1.2)
            ax.fill_between(t.steps, t.low, t.high, color=color, alpha=0.15, lw=0)
        f = p.forecast
        if f is not None:
            x = final_step + (i - (n - 1) / 2) * 0.006 * total
            ax.errorbar(
                x,
                f.loss,
                yerr=[[f.loss - f.low], [f.high - f.loss]],
                fmt="o",
                ms=4,
                color=color,
                capsize=3,
                label=f"{p.cutoff:.0%}: {f.loss:.4f} ({100 * p.rel_error:+.2f}%)",
            )
            lows.append(f.low)
            highs.append(f.high)
    ax.plot(final_step, truth, "*", color="crimson", ms=11, label=f"truth {truth:.4f}")
    finite = np.isfinite(loss)
    later = finite & (steps >= 0.05 * total)
    shown = loss[later] if later.any() else loss[finite]
    bottom = min(float(shown.min()), min(lows))
    top = max(
        float(shown.max()),
        min(max(highs), float(shown.max()) + 0.5 * (float(shown.max()) - bottom)),
    )
    pad = 0.05 * (top - bottom or 1.0)
    ax.set_ylim(bottom - pad, top + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"lossforecast backtest: {label}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path)
