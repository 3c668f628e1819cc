"""Reading a mixed-precision loss scaler (torch ``GradScaler`` and the frameworks' wrappers)."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["AmpReader", "find_grad_scaler"]

logger = logging.getLogger(__name__)


def find_grad_scaler(obj: Any) -> Any:
    """The ``GradScaler`` inside ``obj``: itself, ``obj.scaler`` (HF Accelerator, Lightning's
    precision plugin) or ``obj.precision_plugin.scaler`` (a Lightning Trainer); else None."""
    for candidate in (
        obj,
        getattr(obj, "scaler", None),
        getattr(getattr(obj, "precision_plugin", None), "scaler", None),
        getattr(getattr(obj, "strategy", None), "precision_plugin", None),
    ):
        if candidate is not None and callable(getattr(candidate, "get_scale", None)):
            return candidate
        inner = getattr(candidate, "scaler", None)
        if inner is not None and callable(getattr(inner, "get_scale", None)):
            return inner
    return None


class AmpReader:
    """Reads a dynamic loss scaler once per optimizer step: ``(scale, skipped)``.

    A step was skipped (non-finite gradients) exactly when ``scaler.update()`` lowered the
    scale. Call :meth:`read` after ``scaler.update()`` and pass the result to
    ``InstabilityDetector.observe_amp(step, scale, skipped)``.

    Parameters
    ----------
    source : GradScaler, HF Accelerator, Lightning Trainer or precision plugin
        Where the scaler is (see :func:`find_grad_scaler`).

    Attributes
    ----------
    scaler : GradScaler or None
        The scaler found; None (and :meth:`read` returns None) without one, e.g. for bf16.
    """

    def __init__(self, source: Any) -> None:
        self.scaler = find_grad_scaler(source)
        self._last: float | None = None
        self._failed = False
        self._last = self._scale()

    def _scale(self) -> float | None:
        scaler = self.scaler
        if scaler is None or self._failed:
            return None
        try:
            if callable(getattr(scaler, "is_enabled", None)) and not scaler.is_enabled():
                return None
            return float(scaler.get_scale())
        except Exception as exc:
            self._failed = True
            logger.warning("lossforecast: cannot read the loss scale (%s); AMP checks off.", exc)
            return None

    def read(self) -> tuple[float, bool] | None:
        """``(scale, skipped)`` for the step just taken, or None without an enabled scaler."""
        scale = self._scale()
        if scale is None:
            return None
        skipped = self._last is not None and scale < self._last
        self._last = scale
        return scale, skipped
