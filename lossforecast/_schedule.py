"""The planned learning-rate schedule and the running features the loss laws read from it."""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Schedule", "Decrements", "annealing_area", "encode_lr", "decode_lr"]


@dataclass(frozen=True)
class Decrements:
    """LR decreases after warmup, merged into groups so a law's annealing term stays cheap.

    Attributes
    ----------
    step : ndarray, shape (G,)
        Step at which each group's decrease takes effect (its change-weighted mean step).
    drop : ndarray, shape (G,)
        Sum of ``lr[i-1] - lr[i]`` over the group, relative to the peak LR.
    lr : ndarray, shape (G,)
        LR after the group's decrease, relative to the peak LR (floored at 1e-12).
    area_before : ndarray, shape (G,)
        Forward area ``S1`` (in peak-LR steps) just before the group's decrease.
    """

    step: NDArray[np.float64]
    drop: NDArray[np.float64]
    lr: NDArray[np.float64]
    area_before: NDArray[np.float64]

    def upto(self, step: int) -> Decrements:
        """The groups that have taken effect by ``step``."""
        n = int(np.searchsorted(self.step, step, side="right"))
        return Decrements(self.step[:n], self.drop[:n], self.lr[:n], self.area_before[:n])

    def __len__(self) -> int:
        return len(self.step)


class Schedule:
    """Planned learning rate for every optimizer step ``0..T-1``.

    LRs are kept relative to the peak, so the laws' parameters are in loss units and
    transfer between runs trained at different peak LRs. ``area`` is the forward area
    ``S1(s) = sum_{i<=s} lr_i / peak`` (in peak-LR steps). Decreases before the peak
    (warmup) are not annealing and are ignored; later increases count as negative drops.

    Parameters
    ----------
    lr : array_like, shape (T,)
        LR of the update made at each step; finite, non-negative, at least one positive.
    max_groups : int, optional
        At most about this many groups of LR changes are kept for the annealing terms.
    peak_lr : float, optional
        LR that relative values are measured against; default the schedule's maximum. A
        what-if schedule uses the planned run's peak so fitted parameters keep their units.

    Raises
    ------
    ValueError
        If the schedule is empty, not one-dimensional, or has a NaN, infinite or negative
        entry, or no positive entry.

    Examples
    --------
    >>> s = Schedule([0.5, 1.0, 1.0, 0.5])
    >>> s.total_steps, s.peak_lr, s.warmup_steps
    (4, 1.0, 1)
    >>> s.area.tolist()
    [0.5, 1.5, 2.5, 3.0]
    """

    def __init__(
        self, lr: ArrayLike, *, max_groups: int = 256, peak_lr: float | None = None
    ) -> None:
        values = _validate_lr(lr)
        if max_groups < 1:
            raise ValueError(f"`max_groups` must be a positive int, got {max_groups}.")
        if peak_lr is not None and not (math.isfinite(peak_lr) and peak_lr > 0):
            raise ValueError(f"`peak_lr` must be a positive number, got {peak_lr!r}.")
        self.lr: NDArray[np.float64] = values
        self.total_steps = len(values)
        self.peak_lr = float(values.max()) if peak_lr is None else float(peak_lr)
        self.warmup_steps = int(np.argmax(values))
        rel = values / self.peak_lr
        self.relative_lr: NDArray[np.float64] = rel
        self.area: NDArray[np.float64] = np.cumsum(rel)
        self.warmup_area = float(self.area[self.warmup_steps] - rel[self.warmup_steps])
        self.decrements = _group_decrements(rel, self.area, self.warmup_steps, max_groups)

    def __len__(self) -> int:
        return self.total_steps

    def lr_area(self, step: int) -> float:
        """The LR summed over steps ``0..step``, in the optimizer's own units (``S1``)."""
        return float(self.area[step] * self.peak_lr)

    def check_steps(self, steps: ArrayLike) -> NDArray[np.int64]:
        """Validate steps against the schedule and return them as an int array."""
        arr = np.asarray(steps)
        if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
            raise ValueError("steps must be whole numbers.")
        out = arr.astype(np.int64)
        if out.size and (out.min() < 0 or out.max() >= self.total_steps):
            raise ValueError(
                f"step {int(out.max() if out.max() >= self.total_steps else out.min())} is "
                f"outside the planned schedule of {self.total_steps} steps "
                f"(0..{self.total_steps - 1})."
            )
        return out

    def __repr__(self) -> str:
        return (
            f"Schedule(total_steps={self.total_steps}, peak_lr={self.peak_lr:g}, "
            f"warmup_steps={self.warmup_steps}, groups={len(self.decrements)})"
        )


def annealing_area(schedule: Schedule, steps: ArrayLike, decay: float) -> NDArray[np.float64]:
    """``S2`` of the LR-annealing law at ``steps``: the summed annealing momentum.

    ``m_i = decay * m_{i-1} + (lr_{i-1} - lr_i)``, ``S2(s) = sum_{i<=s} m_i`` (relative LR),
    evaluated exactly from the grouped decrements as
    ``sum_g drop_g * (1 - decay**(s - step_g + 1)) / (1 - decay)``.
    """
    s = schedule.check_steps(steps).astype(np.float64)
    dec = schedule.decrements
    lag = s[:, None] - dec.step[None, :] + 1.0
    kernel = np.where(lag > 0, -np.expm1(np.log(decay) * np.maximum(lag, 0.0)), 0.0)
    return kernel @ dec.drop / (1.0 - decay)


def _validate_lr(lr: ArrayLike) -> NDArray[np.float64]:
    try:
        values = np.asarray(lr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"LR schedule must be a sequence of numbers: {exc}") from None
    if values.ndim != 1:
        raise ValueError(f"LR schedule must be one-dimensional, got shape {values.shape}.")
    if values.size == 0:
        raise ValueError("LR schedule is empty: give the planned LR of every optimizer step.")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"LR schedule has a NaN or infinite entry at step {int(np.argmax(bad))}.")
    if (values < 0).any():
        i = int(np.argmax(values < 0))
        raise ValueError(f"LR schedule has a negative entry at step {i}: {values[i]!r}.")
    if not (values > 0).any():
        raise ValueError("LR schedule has no positive entry: nothing is ever trained.")
    return values


def _group_decrements(
    rel: NDArray[np.float64], area: NDArray[np.float64], warmup: int, max_groups: int
) -> Decrements:
    """Merge per-step LR changes after the peak into at most about ``max_groups`` groups.

    A group closes when it has gathered ``1/max_groups`` of the total absolute change, so
    sudden drops stay exact steps and smooth decays are sampled evenly in LR.
    """
    change = np.zeros_like(rel)
    change[warmup + 1 :] = rel[warmup:-1] - rel[warmup + 1 :]
    idx = np.flatnonzero(change)
    if idx.size == 0:
        empty = np.zeros(0)
        return Decrements(empty, empty, empty, empty)
    mag = np.abs(change[idx])
    budget = mag.sum() / max_groups
    # A group ends at index j when the cumulative magnitude crosses a multiple of budget,
    # or when the sign of the change flips (a rewarm is never merged with a decay).
    cum = np.cumsum(mag)
    bucket = np.floor((cum - 0.5 * mag) / budget).astype(np.int64)
    sign = np.sign(change[idx])
    boundary = np.ones(idx.size, dtype=bool)
    boundary[:-1] = (bucket[1:] != bucket[:-1]) | (sign[1:] != sign[:-1])
    group_id = np.concatenate(([0], np.cumsum(boundary[:-1])))
    drop = np.bincount(group_id, weights=change[idx])
    # Representative step, LR and prior area: weighted by each step's share of the change.
    w = mag / np.bincount(group_id, weights=mag)[group_id]
    step = np.bincount(group_id, weights=w * idx)
    lr_after = np.bincount(group_id, weights=w * rel[idx])
    area_before = np.bincount(group_id, weights=w * (area[idx] - rel[idx]))
    return Decrements(
        step=step,
        drop=drop,
        lr=np.maximum(lr_after, 1e-12),
        area_before=area_before,
    )


def encode_lr(lr: ArrayLike) -> str:
    """A schedule as compact, exact, JSON-safe text: float64 bytes, zlib-compressed, base64.

    Checkpoints and ``trainer_state.json`` carry the schedule; as a list of decimal floats
    a 1e6-step run adds ~20 MB to each, while here constant stretches (warmup-stable-decay,
    step schedules) compress to almost nothing and a round trip is bit-exact.
    """
    raw = np.asarray(lr, dtype="<f8").tobytes()
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def decode_lr(text: str) -> NDArray[np.float64]:
    """Inverse of :func:`encode_lr`."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"saved LR schedule is corrupt: {exc}") from None
    return np.frombuffer(raw, dtype="<f8").copy()
