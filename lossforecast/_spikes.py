"""Loss spikes: residuals against the forecast, the production mean + 6σ rule, the bad-batch log."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._events import Event

__all__ = ["BadBatchLog", "MeanStdSpikeRule", "SpikeCheck", "check_positive", "robust_sigma"]

logger = logging.getLogger(__name__)

_MAD_TO_SIGMA = 1.4826  # median absolute deviation of a normal sample, in standard deviations


def check_positive(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float = 0.0,
    allow_zero: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number > ``minimum``
    (>= 0 with ``allow_zero``)."""
    kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, kind)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > minimum)
    )
    if not ok:
        what = "int" if integer else "number"
        bound = ">= 0" if allow_zero else f"> {minimum:g}"
        raise ValueError(f"`{name}` must be a {what} {bound}, got {value!r}.")


def robust_sigma(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 × median absolute deviation) of ``values``: a σ that ignores spikes."""
    med = float(np.median(values))
    return med, _MAD_TO_SIGMA * float(np.median(np.abs(values - med)))


@dataclass(frozen=True)
class SpikeCheck:
    """One spike test of a value against its reference.

    Attributes
    ----------
    is_spike : bool
        True if the value is a spike.
    excess : float
        Value minus its reference (the forecast, or the rolling statistic).
    sigma : float
        Scale the excess is measured in.
    z : float
        ``excess / sigma`` (``inf`` when ``sigma`` is 0 and the excess positive).
    """

    is_spike: bool
    excess: float
    sigma: float
    z: float


class MeanStdSpikeRule:
    """The production spike rule: value > mean + ``n_sigma`` σ of the last ``window`` values.

    OLMo and levanter skip a step when the loss (or gradient norm) exceeds the mean plus six
    standard deviations of the last 128 finite values, once 64 are seen; non-finite values
    are filtered first. This class is that rule, kept as the baseline the forecast-residual
    detector of :class:`~lossforecast.InstabilityDetector` is compared with.

    Parameters
    ----------
    window : int, optional
        Values the mean and σ are taken over. Default 128.
    n_sigma : float, optional
        Threshold in standard deviations. Default 6.
    min_history : int, optional
        Finite values needed before the rule is active. Default 64.
    metric : str, optional
        Name used in messages and event data. Default ``'loss'``.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> rule = MeanStdSpikeRule(window=16, min_history=8)
    >>> [e for s in range(20) for e in rule.observe(s, 3.0 + 0.01 * (s % 3))]
    []
    >>> [e.severity for e in rule.observe(20, 9.0)]
    ['warning']
    """

    def __init__(
        self,
        window: int = 128,
        n_sigma: float = 6.0,
        *,
        min_history: int = 64,
        metric: str = "loss",
    ) -> None:
        check_positive("window", window, integer=True, minimum=1)
        check_positive("n_sigma", n_sigma)
        check_positive("min_history", min_history, integer=True, minimum=1)
        if min_history > window:
            raise ValueError(f"`min_history` must be <= `window` ({window}), got {min_history!r}.")
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"`metric` must be a non-empty str, got {metric!r}.")
        self.window = int(window)
        self.n_sigma = float(n_sigma)
        self.min_history = int(min_history)
        self.metric = metric
        self._values: deque[float] = deque(maxlen=self.window)
        self._armed = True

    def check(self, value: float) -> SpikeCheck:
        """Test ``value`` against the current window without recording it."""
        if len(self._values) < self.min_history:
            return SpikeCheck(False, 0.0, math.nan, math.nan)
        arr = np.fromiter(self._values, float)
        mean, std = float(arr.mean()), float(arr.std())
        excess = value - mean
        z = excess / std if std > 0 else (math.inf if excess > 0 else 0.0)
        return SpikeCheck(bool(z > self.n_sigma), excess, std, z)

    def observe(self, step: int, value: float) -> list[Event]:
        """Record ``value`` at ``step``; a warning event when it is a spike (once per spike run).

        Non-finite values are filtered (they are not this rule's business) and spikes are kept
        out of the window, as the production implementations do.
        """
        value = float(value)
        if not math.isfinite(value):
            return []
        result = self.check(value)
        if not result.is_spike:
            self._values.append(value)
            self._armed = True
            return []
        if not self._armed:
            return []
        self._armed = False
        message = (
            f"{self.metric} spike at step {step}: {value:.4g} is {result.z:.1f}σ above the mean "
            f"{value - result.excess:.4g} of the last {len(self._values)} steps "
            f"(rule: mean + {self.n_sigma:g}σ over {self.window})."
        )
        data = {self.metric: value, "mean": value - result.excess, "sigma": result.sigma}
        data["z"] = result.z
        data["rule"] = "mean_std"
        return [Event("warning", "warning", int(step), message, data)]

    def state_dict(self) -> dict:
        """JSON-safe state: the window and whether the rule is armed."""
        return {"version": 1, "values": list(self._values), "armed": self._armed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (``state`` is not modified)."""
        self._values = deque((float(v) for v in state["values"]), maxlen=self.window)
        self._armed = bool(state.get("armed", True))


class BadBatchLog:
    """Spikes and non-finite losses written where Lightning's ``SpikeDetection`` writes them.

    ``path`` receives exactly what ``SpikeDetection(exclude_batches_path=...)`` writes: a JSON
    list of batch indices (for each bad batch, the one before it and itself, since the batch
    before may have corrupted the weights), so code that skips those batches on resume reads
    it unchanged. Where the batch index is unknown the step is used. The details (step,
    batch index, loss, reason, the checkpoint to roll back to) go next to it, to
    ``<stem>.details.json``. Writing never raises: a failure is logged once.

    Parameters
    ----------
    path : str or path-like
        The JSON file; a directory gets ``skip_batches.json`` inside it (as in Lightning).

    Attributes
    ----------
    batches : list of int
        The indices written to ``path``, in order, without repeats.
    records : list of dict
        One dict a bad batch: ``step``, ``batch_idx`` (or None), ``loss`` (None if
        non-finite), ``reason`` (``'spike'`` or ``'nonfinite'``), ``checkpoint`` (or None).

    Examples
    --------
    >>> import tempfile, json, os
    >>> d = tempfile.mkdtemp()
    >>> log = BadBatchLog(d)
    >>> log.record(120, batch_idx=37, loss=float("nan"), reason="nonfinite")
    >>> json.load(open(os.path.join(d, "skip_batches.json")))
    [36, 37]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"`path` must be a file or directory path, got {path!r}.")
        p = Path(path)
        if p.suffix != ".json":
            p = p / "skip_batches.json"
        self.path = p
        self.details_path = p.with_name(p.stem + ".details.json")
        self.batches: list[int] = []
        self.records: list[dict[str, Any]] = []
        self._failed = False

    def record(
        self,
        step: int,
        *,
        batch_idx: int | None = None,
        loss: float | None = None,
        reason: str = "spike",
        checkpoint: str | None = None,
    ) -> None:
        """Add one bad batch and rewrite both files (never raises)."""
        try:
            index = int(step if batch_idx is None else batch_idx)
            for i in (index - 1, index):
                if i >= 0 and i not in self.batches:
                    self.batches.append(i)
            value = None if loss is None or not math.isfinite(float(loss)) else float(loss)
            self.records.append(
                {
                    "step": int(step),
                    "batch_idx": None if batch_idx is None else int(batch_idx),
                    "loss": value,
                    "reason": str(reason),
                    "checkpoint": None if checkpoint is None else str(checkpoint),
                }
            )
            self._write(self.path, self.batches)
            self._write(self.details_path, {"version": 1, "records": self.records})
        except Exception as exc:  # bookkeeping must never break training
            if not self._failed:
                self._failed = True
                logger.warning(
                    "lossforecast: could not write the bad-batch log %s (%s: %s).",
                    self.path,
                    type(exc).__name__,
                    exc,
                )

    @staticmethod
    def _write(path: Path, payload: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=4)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def state_dict(self) -> dict:
        """JSON-safe state: the indices and records so far."""
        return {
            "version": 1,
            "batches": list(self.batches),
            "records": [dict(r) for r in self.records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (``state`` is unchanged; no file is rewritten)."""
        self.batches = [int(b) for b in state["batches"]]
        self.records = [dict(r) for r in state["records"]]

    def __repr__(self) -> str:
        return f"BadBatchLog({str(self.path)!r}, batches={len(self.batches)})"
