"""Energy of every process of a data-parallel run, summed for the process that forecasts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lossforecast._compute import WorldEnergy
from lossforecast._power import open_energy_monitor

from .flops import cuda_device_ids

__all__ = ["RankEnergy"]


class RankEnergy:
    """This rank's own energy monitor, and the collective that sums every rank's readings.

    Each rank measures its own devices (NVML for its GPU, else RAPL, else nothing). At the
    same steps on every rank, :meth:`sum` all-reduces four numbers (joules, watts and which
    of them this rank has) with the framework's sum-reduce, and the forecasting rank's
    ``WorldEnergy`` takes the totals; a rank without a reading counts as the others' mean.
    """

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)
        self.monitor = open_energy_monitor(cuda_device_ids(self.device))

    def local(self) -> list[float]:
        """[joules, watts, has joules, has watts] of this rank."""
        joules = self.monitor.joules() if self.monitor is not None else None
        watts = self.monitor.watts() if self.monitor is not None else None
        return [joules or 0.0, watts or 0.0, float(joules is not None), float(watts is not None)]

    def sum(
        self,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        energy: object | None,
        world_size: int,
    ) -> None:
        """Sum every rank's readings (a collective: call it on every rank at the same step)
        and hand the totals to ``energy`` where it is a ``WorldEnergy`` (the forecasting rank)."""
        total = reduce(torch.tensor(self.local(), dtype=torch.float64, device=self.device))
        if isinstance(energy, WorldEnergy):
            joules, watts, ranks, watt_ranks = total.tolist()
            energy.update(joules, watts, int(ranks), world_size, int(watt_ranks))

    def close(self) -> None:
        """Stop this rank's sampler (idempotent)."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
