"""Loss laws of the LR schedule: the LR-annealing law and the Multi-Power Law.

Each law maps a parameter vector and a set of steps of a :class:`Schedule` to losses, with
an analytic Jacobian so a refit needs few evaluations. Parameters live in a transformed
space (logs of positive scales) so bounds are simple boxes and priors are Gaussian.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from ._schedule import Decrements, Schedule

__all__ = ["Law", "LRAnnealingLaw", "MultiPowerLaw", "LawInputs", "LAWS"]


@dataclass(frozen=True)
class LawInputs:
    """What a law reads at a set of steps: forward area and the decrements so far."""

    steps: NDArray[np.float64]
    area: NDArray[np.float64]
    decrements: Decrements

    @classmethod
    def at(cls, schedule: Schedule, steps: NDArray[np.int64]) -> LawInputs:
        """Inputs for ``steps`` of ``schedule``, keeping only decrements up to the last step."""
        steps = np.asarray(steps, dtype=np.int64)
        last = int(steps.max()) if steps.size else -1
        return cls(
            steps=steps.astype(np.float64),
            area=schedule.area[steps],
            decrements=schedule.decrements.upto(last),
        )


class Law(ABC):
    """A parametric loss curve ``L(step; theta)`` given the planned schedule."""

    name: str
    #: Parameter names in the transformed space, in vector order.
    params: tuple[str, ...]

    @abstractmethod
    def bounds(self, loss_floor: float) -> list[tuple[float, float]]:
        """Box bounds for each parameter; ``loss_floor`` caps the irreducible loss ``L0``."""

    @abstractmethod
    def predict_jac(
        self, theta: NDArray[np.float64], x: LawInputs
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Losses at ``x.steps`` and their Jacobian (n_steps, n_params)."""

    def predict(self, theta: NDArray[np.float64], x: LawInputs) -> NDArray[np.float64]:
        """Losses at ``x.steps``."""
        return self.predict_jac(theta, x)[0]

    def annealing_drop(
        self, theta: NDArray[np.float64], x: LawInputs, y: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]:
        """How far the LR decreases so far have lowered the loss at ``x.steps``; ``y`` is
        :meth:`predict` at ``x`` where the caller has it already."""
        constant = replace(x, decrements=x.decrements.upto(-1))
        return self.predict(theta, constant) - (self.predict(theta, x) if y is None else y)


def _power_bounds(loss_floor: float) -> list[tuple[float, float]]:
    """Bounds of the parameters both laws share: ``L0``, ``log A``, ``alpha``, ``log_amp``."""
    return [(0.0, loss_floor), (-10.0, 10.0), (0.01, 1.5), (-20.0, 5.0)]


def _power_term(
    theta: NDArray[np.float64], area: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``A * area**-alpha`` and its derivatives in ``log A`` and ``alpha``."""
    log_a, alpha = theta[1], theta[2]
    log_area = np.log(area)
    power = np.exp(log_a - alpha * log_area)
    return power, power, -log_area * power


class LRAnnealingLaw(Law):
    """``L(s) = L0 + A * S1^-alpha - C * S2(s; lambda)`` (Tissue et al. 2024).

    ``S1`` is the forward area and ``S2`` the annealing area with momentum ``lambda``.
    Parameters: ``L0``, ``log A``, ``alpha``, ``log C`` and ``log tau`` with
    ``lambda = 1 - 1/tau`` (the annealing momentum's time constant in steps).

    References
    ----------
    H. Tissue, V. Wang, L. Wang et al. "Scaling Law with Learning Rate Annealing",
    arXiv:2408.11029, 2024.
    """

    name = "lr-annealing"
    params = ("L0", "log_A", "alpha", "log_amp", "log_tau")

    def bounds(self, loss_floor: float) -> list[tuple[float, float]]:
        return [*_power_bounds(loss_floor), (np.log(10.0), np.log(1e5))]

    def predict_jac(self, theta, x):
        power, d_log_a, d_alpha = _power_term(theta, x.area)
        amp = np.exp(theta[3])
        tau = np.exp(theta[4])
        dec = x.decrements
        lag = x.steps[:, None] - dec.step[None, :] + 1.0
        active = lag > 0
        lag = np.where(active, lag, 0.0)
        log_q = np.log1p(-1.0 / tau)
        q_lag = np.exp(lag * log_q)
        kernel = np.where(active, tau * (1.0 - q_lag), 0.0)
        # d kernel / d log tau = tau * dk/dtau, dk/dtau = (1 - q^lag) - lag q^(lag-1) / tau
        d_kernel = np.where(active, tau * (1.0 - q_lag) - lag * q_lag / (1.0 - 1.0 / tau), 0.0)
        s2 = kernel @ dec.drop
        y = theta[0] + power - amp * s2
        jac = np.column_stack(
            [np.ones_like(y), d_log_a, d_alpha, -amp * s2, -amp * (d_kernel @ dec.drop)]
        )
        return y, jac


class MultiPowerLaw(Law):
    """``L(t) = L0 + A (S1(t) + S_W)^-alpha - LD(t)`` (Luo et al. 2025).

    ``LD(t) = B * sum_k (lr_{k-1} - lr_k) * G(lr_k^-gamma * S_k(t))`` with
    ``G(x) = 1 - (C x + 1)^-beta`` and ``S_k(t)`` the forward area from step ``k`` to ``t``.
    The forward area includes warmup, which plays the role of ``S_W``. Parameters: ``L0``,
    ``log A``, ``alpha``, ``log B``, ``log C``, ``beta``, ``gamma``.

    References
    ----------
    K. Luo, H. Wen, S. Hu et al. "A Multi-Power Law for Loss Curve Prediction Across
    Learning Rate Schedules", ICLR 2025, arXiv:2503.12811.
    """

    name = "multi-power"
    params = ("L0", "log_A", "alpha", "log_amp", "log_C", "beta", "gamma")

    def bounds(self, loss_floor: float) -> list[tuple[float, float]]:
        return [
            *_power_bounds(loss_floor),
            (np.log(1e-6), np.log(10.0)),
            (0.05, 5.0),
            (0.0, 1.5),
        ]

    def predict_jac(self, theta, x):
        power, d_log_a, d_alpha = _power_term(theta, x.area)
        amp, c, beta, gamma = np.exp(theta[3]), np.exp(theta[4]), theta[5], theta[6]
        dec = x.decrements
        lag_area = x.area[:, None] - dec.area_before[None, :]
        active = x.steps[:, None] >= dec.step[None, :]
        lag_area = np.where(active, np.maximum(lag_area, 0.0), 0.0)
        log_lr = np.log(dec.lr)[None, :]
        z = np.exp(-gamma * log_lr) * lag_area  # lr^-gamma * S_k(t)
        cz1 = c * z + 1.0
        log_cz1 = np.log(cz1)
        pow_b = np.exp(-beta * log_cz1)  # (Cz+1)^-beta
        g = 1.0 - pow_b
        dg_dlogc = beta * pow_b / cz1 * c * z
        dg_dbeta = pow_b * log_cz1
        dg_dgamma = -log_lr * dg_dlogc
        drop = dec.drop
        ld = g @ drop
        y = theta[0] + power - amp * ld
        jac = np.column_stack(
            [
                np.ones_like(y),
                d_log_a,
                d_alpha,
                -amp * ld,
                -amp * (dg_dlogc @ drop),
                -amp * (dg_dbeta @ drop),
                -amp * (dg_dgamma @ drop),
            ]
        )
        return y, jac


LAWS: dict[str, type[Law]] = {law.name: law for law in (LRAnnealingLaw, MultiPowerLaw)}
