"""Online store of observed losses, merged into a bounded number of step bins in O(1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Observations", "Binned"]


@dataclass(frozen=True)
class Binned:
    """Observed losses averaged per bin: the points a fit sees.

    Attributes
    ----------
    step : ndarray of int
        Mean step of each bin (rounded).
    loss : ndarray
        Mean loss of each bin.
    count : ndarray
        Number of observations in each bin.
    point_noise : float
        Estimated noise of a single observation (standard deviation).
    """

    step: NDArray[np.int64]
    loss: NDArray[np.float64]
    count: NDArray[np.float64]
    point_noise: float

    def __len__(self) -> int:
        return len(self.step)


class Observations:
    """Finite ``(step, loss)`` observations with strictly increasing steps, binned on arrival.

    Bins cover ``width`` steps each; when more than ``max_bins`` are open the width doubles
    and neighbours merge, so memory and ``add`` stay O(1) for runs of any length. Each bin
    keeps the sums needed for its mean and for a noise estimate from successive differences.
    """

    _FIELDS = ("n", "sum_step", "sum_loss", "sum_sqdiff", "n_diff")

    def __init__(self, max_bins: int = 256) -> None:
        if max_bins < 8:
            raise ValueError(f"`max_bins` must be at least 8, got {max_bins}.")
        self.max_bins = max_bins
        self.width = 1
        self.origin: int | None = None
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.n_total = 0
        self._bins: dict[str, list[float]] = {f: [] for f in self._FIELDS}

    def add(self, step: int, loss: float) -> None:
        """Add one observation; ``step`` must exceed the previous one (checked by the caller)."""
        if self.origin is None:
            self.origin = step
        index = (step - self.origin) // self.width
        bins = self._bins
        while index >= self.max_bins:
            self._merge_pairs()
            index = (step - self.origin) // self.width
        while len(bins["n"]) <= index:
            for f in self._FIELDS:
                bins[f].append(0.0)
        bins["n"][index] += 1
        bins["sum_step"][index] += step
        bins["sum_loss"][index] += loss
        if self.last_loss is not None:
            bins["sum_sqdiff"][index] += (loss - self.last_loss) ** 2
            bins["n_diff"][index] += 1
        self.last_step, self.last_loss = step, loss
        self.n_total += 1

    def _merge_pairs(self) -> None:
        self.width *= 2
        for f in self._FIELDS:
            v = self._bins[f]
            if len(v) % 2:
                v.append(0.0)
            self._bins[f] = [v[i] + v[i + 1] for i in range(0, len(v), 2)]

    def binned(self) -> Binned:
        """The non-empty bins and the per-observation noise estimate."""
        b = {f: np.asarray(v, dtype=np.float64) for f, v in self._bins.items()}
        ok = b["n"] > 0
        n = b["n"][ok]
        step = (
            np.rint(b["sum_step"][ok] / n).astype(np.int64) if ok.any() else np.zeros(0, np.int64)
        )
        loss = b["sum_loss"][ok] / n if ok.any() else np.zeros(0)
        return Binned(step, loss, n, self._point_noise(b, loss))

    def _point_noise(self, b: dict[str, NDArray[np.float64]], loss: NDArray[np.float64]) -> float:
        """Robust per-observation noise: median within-bin successive-difference variance.

        With one observation per bin (a smoothed or sparse curve) fall back to differences
        of successive bin means, whose trend part keeps the estimate conservative.
        """
        has = b["n_diff"] >= 2
        if has.sum() >= 3:
            var = b["sum_sqdiff"][has] / b["n_diff"][has] / 2.0
            return float(np.sqrt(np.median(var)))
        if len(loss) >= 4:
            d = np.diff(loss)
            return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))
        return 0.0

    def state_dict(self) -> dict:
        """JSON-safe state."""
        return {
            "max_bins": self.max_bins,
            "width": self.width,
            "origin": self.origin,
            "last_step": self.last_step,
            "last_loss": self.last_loss,
            "n_total": self.n_total,
            "bins": {f: list(v) for f, v in self._bins.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Observations:
        """Rebuild from :meth:`state_dict` output (the input is not modified)."""
        obs = cls(int(state["max_bins"]))
        obs.width = int(state["width"])
        obs.origin = state["origin"]
        obs.last_step = state["last_step"]
        obs.last_loss = state["last_loss"]
        obs.n_total = int(state["n_total"])
        obs._bins = {f: [float(x) for x in state["bins"][f]] for f in cls._FIELDS}
        return obs
