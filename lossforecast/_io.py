"""Readers for logged loss curves, LR schedules, TensorBoard event files and run folders."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Curve",
    "Run",
    "RebuiltSchedule",
    "read_curve_csv",
    "read_schedule_csv",
    "read_tensorboard",
    "schedule_from_curve",
    "load_runs",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass(frozen=True, eq=False)
class Curve:
    """A logged loss curve.

    Attributes
    ----------
    steps : ndarray of int, shape (n,)
        Logged optimizer steps, strictly increasing, non-negative.
    loss : ndarray, shape (n,)
        Loss logged at each step (may hold NaN/inf where the run logged them).
    lr : ndarray, shape (n,), or None
        LR logged at each step (NaN where a row left it empty), or ``None`` if not logged.
    """

    steps: NDArray[np.int64]
    loss: NDArray[np.float64]
    lr: NDArray[np.float64] | None

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True, eq=False)
class RebuiltSchedule:
    """An LR schedule rebuilt from the LRs a curve logged.

    Attributes
    ----------
    lr : ndarray, shape (T,)
        LR of every step ``0..T-1``.
    interpolated : bool
        True if some steps were not logged and their LR was interpolated linearly between
        logged points (or held at the first / last logged value outside them).
    n_logged : int
        Steps of ``0..T-1`` whose LR was logged.
    """

    lr: NDArray[np.float64]
    interpolated: bool
    n_logged: int


@dataclass(frozen=True, eq=False)
class Run:
    """One run of a data folder laid out like ``shared/data`` (see :func:`load_runs`).

    Attributes
    ----------
    name : str
        Run name (file name in ``curves/`` without ``.csv``).
    source : str
        Public repository the data comes from.
    model : str
        Parameter count of the model, as written in the index (e.g. ``"100M"``).
    schedule : str
        Schedule family (``constant``, ``cosine``, ``wsd-exp``, ...).
    total_steps : int
        Planned optimizer steps ``T``.
    final_step : int
        Step whose loss is the "true final loss".
    final_loss : float
        The loss to forecast at ``final_step``.
    smoothed : str
        ``"yes"`` (smoothed training loss), ``"val"`` (validation loss) or ``"no"`` (raw).
    steps : ndarray of int
        Logged steps below ``total_steps``.
    loss : ndarray
        Loss at ``steps``.
    lr_schedule : ndarray, shape (T,)
        Planned LR of every step.
    lr_source : {'file', 'curve', 'curve-interpolated'}
        Where ``lr_schedule`` came from: the schedule file, or rebuilt from the curve's own
        ``lr`` column (exactly, or interpolated between logged steps).
    """

    name: str
    source: str
    model: str
    schedule: str
    total_steps: int
    final_step: int
    final_loss: float
    smoothed: str
    steps: NDArray[np.int64]
    loss: NDArray[np.float64]
    lr_schedule: NDArray[np.float64]
    lr_source: str


# ---------------------------------------------------------------------------- CSV files
def _read_table(path: PathLike, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """Rows of a CSV with a header, as a dict of float columns (NaN for empty cells).

    Returns the columns and the file's line number of each data row. Raises ``ValueError``
    naming the file and line for a missing column or a cell that is not a number, or if
    there is no data row.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty; expected a header line.")
        names = [h.strip().lower() for h in header]
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(
                f"{path}: the header has no {', '.join(repr(m) for m in missing)} column "
                f"(found {', '.join(repr(n) for n in names)}); expected "
                f"{','.join(required + optional)}."
            )
        wanted = [c for c in required + optional if c in names]
        index = {c: names.index(c) for c in wanted}
        cols: dict[str, list[float]] = {c: [] for c in wanted}
        lines: list[int] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            line = reader.line_num
            for c in wanted:
                i = index[c]
                cell = row[i].strip() if i < len(row) else ""
                if cell == "":
                    if c in required:
                        raise ValueError(f"{path}, line {line}: the {c!r} value is empty.")
                    cols[c].append(np.nan)
                    continue
                try:
                    cols[c].append(float(cell))
                except ValueError:
                    raise ValueError(
                        f"{path}, line {line}: the {c!r} value {cell!r} is not a number."
                    ) from None
            lines.append(line)
    if not lines:
        raise ValueError(f"{path}: no data rows after the header.")
    arrays = {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}
    return arrays, np.asarray(lines, dtype=np.int64)


def _check_steps(
    path: PathLike, steps: NDArray[np.float64], lines: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Steps as ints; ``ValueError`` naming the line of the first bad or out-of-order one."""
    bad = ~np.isfinite(steps) | (steps != np.round(steps)) | (steps < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{path}, line {lines[i]}: step {float(steps[i])} is not a non-negative whole number."
        )
    out = steps.astype(np.int64)
    if out.size > 1:
        back = np.diff(out) <= 0
        if back.any():
            i = int(np.argmax(back)) + 1
            raise ValueError(
                f"{path}, line {lines[i]}: steps must increase, got step {out[i]} after "
                f"step {out[i - 1]}."
            )
    return out


def _readonly(*arrays):
    for a in arrays:
        if a is not None:
            a.setflags(write=False)


def read_curve_csv(path: PathLike) -> Curve:
    """Read a logged loss curve from a CSV with header ``step,lr,loss`` (``lr`` optional).

    Columns may come in any order and extra columns are ignored. Loss values may be
    ``nan``/``inf`` (a forecaster counts and skips them); empty ``lr`` cells read as NaN.

    Parameters
    ----------
    path : str or path-like
        The CSV file.

    Returns
    -------
    Curve
        ``steps``, ``loss`` and ``lr`` (``None`` without an ``lr`` column).

    Raises
    ------
    ValueError
        If the header lacks ``step`` or ``loss``, a value is not a number, a step is not a
        non-negative whole number, steps do not increase, or there is no data row; the
        message names the line.
    OSError
        If the file cannot be read.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.csv"
    >>> _ = p.write_text("step,lr,loss\\n0,0.001,5.0\\n10,0.001,4.0\\n")
    >>> c = read_curve_csv(p)
    >>> c.steps.tolist(), c.loss.tolist(), c.lr.tolist()
    ([0, 10], [5.0, 4.0], [0.001, 0.001])
    """
    cols, lines = _read_table(path, ("step", "loss"), ("lr",))
    steps = _check_steps(path, cols["step"], lines)
    lr = cols.get("lr")
    if lr is not None and np.all(np.isnan(lr)):
        lr = None
    loss = cols["loss"]
    _readonly(steps, loss, lr)
    return Curve(steps, loss, lr)


def read_schedule_csv(path: PathLike) -> NDArray[np.float64]:
    """Read a planned LR schedule from a CSV with header ``step,lr`` and a row for every step.

    Parameters
    ----------
    path : str or path-like
        The CSV file; its steps must be exactly ``0, 1, ..., T-1``.

    Returns
    -------
    ndarray, shape (T,)
        The LR of every step.

    Raises
    ------
    ValueError
        If a column is missing, a step is missing, repeated or out of order, or an LR is
        not a finite non-negative number; the message names the line.
    OSError
        If the file cannot be read.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "lr.csv"
    >>> _ = p.write_text("step,lr\\n0,0.5\\n1,1.0\\n2,0.25\\n")
    >>> read_schedule_csv(p).tolist()
    [0.5, 1.0, 0.25]
    """
    cols, lines = _read_table(path, ("step", "lr"))
    steps = _check_steps(path, cols["step"], lines)
    expected = np.arange(len(steps))
    off = steps != expected
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(
            f"{path}, line {lines[i]}: expected step {i}, got step {steps[i]} "
            f"(step {i} is missing; the schedule needs the LR of every step 0..T-1)."
        )
    lr = cols["lr"]
    bad = ~np.isfinite(lr) | (lr < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{path}, line {lines[i]}: the LR of step {i} is {float(lr[i])}; "
            "it must be a finite non-negative number."
        )
    return lr


# ---------------------------------------------------------------------------- TensorBoard
def _event_accumulator():
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as exc:
        raise ImportError(
            "Reading TensorBoard event files needs the `tensorboard` package: "
            'pip install "lossforecast[tensorboard]"'
        ) from exc
    return event_accumulator


def _has_events(directory: Path) -> bool:
    return any(p.is_file() and "tfevents" in p.name for p in directory.iterdir())


def read_tensorboard(logdir: PathLike, loss_tag: str, lr_tag: str | None = None) -> Curve:
    """Read a loss curve (and optionally the LR) from the TensorBoard event files of a run.

    Reads the event files directly in ``logdir`` with TensorBoard's ``EventAccumulator``.
    Scalars written by ``SummaryWriter.add_scalar`` and TF2 ``tf.summary.scalar`` are both
    understood. A step logged twice (a resumed run) keeps its last value. The LR, which may
    be logged at other steps than the loss, is interpolated linearly onto the loss steps.

    Parameters
    ----------
    logdir : str or path-like
        Directory holding the event files (``events.out.tfevents.*``).
    loss_tag : str
        Tag of the loss scalar, e.g. ``"train/loss"``.
    lr_tag : str, optional
        Tag of the learning-rate scalar, e.g. ``"lr-AdamW"``.

    Returns
    -------
    Curve

    Raises
    ------
    ImportError
        If ``tensorboard`` is not installed.
    FileNotFoundError
        If ``logdir`` is not a directory.
    ValueError
        If there are no event files, or a tag is missing (the message lists those found).
    """
    ea_mod = _event_accumulator()
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory of TensorBoard event files.")
    if not _has_events(root):
        nested = sorted(str(p.parent) for p in root.rglob("*tfevents*") if p.is_file())
        hint = f"; event files were found in: {', '.join(dict.fromkeys(nested))}" if nested else ""
        raise ValueError(f"{root}: no TensorBoard event files (events.out.tfevents.*){hint}.")
    acc = ea_mod.EventAccumulator(str(root), size_guidance={ea_mod.SCALARS: 0, ea_mod.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars, tensors = set(tags.get("scalars", [])), set(tags.get("tensors", []))

    def series(tag: str, what: str) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        if tag in scalars:
            events = [(e.step, e.wall_time, float(e.value)) for e in acc.Scalars(tag)]
        elif tag in tensors:
            from tensorboard.util import tensor_util

            events = [
                (e.step, e.wall_time, float(np.asarray(tensor_util.make_ndarray(e.tensor_proto))))
                for e in acc.Tensors(tag)
            ]
        else:
            found = sorted(scalars | tensors)
            raise ValueError(
                f"{root}: no scalar tag {tag!r} for the {what}; available tags: "
                f"{', '.join(found) if found else '(none)'}."
            )
        if not events:
            raise ValueError(f"{root}: tag {tag!r} has no values.")
        events.sort(key=lambda e: (e[0], e[1]))
        last = {step: value for step, _, value in events}  # later writes of a step win
        steps = np.fromiter(last.keys(), dtype=np.int64, count=len(last))
        values = np.fromiter(last.values(), dtype=np.float64, count=len(last))
        if steps[0] < 0:
            raise ValueError(f"{root}: tag {tag!r} has a negative step {int(steps[0])}.")
        return steps, values

    steps, loss = series(loss_tag, "loss")
    lr = None
    if lr_tag is not None:
        lr_steps, lr_values = series(lr_tag, "learning rate")
        lr = np.interp(steps, lr_steps, lr_values)
    _readonly(steps, loss, lr)
    return Curve(steps, loss, lr)


# ---------------------------------------------------------------------------- schedules
def schedule_from_curve(curve: Curve, total_steps: int) -> RebuiltSchedule:
    """Rebuild the LR of every step ``0..total_steps-1`` from the LRs a curve logged.

    Between logged steps the LR is interpolated linearly; before the first and after the
    last logged step it is held constant, so a warmup or a drop between two logged points
    is only approximated. :attr:`RebuiltSchedule.interpolated` says whether that happened.

    Parameters
    ----------
    curve : Curve
        A curve with an ``lr`` column.
    total_steps : int
        Planned number of optimizer steps ``T``; logged points at ``step >= T`` are ignored.

    Returns
    -------
    RebuiltSchedule

    Raises
    ------
    ValueError
        If ``total_steps`` is not a positive int, or the curve has no finite LR below it.

    Examples
    --------
    >>> c = Curve(np.array([0, 2, 4]), np.array([3.0, 2.5, 2.0]), np.array([1.0, 1.0, 0.0]))
    >>> r = schedule_from_curve(c, 5)
    >>> r.lr.tolist(), r.interpolated
    ([1.0, 1.0, 1.0, 0.5, 0.0], True)
    """
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, int | np.integer)
        or total_steps < 1
    ):
        raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}.")
    if curve.lr is None:
        raise ValueError("the curve has no `lr` column, so its schedule cannot be rebuilt.")
    keep = (curve.steps < total_steps) & np.isfinite(curve.lr)
    steps, lr = curve.steps[keep], curve.lr[keep]
    if not steps.size:
        raise ValueError(f"the curve logs no finite LR at a step below total_steps={total_steps}.")
    if (lr < 0).any():
        i = int(np.argmax(lr < 0))
        raise ValueError(f"the curve logs a negative LR {float(lr[i])} at step {int(steps[i])}.")
    full = np.interp(np.arange(total_steps), steps, lr)
    n_logged = int(steps.size)
    return RebuiltSchedule(full, interpolated=n_logged < total_steps, n_logged=n_logged)


# ---------------------------------------------------------------------------- data folder
_INDEX_COLUMNS = ("run", "source", "model", "schedule", "total_steps", "final_step", "final_loss")


def load_runs(data_dir: PathLike) -> list[Run]:
    """Read every run of a folder laid out like ``shared/data``.

    The folder holds ``index.csv`` (one row a run: ``run, source, model, schedule,
    total_steps, final_step, final_loss, smoothed, lr_file, ...``), ``curves/<run>.csv``
    (``step,lr,loss``) and the schedule files named by ``lr_file`` (``step,lr`` for every
    step). Points with ``step >= total_steps`` are dropped. A run whose schedule file is
    missing gets its schedule rebuilt from the curve's own ``lr`` column, and
    :attr:`Run.lr_source` says so.

    Parameters
    ----------
    data_dir : str or path-like
        The folder.

    Returns
    -------
    list of Run
        In the order of ``index.csv``.

    Raises
    ------
    ValueError
        If ``index.csv`` lacks a column, a file is malformed, or a schedule's length differs
        from the run's ``total_steps``.
    FileNotFoundError
        If ``index.csv`` or a curve file is missing.
    """
    root = Path(data_dir)
    index = root / "index.csv"
    with index.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if rows:
        missing = [c for c in _INDEX_COLUMNS if c not in rows[0]]
        if missing:
            raise ValueError(f"{index}: missing column(s) {', '.join(missing)}.")
    schedules: dict[str, NDArray[np.float64]] = {}
    runs = []
    for line, row in enumerate(rows, start=2):
        try:
            total = int(row["total_steps"])
            final_step = int(row["final_step"])
            final_loss = float(row["final_loss"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{index}, line {line}: bad total_steps/final_step/final_loss."
            ) from None
        curve = read_curve_csv(root / "curves" / f"{row['run']}.csv")
        lr_file = (row.get("lr_file") or "").strip()
        lr_path = root / lr_file if lr_file else None
        if lr_path is not None and lr_path.is_file():
            if lr_file not in schedules:
                schedules[lr_file] = read_schedule_csv(lr_path)
            lr_schedule, lr_source = schedules[lr_file], "file"
        else:
            rebuilt = schedule_from_curve(curve, total)
            lr_schedule = rebuilt.lr
            lr_source = "curve-interpolated" if rebuilt.interpolated else "curve"
            logger.info(
                "run %s: schedule file %r not found; rebuilt from the curve's lr column (%s).",
                row["run"],
                lr_file,
                lr_source,
            )
        if len(lr_schedule) != total:
            raise ValueError(
                f"{index}, line {line}: run {row['run']!r} has total_steps={total} but its "
                f"schedule has {len(lr_schedule)} steps."
            )
        keep = curve.steps < total
        steps, loss = curve.steps[keep], curve.loss[keep]
        _readonly(steps, loss, lr_schedule)
        runs.append(
            Run(
                name=row["run"],
                source=row["source"],
                model=row["model"],
                schedule=row["schedule"],
                total_steps=total,
                final_step=final_step,
                final_loss=final_loss,
                smoothed=(row.get("smoothed") or "").strip(),
                steps=steps,
                loss=loss,
                lr_schedule=lr_schedule,
                lr_source=lr_source,
            )
        )
    return runs
