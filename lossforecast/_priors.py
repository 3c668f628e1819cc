"""Priors for law parameters the data cannot yet identify, and the interval calibration.

The shipped ``priors.json`` is written by ``scripts/derive_priors.py`` from the real curves
in ``shared/data``; :class:`Priors` reads it or any file of the same shape.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.stats import norm

from ._fit import GaussianPrior

__all__ = ["Priors", "LawPrior", "Calibration"]

#: 2: the ``L0`` table is keyed by the log of the LR area seen (1: by the share of it).
PRIORS_VERSION = 2


@dataclass(frozen=True)
class LawPrior:
    """Gaussian prior for one law, in units that transfer between runs.

    ``L0`` is given as a ratio to the lowest observed loss, whose mean and std depend on
    how far the run has got along its power law: rows ``(log S1, mean, std)``, ``S1`` the
    LR area seen (the sum of the LR over the steps, in the optimizer's own units),
    interpolated in ``log S1`` and held at the end rows. Unlike the share of training seen,
    that is the same point of the curve for a short run and a long one. The annealing
    amplitude (``log_amp``, for LRs relative to the peak) is given for a peak LR of 1 and
    shifted by ``amp_lr_exponent * log(peak_lr)``: the loss a cooldown removes grows like
    the square root of the peak LR on the shared curves (a noise-floor effect), far more
    steadily than as a fixed amount or a fixed share of the loss.
    """

    mean: dict[str, float]
    std: dict[str, float]
    l0_ratio: tuple[tuple[float, float, float], ...]
    amp_lr_exponent: float = 0.5

    def for_run(self, min_loss: float, peak_lr: float, lr_area: float = math.inf) -> GaussianPrior:
        """The prior in a run's own units: its lowest observed loss, its peak LR and the LR
        area seen so far (``S1``; by default past the last row of the ``L0`` table)."""
        ratio, ratio_std = self.l0_ratio_at(math.log(lr_area) if lr_area > 0 else -math.inf)
        mean = dict(self.mean, L0=ratio * min_loss)
        if "log_amp" in mean:
            mean["log_amp"] += self.amp_lr_exponent * float(np.log(peak_lr))
        std = dict(self.std, L0=ratio_std * min_loss)
        return GaussianPrior(mean, std)

    def l0_ratio_at(self, log_area: float) -> tuple[float, float]:
        """Mean and std of ``L0 / lowest loss seen`` at ``log S1`` (held at the end rows)."""
        knots, ratio_mean, ratio_std = (np.array(c) for c in zip(*self.l0_ratio, strict=True))
        return (
            float(np.interp(log_area, knots, ratio_mean)),
            float(np.interp(log_area, knots, ratio_std)),
        )


@functools.lru_cache(maxsize=256)
def _z(levels: tuple[float, ...], z_table: tuple[float, ...], coverage: float) -> float:
    """:meth:`Calibration.z`, cached: forecasts ask for the same few coverages again and again."""
    gauss = norm.ppf(0.5 + np.asarray(levels) / 2.0)
    ratio = np.interp(coverage, levels, np.asarray(z_table) / gauss)
    return float(ratio * norm.ppf(0.5 + coverage / 2.0))


@dataclass(frozen=True)
class Calibration:
    """How wide an interval must be, learned from backtests.

    ``scale(p)`` is the standard deviation of ``(forecast - truth) / truth`` not explained
    by the fit's own uncertainty, at progress ``p`` (share of the planned forward area seen),
    interpolated log-linearly between the knots. ``drop_share`` is the standard deviation
    of the law's annealing drop still to come, as a share of it: the law's shape error on a
    cooldown it has not seen, which no fit of the run's own points can measure (0 in files
    written before it existed). ``z(coverage)`` is the multiplier of the
    combined standard deviation that covers the truth with that probability; the backtests'
    errors have heavier tails than a Gaussian, so it is read from their quantiles at
    ``levels`` and interpolated as a ratio to the Gaussian multiplier in between.
    """

    progress: tuple[float, ...]
    rel_std: tuple[float, ...]
    levels: tuple[float, ...]
    z_table: tuple[float, ...]
    drop_share: float = 0.0

    def scale(self, progress: float) -> float:
        p = float(np.clip(progress, self.progress[0], self.progress[-1]))
        return float(np.exp(np.interp(p, self.progress, np.log(self.rel_std))))

    def z(self, coverage: float) -> float:
        return _z(self.levels, self.z_table, float(coverage))


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
            raise ValueError(
                f"priors file has version {d.get('version')!r}, expected {PRIORS_VERSION}; "
                "derive it again with scripts/derive_priors.py."
            )
        laws = {
            name: LawPrior(
                dict(p["mean"]),
                dict(p["std"]),
                tuple(tuple(row) for row in p["l0_ratio"]),
                p["amp_lr_exponent"],
            )
            for name, p in d["laws"].items()
        }
        cal = {
            name: Calibration(
                tuple(c["progress"]),
                tuple(c["rel_std"]),
                tuple(c["levels"]),
                tuple(c["z"]),
                c.get("drop_share", 0.0),
            )
            for name, c in d["calibration"].items()
        }
        return cls(laws, cal, d.get("provenance", ""), dict(d.get("extra", {})))

    def with_law(
        self, name: str, law: LawPrior, *, calibration: Calibration | None = None
    ) -> Priors:
        """A copy with the prior of law ``name`` (and optionally its calibration) replaced."""
        if name not in self.laws:
            raise ValueError(f"`name` must be one of {sorted(self.laws)}, got {name!r}.")
        cal = self.calibration if calibration is None else {**self.calibration, name: calibration}
        return replace(self, laws={**self.laws, name: law}, calibration=cal)

    def to_dict(self) -> dict:
        return {
            "version": PRIORS_VERSION,
            "provenance": self.provenance,
            "laws": {
                n: {
                    "mean": p.mean,
                    "std": p.std,
                    "l0_ratio": [list(row) for row in p.l0_ratio],
                    "amp_lr_exponent": p.amp_lr_exponent,
                }
                for n, p in self.laws.items()
            },
            "calibration": {
                n: {
                    "progress": list(c.progress),
                    "rel_std": list(c.rel_std),
                    "levels": list(c.levels),
                    "z": list(c.z_table),
                    "drop_share": c.drop_share,
                }
                for n, c in self.calibration.items()
            },
            "extra": self.extra,
        }
