"""Capture the planned LR schedule of a torch optimizer by simulating a copy of its schedulers."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

__all__ = ["CapturedSchedule", "capture_schedule", "lightning_step_mask"]


@dataclass(frozen=True)
class CapturedSchedule:
    """The LR an optimizer will use at each of its next optimizer steps.

    Attributes
    ----------
    lr : ndarray, shape (n_steps,)
        LR of parameter group 0 at each of the next ``n_steps`` optimizer steps.
    exact : bool
        False where the schedule could not be simulated and ``lr`` holds the current LR
        from the first unknown step on.
    note : str or None
        Why the schedule is not exact, as a sentence for the user; None when exact.
    """

    lr: NDArray[np.float64]
    exact: bool
    note: str | None


def capture_schedule(
    optimizer: Any,
    schedulers: Sequence[Any] = (),
    n_steps: int = 1,
    *,
    step_masks: Sequence[Sequence[bool] | None] | None = None,
    keep: Iterable[Any] = (),
) -> CapturedSchedule:
    """Simulate copies of ``schedulers`` on a dummy parameter for the next ``n_steps`` steps.

    The optimizer's parameter groups (hyper-parameters only) are copied onto a one-element
    dummy parameter and each scheduler is deep-copied against it, so neither the model nor
    the optimizer state is copied and the real objects are left untouched. The schedule is
    read from parameter group 0: with several groups (e.g. no weight decay on norms) the
    forecast follows the first group's LR.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer whose group-0 LR is captured, in its current state (a resumed run
        captures the rest of its schedule).
    schedulers : sequence of LR schedulers, optional
        Schedulers stepped after optimizer steps, in the order they are stepped. Empty: the
        current LR is kept.
    n_steps : int, optional
        Number of optimizer steps to capture, at least 1. Default 1.
    step_masks : sequence of (sequence of bool or None), optional
        One entry per scheduler: ``mask[i]`` says whether it steps after optimizer step
        ``i``; None (the default for every scheduler) steps it after every optimizer step.
    keep : iterable, optional
        Objects the scheduler copies must share rather than copy (e.g. the model, when an
        LR lambda is one of its bound methods).

    Returns
    -------
    CapturedSchedule
        ``lr``, ``exact`` and ``note``. ``ReduceLROnPlateau``, a scheduler that cannot be
        copied, or one that raises while simulated gives ``exact=False`` and the current
        (or last simulated) LR from then on, and a note for the user.

    Raises
    ------
    ValueError
        If ``n_steps`` is not a positive int or a mask has the wrong length.

    Examples
    --------
    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    >>> capture_schedule(opt, [sched], 5).lr.tolist()
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"`n_steps` must be a positive int, got {n_steps!r}.")
    schedulers = [s for s in schedulers if s is not None]
    masks = _check_masks(step_masks, len(schedulers), n_steps)
    current = _lr_value(optimizer.param_groups[0]["lr"])
    if not schedulers:
        return CapturedSchedule(np.full(n_steps, current), True, None)
    if any(isinstance(s, ReduceLROnPlateau) for s in schedulers):
        return _unknown(
            n_steps,
            np.zeros(0),
            current,
            "ReduceLROnPlateau sets the LR from a metric: its schedule cannot be known in advance",
        )
    try:
        dummy, copies = _copy_schedulers(optimizer, schedulers, keep)
    except Exception as exc:  # any object graph may refuse to be copied
        return _unknown(
            n_steps,
            np.zeros(0),
            current,
            f"the scheduler could not be copied ({type(exc).__name__}: {exc})",
        )
    out = np.empty(n_steps)
    if len(copies) == 1 and type(copies[0]) is LambdaLR and masks[0] is None:
        done, error = _simulate_lambda(copies[0], out)
    else:
        done, error = _simulate(dummy, copies, masks, out)
    if error is not None:
        return _unknown(n_steps, out[:done], current, f"simulating the scheduler raised {error}")
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        return _unknown(
            n_steps, np.zeros(0), current, "the simulated schedule has a NaN or negative LR"
        )
    return CapturedSchedule(out, True, None)


def lightning_step_mask(
    interval: str,
    frequency: int,
    *,
    start: int,
    n_steps: int,
    batches_per_epoch: float,
    accumulate: int,
) -> NDArray[np.bool_]:
    """Optimizer steps after which Lightning steps a scheduler, for ``interval`` and ``frequency``.

    Mirrors Lightning's rule: a ``"step"`` scheduler steps when the number of batches seen
    in the epoch is a multiple of ``frequency`` (batches, not optimizer steps, under
    gradient accumulation); an ``"epoch"`` scheduler steps after the last optimizer step of
    every ``frequency``-th epoch. ``start`` is the global step the capture starts at (non-zero
    for a resumed run), and every epoch has ``ceil(batches_per_epoch / accumulate)`` steps.

    Examples
    --------
    >>> lightning_step_mask(
    ...     "epoch", 1, start=0, n_steps=6, batches_per_epoch=4, accumulate=2
    ... ).tolist()
    [False, True, False, True, False, True]
    """
    if interval not in ("step", "epoch"):
        raise ValueError(f"`interval` must be 'step' or 'epoch', got {interval!r}.")
    j = start + np.arange(n_steps, dtype=np.int64)
    if not math.isfinite(batches_per_epoch):
        if interval == "epoch":
            return np.zeros(n_steps, dtype=bool)
        return ((j + 1) * accumulate) % frequency == 0
    batches = int(batches_per_epoch)
    per_epoch = max(math.ceil(batches / accumulate), 1)
    pos = j % per_epoch
    if interval == "step":
        seen = np.minimum((pos + 1) * accumulate, batches)
        return seen % frequency == 0
    epoch = j // per_epoch
    return (pos == per_epoch - 1) & ((epoch + 1) % frequency == 0)


def _check_masks(step_masks, n_schedulers: int, n_steps: int) -> list[list[bool] | None]:
    if step_masks is None:
        return [None] * n_schedulers
    if len(step_masks) != n_schedulers:
        raise ValueError(
            f"`step_masks` needs one entry per scheduler ({n_schedulers}), got {len(step_masks)}."
        )
    out: list[list[bool] | None] = []
    for mask in step_masks:
        if mask is None:
            out.append(None)
            continue
        values = np.asarray(mask, dtype=bool)
        if values.shape != (n_steps,):
            raise ValueError(
                f"each step mask must have n_steps={n_steps} entries, got shape {values.shape}."
            )
        out.append(None if values[:-1].all() else values.tolist())
    return out


def _lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def _copy_schedulers(
    optimizer: Any, schedulers: list[Any], keep: Iterable[Any]
) -> tuple[torch.optim.Optimizer, list[Any]]:
    """Copies of ``schedulers`` driving a dummy optimizer with the same group hyper-parameters."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    dummy.param_groups = [
        {
            **{k: copy.deepcopy(v) for k, v in group.items() if k != "params"},
            "params": [torch.zeros(1, requires_grad=True)],
        }
        for group in optimizer.param_groups
    ]
    memo: dict[int, Any] = {id(optimizer): dummy}
    for sched in schedulers:
        inner = getattr(sched, "optimizer", None)
        if inner is not None:
            memo[id(inner)] = dummy
    for group in optimizer.param_groups:
        for p in group["params"]:
            memo[id(p)] = p
    for obj in keep:
        memo[id(obj)] = obj
    return dummy, copy.deepcopy(schedulers, memo)


def _simulate(
    dummy: torch.optim.Optimizer,
    copies: list[Any],
    masks: list[list[bool] | None],
    out: NDArray[np.float64],
) -> tuple[int, str | None]:
    """Fill ``out`` with group-0 LRs step by step; (steps filled, error or None)."""
    group = dummy.param_groups[0]
    always = [c.step for c, m in zip(copies, masks, strict=True) if m is None]
    masked = [(c.step, m) for c, m in zip(copies, masks, strict=True) if m is not None]
    ordered = [(c.step, m) for c, m in zip(copies, masks, strict=True)]
    last = len(out) - 1
    i = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "lr_scheduler.step() before optimizer.step()"
        try:
            if not masked and not isinstance(group["lr"], torch.Tensor):
                for i in range(len(out)):
                    out[i] = group["lr"]
                    if i < last:
                        for step in always:
                            step()
            else:
                for i in range(len(out)):
                    out[i] = _lr_value(group["lr"])
                    if i < last:
                        for step, mask in ordered:
                            if mask is None or mask[i]:
                                step()
        except Exception as exc:
            return i + 1, f"{type(exc).__name__}: {exc}"
    return len(out), None


def _simulate_lambda(sched: LambdaLR, out: NDArray[np.float64]) -> tuple[int, str | None]:
    """LambdaLR stepped every step, read without the step machinery: ``base * lambda(epoch)``."""
    base, fn, epoch = sched.base_lrs[0], sched.lr_lambdas[0], sched.last_epoch
    base = _lr_value(base)
    i = 0
    try:
        for i in range(len(out)):
            out[i] = base * fn(epoch + i)
    except Exception as exc:
        return i, f"{type(exc).__name__}: {exc}"
    return len(out), None


def _unknown(
    n_steps: int, known: NDArray[np.float64], current: float, reason: str
) -> CapturedSchedule:
    """Known LRs followed by the last known (or current) LR, with a note saying so."""
    hold = float(known[-1]) if len(known) else current
    lr = np.concatenate([known, np.full(n_steps - len(known), hold)])
    note = (
        f"{reason}; the forecast assumes the LR stays at {hold:.6g} from step {len(known)} of the "
        "capture on. Pass `lr_schedule=` to give the planned schedule explicitly."
    )
    return CapturedSchedule(lr, False, note)
