"""What-if cooldown schedules: the planned LR until a step, then a cooldown of a given shape."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["cooldown_schedule", "COOLDOWN_SHAPES"]

COOLDOWN_SHAPES = ("1-sqrt", "linear", "cosine")


def cooldown_schedule(
    lr: ArrayLike,
    start: int,
    length: int,
    shape: str = "1-sqrt",
    final_lr: float | None = None,
) -> NDArray[np.float64]:
    """The planned LR up to ``start``, then a cooldown of ``length`` steps to ``final_lr``.

    Parameters
    ----------
    lr : array_like, shape (T,)
        Planned LR of every step.
    start : int
        First step of the cooldown, in ``1..T``; steps ``0..start-1`` keep the planned LR and
        the cooldown starts from ``lr[start - 1]``.
    length : int
        Steps of the cooldown, at least 1. The result has ``start + length`` steps (it may be
        longer than ``lr``: a cooldown after an extension).
    shape : {'1-sqrt', 'linear', 'cosine'}, optional
        How the LR falls with the cooldown's progress ``p`` in (0, 1]: ``1 - sqrt(p)``
        (Hägele et al. 2024), ``1 - p``, or ``(1 + cos(pi p)) / 2``. Default ``'1-sqrt'``.
    final_lr : float, optional
        LR of the last step. Default: the planned schedule's last LR if it is below
        ``lr[start - 1]`` (a WSD plan's end), else 0 (a constant-LR plan).

    Returns
    -------
    ndarray, shape (start + length,)
        The what-if schedule, for :meth:`Forecaster.what_if`.

    Raises
    ------
    ValueError
        If an argument is out of range.

    References
    ----------
    A. Hägele, E. Bakouch, A. Kosson et al. "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations", NeurIPS 2024, arXiv:2405.18392.

    Examples
    --------
    >>> cooldown_schedule([1.0, 1.0, 1.0, 1.0], 2, 4, "linear").tolist()
    [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    values = np.asarray(lr, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("`lr` must be a non-empty 1-d sequence of finite numbers.")
    if isinstance(start, bool) or int(start) != start or not 1 <= start <= values.size:
        raise ValueError(f"`start` must be an int in 1..{values.size}, got {start!r}.")
    if isinstance(length, bool) or int(length) != length or length < 1:
        raise ValueError(f"`length` must be a positive int, got {length!r}.")
    if shape not in COOLDOWN_SHAPES:
        raise ValueError(f"`shape` must be one of {COOLDOWN_SHAPES}, got {shape!r}.")
    start, length = int(start), int(length)
    begin = float(values[start - 1])
    if final_lr is None:
        final_lr = float(values[-1]) if values[-1] < begin else 0.0
    if not (math.isfinite(final_lr) and 0.0 <= final_lr <= begin):
        raise ValueError(
            f"`final_lr` must be in [0, {begin!r}] (the LR where the cooldown starts), "
            f"got {final_lr!r}."
        )
    p = np.arange(1, length + 1, dtype=np.float64) / length
    if shape == "1-sqrt":
        fall = 1.0 - np.sqrt(p)
    elif shape == "linear":
        fall = 1.0 - p
    else:
        fall = 0.5 * (1.0 + np.cos(np.pi * p))
    return np.concatenate([values[:start], final_lr + (begin - final_lr) * fall])
