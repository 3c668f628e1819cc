"""Compute telemetry: a peak-FLOP/s table, throughput and MFU, and the cost to finish the run.

Pure numpy: FLOPs per step come from ``lossforecast.integrations.flops`` (torch) or the user,
energy from an :class:`~lossforecast._power.EnergyMonitor`.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["PEAK_FLOPS", "peak_flops", "ComputeMeter", "CostForecast", "cost_to_finish"]

JOULES_PER_KWH = 3.6e6

# Peak dense FLOP/s per device: no structured sparsity (datasheets print the 2:4-sparse figure
# first for tensor cores; those are halved here). "bf16"/"fp16" are tensor-core rates with
# FP32 accumulation, "tf32" the TF32 tensor-core rate, "fp32" plain FP32 (matrix cores on AMD).
# A dtype a device has no fast path for is left out (peak_flops then returns None).
# Sources (vendor datasheets / whitepapers):
#   H100 SXM/PCIe/NVL, H200, H200 NVL: NVIDIA H100 and H200 Tensor Core GPU datasheets
#     (H100 NVL and H200 NVL per GPU: TF32 835, BF16 1,671 TFLOPS with sparsity).
#   GH200: NVIDIA GH200 Grace Hopper Superchip datasheet (GPU: TF32 494, BF16 990 dense).
#   A100 40/80GB SXM and PCIe: NVIDIA A100 datasheet (same peaks for all four).
#   A10: NVIDIA A10 datasheet. A10G (AWS): NVIDIA publishes no datasheet; the A10's figures
#     are used (same GA102 configuration; AWS's clocks may make the true peak lower).
#   L4, L40, L40S: NVIDIA L4 / L40 / L40S datasheets.
#   V100 (SXM2, PCIe, V100S) and T4: NVIDIA datasheets ("tensor performance", FP16 mixed).
#   RTX 3090: NVIDIA Ampere GA102 whitepaper (FP16/BF16 tensor with FP32 accumulate 71).
#   RTX 4090: NVIDIA Ada Lovelace whitepaper (FP16/BF16 tensor with FP32 accumulate 165.2).
#   MI250X, MI300X: AMD Instinct datasheets (MI250X has no TF32; FP32 is the matrix rate).
_T = 1e12
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bf16": 989.4 * _T, "fp16": 989.4 * _T, "tf32": 494.7 * _T, "fp32": 67 * _T},
    "h100-pcie": {"bf16": 756 * _T, "fp16": 756 * _T, "tf32": 378 * _T, "fp32": 51 * _T},
    "h100-nvl": {"bf16": 835.5 * _T, "fp16": 835.5 * _T, "tf32": 417.5 * _T, "fp32": 60 * _T},
    "h200": {"bf16": 989.4 * _T, "fp16": 989.4 * _T, "tf32": 494.7 * _T, "fp32": 67 * _T},
    "h200-nvl": {"bf16": 835.5 * _T, "fp16": 835.5 * _T, "tf32": 417.5 * _T, "fp32": 60 * _T},
    "gh200": {"bf16": 989.4 * _T, "fp16": 989.4 * _T, "tf32": 494.7 * _T, "fp32": 67 * _T},
    "a100": {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
    "a10": {"bf16": 125 * _T, "fp16": 125 * _T, "tf32": 62.5 * _T, "fp32": 31.2 * _T},
    "a10g": {"bf16": 125 * _T, "fp16": 125 * _T, "tf32": 62.5 * _T, "fp32": 31.2 * _T},
    "l4": {"bf16": 121 * _T, "fp16": 121 * _T, "tf32": 60 * _T, "fp32": 30.3 * _T},
    "l40": {"bf16": 181.05 * _T, "fp16": 181.05 * _T, "tf32": 90.5 * _T, "fp32": 90.5 * _T},
    "l40s": {"bf16": 362.05 * _T, "fp16": 362.05 * _T, "tf32": 183 * _T, "fp32": 91.6 * _T},
    "v100-sxm": {"fp16": 125 * _T, "fp32": 15.7 * _T},
    "v100-pcie": {"fp16": 112 * _T, "fp32": 14 * _T},
    "v100s": {"fp16": 130 * _T, "fp32": 16.4 * _T},
    "t4": {"fp16": 65 * _T, "fp32": 8.1 * _T},
    "rtx-3090": {"bf16": 71 * _T, "fp16": 71 * _T, "tf32": 35.6 * _T, "fp32": 35.6 * _T},
    "rtx-4090": {"bf16": 165.2 * _T, "fp16": 165.2 * _T, "tf32": 82.6 * _T, "fp32": 82.6 * _T},
    "mi250x": {"bf16": 383 * _T, "fp16": 383 * _T, "fp32": 95.7 * _T},
    "mi300x": {"bf16": 1307.4 * _T, "fp16": 1307.4 * _T, "tf32": 653.7 * _T, "fp32": 163.4 * _T},
}

# Device name patterns (after _normalise), most specific first. Names are those of
# torch.cuda.get_device_name() and nvmlDeviceGetName(), e.g. "NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 4090", "AMD Instinct MI300X".
_NAME_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), key)
    for pattern, key in (
        (r"\bgh200\b", "gh200"),
        (r"\bh200\b.*\bnvl\b", "h200-nvl"),
        (r"\bh200\b", "h200"),
        (r"\bh100\b.*\bnvl\b", "h100-nvl"),
        (r"\bh100\b.*\bpcie\b", "h100-pcie"),
        (r"\bh100\b", "h100-sxm"),
        (r"\ba100\b", "a100"),
        (r"\ba10g\b", "a10g"),
        (r"\ba10\b", "a10"),
        (r"\bl40s\b", "l40s"),
        (r"\bl40\b", "l40"),
        (r"\bl4\b", "l4"),
        (r"\bv100s\b", "v100s"),
        (r"\bv100\b.*\bpcie\b", "v100-pcie"),
        (r"\bv100\b", "v100-sxm"),
        (r"\bt4\b", "t4"),
        (r"\brtx 3090$", "rtx-3090"),
        (r"\brtx 4090$", "rtx-4090"),
        (r"\bmi250x\b", "mi250x"),
        (r"\bmi300x\b", "mi300x"),
    )
)

_DTYPES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
    "tfloat32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


def _normalise(name: str) -> str:
    text = re.sub(r"[-_/]+", " ", name.lower())
    text = re.sub(r"\b(nvidia|tesla|geforce|amd|instinct)\b", " ", text)
    return " ".join(text.split())


def device_key(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key of a device name, or None if it is not in the table.

    Examples
    --------
    >>> device_key("NVIDIA H100 80GB HBM3"), device_key("NVIDIA A100-SXM4-40GB")
    ('h100-sxm', 'a100')
    >>> device_key("NVIDIA GeForce RTX 4090 Laptop GPU") is None
    True
    """
    text = _normalise(device_name)
    for pattern, key in _NAME_RULES:
        if pattern.search(text):
            return key
    return None


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of an accelerator for a dtype, from its datasheet.

    Parameters
    ----------
    device_name : str
        As ``torch.cuda.get_device_name()`` or NVML report it (case and vendor prefixes do
        not matter), e.g. ``"NVIDIA H100 80GB HBM3"``, ``"Tesla T4"``, ``"AMD Instinct MI300X"``.
    dtype : {'bf16', 'fp16', 'tf32', 'fp32'}, optional
        Also ``'bfloat16'``, ``'float16'``, ``'half'``, ``'tfloat32'``, ``'float32'`` and
        ``'torch.bfloat16'``-style names. Default ``'bf16'``.

    Returns
    -------
    float or None
        FLOP/s without sparsity; None if the device is not in the table or has no fast path
        for ``dtype`` (e.g. bf16 on a V100). Give your own peak then.

    Raises
    ------
    ValueError
        If ``dtype`` is not one of the above.

    Examples
    --------
    >>> peak_flops("NVIDIA H100 80GB HBM3") / 1e12
    989.4
    >>> peak_flops("NVIDIA A100-SXM4-80GB", "tf32") / 1e12, peak_flops("Tesla V100-SXM2-16GB")
    (156.0, None)
    """
    key = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if key is None:
        raise ValueError(f"`dtype` must be one of {sorted(set(_DTYPES))}, got {dtype!r}.")
    device = device_key(device_name)
    return None if device is None else PEAK_FLOPS[device].get(key)


# ---------------------------------------------------------------------------------- meter
class _Energy(Protocol):
    def joules(self) -> float: ...
    def watts(self) -> float | None: ...


class ComputeMeter:
    """Throughput, MFU and energy of a run, from one O(1) call per optimizer step.

    Call :meth:`record_step` after every optimizer step (from the training thread; it only
    appends a timestamp). :meth:`metrics` turns the last ``window`` steps into rates.

    Parameters
    ----------
    flops_per_step : float, optional
        Model FLOPs of one optimizer step on this process (forward + backward, e.g. from
        ``lossforecast.integrations.flops.count_flops``). Settable later.
    tokens_per_step : float, optional
        Tokens (or samples) one optimizer step consumes on this process. Settable later.
    peak_flops : float, optional
        Peak FLOP/s of the devices doing ``flops_per_step`` (see :func:`peak_flops`).
    energy : EnergyMonitor, optional
        Anything with ``joules()`` and ``watts()``; adds the energy metrics.
    window : int, optional
        Steps behind the rolling rates, >= 1. Default 50.
    world_size : int, optional
        Processes running alike (data parallel), >= 1. Totals (tokens/s, FLOP/s, watts,
        joules) are this process's times ``world_size`` (energy not, when ``energy`` already
        sums every rank: a :class:`WorldEnergy`); MFU is the same on every rank.
        Default 1. All-reduce the per-rank figures instead when ranks differ.

    Raises
    ------
    ValueError
        If a number is not positive or ``window``/``world_size`` is not a positive int.

    Examples
    --------
    >>> meter = ComputeMeter(flops_per_step=2e12, tokens_per_step=4096, peak_flops=100e12)
    >>> for step in range(11):
    ...     meter.record_step(step, now=0.1 * step)   # 0.1 s per step
    >>> m = meter.metrics()
    >>> round(m["compute/seconds_per_step"], 6), round(m["compute/mfu"], 6)
    (0.1, 0.2)
    """

    def __init__(
        self,
        *,
        flops_per_step: float | None = None,
        tokens_per_step: float | None = None,
        peak_flops: float | None = None,
        energy: _Energy | None = None,
        window: int = 50,
        world_size: int = 1,
    ) -> None:
        for name, value in (("window", window), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        self.flops_per_step = flops_per_step
        self.tokens_per_step = tokens_per_step
        self.peak_flops = _positive_or_none("peak_flops", peak_flops)
        if energy is not None and not callable(getattr(energy, "joules", None)):
            raise TypeError(
                f"`energy` must have joules() and watts(), got {type(energy).__name__}."
            )
        self.energy = energy
        self.window = int(window)
        self.world_size = int(world_size)
        self._steps: deque[tuple[int, float]] = deque(maxlen=self.window + 1)

    @property
    def flops_per_step(self) -> float | None:
        """FLOPs of one optimizer step on this process (None if unknown)."""
        return self._flops_per_step

    @flops_per_step.setter
    def flops_per_step(self, value: float | None) -> None:
        self._flops_per_step = _positive_or_none("flops_per_step", value)

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens one optimizer step consumes on this process (None if unknown)."""
        return self._tokens_per_step

    @tokens_per_step.setter
    def tokens_per_step(self, value: float | None) -> None:
        self._tokens_per_step = _positive_or_none("tokens_per_step", value)

    def record_step(self, step: int, now: float | None = None) -> None:
        """Note that optimizer step ``step`` just finished (O(1); a step not above the last is
        ignored). ``now`` defaults to ``time.monotonic()``."""
        if self._steps and step <= self._steps[-1][0]:
            return
        self._steps.append((int(step), time.monotonic() if now is None else float(now)))

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of the last ``window`` steps (None before two steps)."""
        if len(self._steps) < 2:
            return None
        (s0, t0), (s1, t1) = self._steps[0], self._steps[-1]
        return (t1 - t0) / (s1 - s0) if t1 > t0 else None

    @property
    def joules_per_step(self) -> float | None:
        """Energy of one step of the whole job: recent power times :attr:`seconds_per_step`."""
        watts = self._read("watts")
        seconds = self.seconds_per_step
        if watts is None or seconds is None:
            return None
        return watts * seconds * self._energy_scale

    def metrics(self, prefix: str = "compute/") -> dict[str, float]:
        """The current figures as a flat dict; a figure whose inputs are unknown is left out.

        Keys (after ``prefix``): ``seconds_per_step``, ``tokens_per_second``,
        ``flops_per_second``, ``mfu`` (achieved / peak FLOP/s, in [0, 1] for a true peak),
        ``watts`` (recent mean), ``joules`` (since the monitor started), ``kwh``,
        ``joules_per_step``. The default prefix makes them event data the sinks write
        (``lossforecast/compute/mfu`` in TensorBoard).
        """
        out: dict[str, float] = {}
        seconds = self.seconds_per_step
        if seconds is not None:
            out["seconds_per_step"] = seconds
            if self.tokens_per_step is not None:
                out["tokens_per_second"] = self.tokens_per_step * self.world_size / seconds
            if self.flops_per_step is not None:
                achieved = self.flops_per_step / seconds
                out["flops_per_second"] = achieved * self.world_size
                if self.peak_flops is not None:
                    out["mfu"] = achieved / self.peak_flops
        watts = self._read("watts")
        if watts is not None:
            out["watts"] = watts * self._energy_scale
        joules = self._read("joules")
        if joules is not None:
            out["joules"] = joules * self._energy_scale
            out["kwh"] = out["joules"] / JOULES_PER_KWH
        if watts is not None and seconds is not None:
            out["joules_per_step"] = watts * seconds * self._energy_scale
        return {prefix + k: float(v) for k, v in out.items()}

    def cost_to_finish(
        self, forecaster: Any, step: int, *, target_loss: float | None = None
    ) -> CostForecast:
        """:func:`cost_to_finish` at this meter's current step time, energy and FLOPs."""
        flops = None if self.flops_per_step is None else self.flops_per_step * self.world_size
        return cost_to_finish(
            forecaster,
            step,
            seconds_per_step=self.seconds_per_step,
            joules_per_step=self.joules_per_step,
            flops_per_step=flops,
            target_loss=target_loss,
        )

    @property
    def _energy_scale(self) -> int:
        """``world_size`` for one process's energy; 1 for an energy that sums every rank."""
        return 1 if getattr(self.energy, "covers_all_ranks", False) else self.world_size

    def _read(self, what: str) -> float | None:
        """``energy.joules()`` or ``energy.watts()`` as a finite float, else None (never raises)."""
        if self.energy is None:
            return None
        try:
            value = getattr(self.energy, what)()
        except Exception:
            return None
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def __repr__(self) -> str:
        return (
            f"ComputeMeter(flops_per_step={self.flops_per_step}, "
            f"tokens_per_step={self.tokens_per_step}, peak_flops={self.peak_flops}, "
            f"window={self.window}, world_size={self.world_size})"
        )


class WorldEnergy:
    """Energy of every rank of a data-parallel job, as the framework adapter sums it.

    Each rank measures its own devices (an ``EnergyMonitor``); the adapter all-reduces their
    totals with the collectives training already runs and passes the sums to :meth:`update`
    on the process that forecasts. A :class:`ComputeMeter` given this energy does not scale
    it by ``world_size``. Ranks that could not measure (no monitor, or no power reading yet)
    are taken to draw what the measuring ranks draw on average, as the ranks run alike; a
    sum that silently left them out would understate the job.

    Examples
    --------
    >>> energy = WorldEnergy()
    >>> energy.update(joules=1200.0, watts=600.0, ranks=2, world_size=2)
    >>> ComputeMeter(energy=energy, world_size=2).metrics()["compute/watts"]
    600.0
    >>> energy.update(joules=500.0, watts=250.0, ranks=1, world_size=4)  # 3 ranks unmeasured
    >>> energy.joules(), energy.watts(), energy.ranks
    (2000.0, 1000.0, 1)
    """

    covers_all_ranks = True

    def __init__(self) -> None:
        self._joules: float | None = None
        self._watts: float | None = None
        self.ranks = 0  # ranks that measured something in the last update

    def update(
        self,
        joules: float,
        watts: float,
        ranks: int,
        world_size: int,
        watt_ranks: int | None = None,
    ) -> None:
        """Sums over the ranks that measured: ``ranks`` gave energy, ``watt_ranks`` (default
        ``ranks``) gave power, of ``world_size``; none gave: unknown."""
        self.ranks = int(ranks)
        watt_ranks = self.ranks if watt_ranks is None else int(watt_ranks)
        self._joules = float(joules) * world_size / ranks if ranks >= 1 else None
        self._watts = float(watts) * world_size / watt_ranks if watt_ranks >= 1 else None

    def joules(self) -> float | None:
        """Energy of all ranks since they started measuring (None before the first sum)."""
        return self._joules

    def watts(self) -> float | None:
        """Recent power of all ranks (None before the first sum)."""
        return self._watts

    def close(self) -> None:
        """Nothing to release: each rank closes its own monitor."""


def _positive_or_none(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number or None, got {value!r}.")
    return float(value)


# ---------------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class CostForecast:
    """What the rest of the run will cost, and what it will buy, on the planned schedule.

    Costs are ``steps_to_finish`` times the per-step figures given (None where one was not).
    Loss figures come from the forecaster's latest fit (None before the first fit).

    Attributes
    ----------
    step : int
        Last finished step the forecast is made at.
    total_steps : int
        Planned steps of the run.
    steps_to_finish : int
        Steps still to run: ``total_steps - 1 - step``.
    seconds_to_finish, joules_to_finish, kwh_to_finish, flops_to_finish : float or None
        Time, energy and FLOPs to finish.
    loss_now : float or None
        Forecast loss at ``step`` (the fitted curve, not the noisy observation).
    final_loss : float or None
        Forecast loss at the last step.
    loss_gain : float or None
        ``loss_now - final_loss``: what the rest of the schedule is predicted to gain.
    loss_gain_per_kwh : float or None
        ``loss_gain / kwh_to_finish``.
    target_loss : float or None
        The loss asked about.
    target_loss_step : int or None
        First step from ``step`` on at which the forecast loss is at or below
        ``target_loss``; None if it never is within the schedule (or no fit yet).
    seconds_to_target, joules_to_target, kwh_to_target, flops_to_target : float or None
        Cost of getting from ``step`` to ``target_loss_step``.
    """

    step: int
    total_steps: int
    steps_to_finish: int
    seconds_to_finish: float | None = None
    joules_to_finish: float | None = None
    kwh_to_finish: float | None = None
    flops_to_finish: float | None = None
    loss_now: float | None = None
    final_loss: float | None = None
    loss_gain: float | None = None
    loss_gain_per_kwh: float | None = None
    target_loss: float | None = None
    target_loss_step: int | None = None
    seconds_to_target: float | None = None
    joules_to_target: float | None = None
    kwh_to_target: float | None = None
    flops_to_target: float | None = None

    def data(self) -> dict[str, float | int]:
        """Event data: the known figures as a flat dict for ``forecast_event(extra=...)``.

        ``seconds_to_finish``, ``joules_to_finish``, ``kwh_to_finish`` and
        ``flops_to_finish`` keep their names (sinks write every ``*_to_finish`` key); the
        rest go under ``cost/`` (``cost/target_loss``, ``cost/target_loss_step``,
        ``cost/seconds_to_target``, ``cost/joules_to_target``, ``cost/kwh_to_target``,
        ``cost/flops_to_target``, ``cost/loss_gain``, ``cost/loss_gain_per_kwh``), so
        metric sinks write them too. Unknown figures are left out.
        """
        out: dict[str, float | int] = {}
        for key, value in asdict(self).items():
            if value is None or key in ("step", "total_steps", "loss_now", "final_loss"):
                continue
            if key == "steps_to_finish":
                continue
            name = key if key.endswith("_to_finish") else f"cost/{key}"
            out[name] = value
        return out

    def summary(self) -> str:
        """One line for a console, e.g. ``to finish: 1.2 h, 3.4 kWh; loss 3.1 at step 9000``."""
        parts = []
        if self.seconds_to_finish is not None:
            parts.append(_duration(self.seconds_to_finish))
        if self.kwh_to_finish is not None:
            parts.append(f"{self.kwh_to_finish:.3g} kWh")
        if self.flops_to_finish is not None:
            parts.append(f"{self.flops_to_finish:.3g} FLOPs")
        text = "to finish: " + (", ".join(parts) if parts else "unknown cost")
        if self.loss_gain_per_kwh is not None:
            text += f"; {self.loss_gain_per_kwh:.3g} loss per kWh"
        if self.target_loss is not None:
            if self.target_loss_step is None:
                text += f"; loss {self.target_loss:.4g} not reached by the end"
            else:
                text += f"; loss {self.target_loss:.4g} at step {self.target_loss_step}"
                if self.kwh_to_target is not None:
                    text += f" ({self.kwh_to_target:.3g} kWh)"
        return text


def cost_to_finish(
    forecaster: Any,
    step: int,
    *,
    seconds_per_step: float | None = None,
    joules_per_step: float | None = None,
    flops_per_step: float | None = None,
    target_loss: float | None = None,
) -> CostForecast:
    """Time, energy and FLOPs to finish the planned schedule, and what the loss gains for it.

    Uses the forecaster's latest fit only (``trajectory(..., refit=False)``), so it is cheap
    and never fits: call it when a forecast event is made.

    Parameters
    ----------
    forecaster : Forecaster
        The run's forecaster (its ``schedule.total_steps`` and ``trajectory``).
    step : int
        Last finished step, in ``0..total_steps - 1``.
    seconds_per_step, joules_per_step, flops_per_step : float, optional
        Cost of one step (e.g. from :class:`ComputeMeter`); each > 0 or None.
    target_loss : float, optional
        A loss to reach: the result says at which step the forecast gets there, and the
        cost to get there.

    Returns
    -------
    CostForecast

    Raises
    ------
    ValueError
        If ``step`` is outside the schedule or a per-step cost is not positive.

    Notes
    -----
    The target step is the first step at or after ``step`` whose point forecast is at or
    below ``target_loss``, searched on a grid of at most 257 steps and refined to the exact
    step inside the first bracket that crosses. A forecast that dips below the target only
    between two grid points of the first pass can be missed.

    Examples
    --------
    >>> import numpy as np
    >>> from lossforecast import Forecaster
    >>> fc = Forecaster(np.r_[np.linspace(1e-4, 1e-3, 50), np.full(950, 1e-3)])
    >>> for s in range(50, 400, 5):
    ...     fc.update(s, 3.0 + 2.0 * (s + 1) ** -0.5)
    >>> c = cost_to_finish(fc, 399, seconds_per_step=0.5, joules_per_step=100.0)
    >>> c.steps_to_finish, c.seconds_to_finish, c.joules_to_finish
    (600, 300.0, 60000.0)
    """
    total = int(forecaster.schedule.total_steps)
    step_i = int(step)
    if step_i != step or not 0 <= step_i < total:
        raise ValueError(f"`step` must be in 0..{total - 1} (the schedule), got {step!r}.")
    sps = _positive_or_none("seconds_per_step", seconds_per_step)
    jps = _positive_or_none("joules_per_step", joules_per_step)
    fps = _positive_or_none("flops_per_step", flops_per_step)
    if target_loss is not None and not math.isfinite(float(target_loss)):
        raise ValueError(f"`target_loss` must be a finite number, got {target_loss!r}.")
    left = total - 1 - step_i

    def times(n: int, per: float | None) -> float | None:
        return None if per is None else n * per

    joules = times(left, jps)
    kwh = None if joules is None else joules / JOULES_PER_KWH
    fields: dict[str, Any] = {
        "seconds_to_finish": times(left, sps),
        "joules_to_finish": joules,
        "kwh_to_finish": kwh,
        "flops_to_finish": times(left, fps),
        "target_loss": None if target_loss is None else float(target_loss),
    }
    ends = forecaster.trajectory(np.array([step_i, total - 1]), refit=False)
    if ends is not None:
        now, final = float(ends[0][0]), float(ends[0][1])
        gain = now - final
        fields.update(loss_now=now, final_loss=final, loss_gain=gain)
        if kwh is not None and kwh > 0:
            fields["loss_gain_per_kwh"] = gain / kwh
        if target_loss is not None:
            reached = _first_step_at_or_below(forecaster, step_i, total - 1, float(target_loss))
            if reached is not None:
                n = reached - step_i
                j = times(n, jps)
                fields.update(
                    target_loss_step=reached,
                    seconds_to_target=times(n, sps),
                    joules_to_target=j,
                    kwh_to_target=None if j is None else j / JOULES_PER_KWH,
                    flops_to_target=times(n, fps),
                )
    return CostForecast(step=step_i, total_steps=total, steps_to_finish=left, **fields)


def _first_step_at_or_below(forecaster: Any, lo: int, hi: int, target: float) -> int | None:
    """First step in ``lo..hi`` whose forecast is <= ``target`` (grid search, then refine)."""
    while True:
        grid = np.unique(np.linspace(lo, hi, min(hi - lo + 1, 257)).round().astype(np.int64))
        predicted = forecaster.trajectory(grid, refit=False)
        if predicted is None:
            return None
        below = np.flatnonzero(predicted[0] <= target)
        if below.size == 0:
            return None
        i = int(below[0])
        if i == 0:
            return int(grid[0])
        if grid[i] - grid[i - 1] == 1:
            return int(grid[i])
        lo, hi = int(grid[i - 1]) + 1, int(grid[i])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
