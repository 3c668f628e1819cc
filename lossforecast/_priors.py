"""Priors for law parameters the data cannot yet identify, and the interval calibration.

The shipped ``priors.json`` is written by ``scripts/derive_priors.py`` from the real curves
in ``shared/data``; :class:`Priors` reads it or any file of the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ._fit import GaussianPrior

__all__ = ["Priors", "LawPrior", "Calibration"]

PRIORS_VERSION = 1


@dataclass(frozen=True)
class LawPrior:
    """Gaussian prior for one law; ``L0`` is given as a ratio to the lowest observed loss."""

    mean: dict[str, float]
    std: dict[str, float]
    l0_ratio: tuple[float, float]

    def for_losses(self, min_loss: float) -> GaussianPrior:
        """The prior in absolute units for a run whose lowest observed loss is ``min_loss``."""
        mean = dict(self.mean, L0=self.l0_ratio[0] * min_loss)
        std = dict(self.std, L0=self.l0_ratio[1] * min_loss)
        return GaussianPrior(mean, std)


@dataclass(frozen=True)
class Calibration:
    """Relative forecast error scale as a function of training progress.

    ``scale(p)`` is the standard deviation of ``(forecast - truth) / truth`` not explained
    by the fit's own uncertainty, at progress ``p`` (share of the planned forward area seen),
    interpolated log-linearly between the knots measured by backtests.
    """

    progress: tuple[float, ...]
    rel_std: tuple[float, ...]

    def scale(self, progress: float) -> float:
        p = float(np.clip(progress, self.progress[0], self.progress[-1]))
        return float(np.exp(np.interp(p, self.progress, np.log(self.rel_std))))


@dataclass(frozen=True)
class Priors:
    """Per-law priors plus the interval calibration, as shipped or as derived by a user."""

    laws: dict[str, LawPrior]
    calibration: dict[str, Calibration]
    provenance: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def default(cls) -> Priors:
        """The priors shipped with the package."""
        text = resources.files("lossforecast").joinpath("priors.json").read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Priors:
        """Priors from a JSON file written by ``scripts/derive_priors.py``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: dict) -> Priors:
        if d.get("version") != PRIORS_VERSION:
            raise ValueError(f"priors file has version {d.get('version')!r}, expected {PRIORS_VERSION}.")
        laws = {
            name: LawPrior(dict(p["mean"]), dict(p["std"]), tuple(p["l0_ratio"]))
            for name, p in d["laws"].items()
        }
        cal = {
            name: Calibration(tuple(c["progress"]), tuple(c["rel_std"]))
            for name, c in d["calibration"].items()
        }
        return cls(laws, cal, d.get("provenance", ""), dict(d.get("extra", {})))

    def to_dict(self) -> dict:
        return {
            "version": PRIORS_VERSION,
            "provenance": self.provenance,
            "laws": {
                n: {"mean": p.mean, "std": p.std, "l0_ratio": list(p.l0_ratio)}
                for n, p in self.laws.items()
            },
            "calibration": {
                n: {"progress": list(c.progress), "rel_std": list(c.rel_std)}
                for n, c in self.calibration.items()
            },
            "extra": self.extra,
        }
