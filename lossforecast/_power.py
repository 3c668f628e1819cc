"""Energy sources (NVIDIA GPUs through NVML, CPU packages through RAPL) and a sampler thread.

``open_energy_monitor()`` finds what this process can measure and samples it on a daemon
thread; the accounting itself (counter wraps, resets, gaps) is in ``_energy.py``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ._energy import CounterAccumulator, EnergyTotal, PowerIntegrator

__all__ = [
    "EnergyUnavailable",
    "Channel",
    "EnergySource",
    "NVMLSource",
    "RAPLSource",
    "EnergyMonitor",
    "open_energy_monitor",
    "nvml_device_ids",
]

logger = logging.getLogger(__name__)

DEFAULT_RAPL_ROOT = "/sys/class/powercap"
_RAPL_PACKAGE = re.compile(r"^intel-rapl:\d+$")  # package domains; "intel-rapl:0:1" are parts
_NVML_INSTALL = 'the nvidia-ml-py package is missing (pip install "lossforecast[nvml]")'


class EnergyUnavailable(RuntimeError):
    """This source cannot measure anything here; the message says why."""


class Channel:
    """One device's readings and the accumulator they feed.

    Parameters
    ----------
    name : str
        What is measured, e.g. ``"GPU 0: NVIDIA H100 80GB HBM3 (energy counter)"``.
    read : callable
        Returns the current reading: counter units for a :class:`CounterAccumulator`,
        watts for a :class:`PowerIntegrator`, or None when there is none. An exception it
        raises counts as a missing sample.
    accumulator : CounterAccumulator or PowerIntegrator
        Where the readings go.
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], float | None],
        accumulator: CounterAccumulator | PowerIntegrator,
    ) -> None:
        self.name = name
        self._read = read
        self.accumulator = accumulator
        self.consecutive_missing = 0
        self._error_logged = False

    def sample(self, now: float) -> None:
        """Read once and feed the accumulator (a failed read is a missing sample)."""
        try:
            value = self._read()
        except Exception as exc:
            value = None
            if not self._error_logged:
                self._error_logged = True
                logger.debug("lossforecast: reading %s failed: %r", self.name, exc)
        before = self.accumulator.total().n_missing
        self.accumulator.add(value, now)
        missing = self.accumulator.total().n_missing > before
        self.consecutive_missing = self.consecutive_missing + 1 if missing else 0

    def total(self) -> EnergyTotal:
        """Energy of this channel so far."""
        return self.accumulator.total()


class EnergySource:
    """A group of channels read together (the GPUs of NVML, the CPU packages of RAPL).

    Parameters
    ----------
    channels : sequence of Channel
        What this source measures; at least one.

    Raises
    ------
    EnergyUnavailable
        If ``channels`` is empty.
    """

    def __init__(self, channels: Sequence[Channel]) -> None:
        if not channels:
            raise EnergyUnavailable("nothing to measure")
        self.channels = list(channels)

    @property
    def devices(self) -> tuple[str, ...]:
        """Names of the channels."""
        return tuple(c.name for c in self.channels)

    def sample(self, now: float) -> None:
        """Read every channel once (at monotonic time ``now``)."""
        for channel in self.channels:
            channel.sample(now)

    def failing(self, max_missing: int) -> bool:
        """True when every channel missed its last ``max_missing`` samples."""
        return all(c.consecutive_missing >= max_missing for c in self.channels)

    def close(self) -> None:
        """Release what the source holds (nothing by default)."""


# ---------------------------------------------------------------------------------- NVML
def nvml_device_ids(
    cuda_devices: Iterable[int | str] | None, cuda_visible: str | None
) -> list[int | str] | None:
    """Physical GPUs (NVML index or UUID) behind CUDA device indices of this process.

    ``cuda_visible`` is the value of ``CUDA_VISIBLE_DEVICES`` (None when unset). As CUDA
    reads it, entries are comma separated integers or ``GPU-…``/``MIG-…`` UUIDs (or UUID
    prefixes), and the list ends at the first invalid entry. Logical device ``i`` of the
    process (``torch.cuda`` index ``i``) is entry ``i``. An ``int`` in ``cuda_devices`` is
    such a logical index; a ``str`` is a UUID (``GPU-`` is added when it has no prefix, as
    ``str(torch.cuda.get_device_properties(i).uuid)`` gives it) or ``"cuda:N"``.

    Returns
    -------
    list of int or str, or None
        NVML indices and UUIDs; None means every GPU (nothing set, no devices named).

    Raises
    ------
    ValueError
        If a logical index is not visible.

    Notes
    -----
    NVML numbers GPUs in PCI bus order; CUDA does too only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (its default puts the fastest first). On a machine
    with different GPU models, pass UUIDs to be exact.

    Examples
    --------
    >>> nvml_device_ids([1], "2,3")
    [3]
    >>> nvml_device_ids(None, "GPU-8a1f,-1,2")
    ['GPU-8a1f']
    >>> nvml_device_ids(["cuda:0"], None), nvml_device_ids(None, None), nvml_device_ids(None, "")
    ([0], None, [])
    """
    visible = _parse_visible(cuda_visible)
    if cuda_devices is None:
        return visible
    ids: list[int | str] = []
    for device in cuda_devices:
        if isinstance(device, str):
            text = device.strip()
            match = re.fullmatch(r"cuda(?::(\d+))?", text)
            if match is None:
                ids.append(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
                continue
            device = int(match.group(1) or 0)
        index = int(device)
        if index < 0 or (visible is not None and index >= len(visible)):
            shown = "unset" if cuda_visible is None else repr(cuda_visible)
            raise ValueError(
                f"CUDA device {index} is not visible to this process "
                f"(CUDA_VISIBLE_DEVICES {shown})."
            )
        ids.append(index if visible is None else visible[index])
    return ids


def _parse_visible(cuda_visible: str | None) -> list[int | str] | None:
    """Entries of ``CUDA_VISIBLE_DEVICES`` up to the first invalid one; None when unset."""
    if cuda_visible is None:
        return None
    entries: list[int | str] = []
    for raw in cuda_visible.split(","):
        entry = raw.strip()
        if entry.isdigit():
            entries.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")) and len(entry) > 4:
            entries.append(entry)
        else:
            break
    return entries


class NVMLSource(EnergySource):
    """Energy of the NVIDIA GPUs this process uses, through NVML (``pynvml``, imported lazily).

    Each GPU is read with ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the
    driver loaded; Volta and newer) where that works, else its power
    (``nvmlDeviceGetPowerUsage``) is integrated over time. A MIG instance is measured
    through its parent GPU, whose energy is shared by all its instances (named so in
    :attr:`devices`); a GPU reached twice is measured once.

    Parameters
    ----------
    cuda_devices : sequence of int or str, optional
        CUDA devices of this process (``torch.cuda`` indices, ``"cuda:N"`` or UUIDs), mapped
        through ``CUDA_VISIBLE_DEVICES`` by :func:`nvml_device_ids`. Default: every visible
        GPU. Under DDP pass this rank's device only, so the ranks' figures add up.
    interval : float, optional
        Sampling interval in seconds, for the power integration. Default 1.

    Raises
    ------
    EnergyUnavailable
        If ``pynvml`` is missing, NVML does not start (no driver), no GPU is visible, or no
        GPU reports energy or power.
    """

    def __init__(
        self, cuda_devices: Sequence[int | str] | None = None, *, interval: float = 1.0
    ) -> None:
        try:
            import pynvml
        except ImportError:
            raise EnergyUnavailable(_NVML_INSTALL) from None
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            raise EnergyUnavailable(f"NVML did not start: {exc}") from None
        self._nvml = pynvml
        try:
            channels = self._open(cuda_devices, interval)
            super().__init__(channels)
        except Exception as exc:
            _quietly(pynvml.nvmlShutdown)
            if isinstance(exc, EnergyUnavailable):
                raise
            raise EnergyUnavailable(f"NVML: {type(exc).__name__}: {exc}") from None

    def _open(self, cuda_devices, interval: float) -> list[Channel]:
        nvml = self._nvml
        ids = nvml_device_ids(cuda_devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if ids is None:
            ids = list(range(nvml.nvmlDeviceGetCount()))
        if not ids:
            raise EnergyUnavailable("no GPU is visible to this process")
        channels: list[Channel] = []
        seen: set[str] = set()
        for ident in ids:
            handle, shared = _nvml_handle(nvml, ident)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            if uuid in seen:
                continue
            seen.add(uuid)
            label = f"GPU {ident}: {_text(nvml.nvmlDeviceGetName(handle))}"
            if shared:
                label += ", whole GPU shared by its MIG instances"
            channel = _nvml_channel(nvml, handle, label, interval)
            if channel is None:
                logger.debug("lossforecast: %s reports neither energy nor power.", label)
            else:
                channels.append(channel)
        if not channels:
            raise EnergyUnavailable("no visible GPU reports its energy or power")
        return channels

    def close(self) -> None:
        """Shut NVML down (once)."""
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            _quietly(nvml.nvmlShutdown)


def _nvml_handle(nvml, ident: int | str):
    """(NVML handle, shared?) of an NVML index or a GPU/MIG UUID (or UUID prefix)."""
    if isinstance(ident, int):
        return nvml.nvmlDeviceGetHandleByIndex(ident), False
    if ident.startswith("MIG-GPU-"):  # old form MIG-GPU-<gpu uuid>/<gi>/<ci>
        return _gpu_by_uuid(nvml, ident[4:].split("/")[0]), True
    if ident.startswith("MIG-"):
        mig = nvml.nvmlDeviceGetHandleByUUID(ident)
        return nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig), True
    return _gpu_by_uuid(nvml, ident), False


def _gpu_by_uuid(nvml, uuid: str):
    """Handle of the GPU with this UUID, or the one GPU whose UUID starts with it."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        matches = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(uuid):
                matches.append(handle)
        if len(matches) != 1:
            raise EnergyUnavailable(
                f"{len(matches)} GPUs match {uuid!r} of CUDA_VISIBLE_DEVICES"
            ) from None
        return matches[0]


def _nvml_channel(nvml, handle, label: str, interval: float) -> Channel | None:
    """The energy-counter channel of a GPU, else its power channel, else None."""
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:
        pass
    else:
        return Channel(
            f"{label} (energy counter)",
            lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
            CounterAccumulator(scale=1e-3),
        )
    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
    except Exception:
        return None
    return Channel(
        f"{label} (power x time)",
        lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        PowerIntegrator(interval=interval),
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------- RAPL
class RAPLSource(EnergySource):
    """Energy of the CPU packages from Linux RAPL counters (``/sys/class/powercap``).

    Reads ``energy_uj`` of every package domain ``intel-rapl:N`` (also AMD's, which the
    kernel exposes under the same name) whose counter this user can read, wrapping at its
    ``max_energy_range_uj``. Sub-domains (``intel-rapl:N:M``: cores, DRAM) are parts of a
    package and are not added again. Recent kernels let only root read the counters; then
    there is nothing to measure.

    Parameters
    ----------
    root : str or os.PathLike, optional
        The powercap folder. Default ``/sys/class/powercap``.
    interval : float, optional
        Sampling interval in seconds (unused by counters; kept for a uniform signature).

    Raises
    ------
    EnergyUnavailable
        If no package domain can be read.
    """

    def __init__(
        self, root: str | os.PathLike = DEFAULT_RAPL_ROOT, *, interval: float = 1.0
    ) -> None:
        folder = Path(root)
        if not folder.is_dir():
            raise EnergyUnavailable(f"no RAPL folder {folder}")
        channels = []
        unreadable = []
        for domain in sorted(folder.iterdir()):
            if not _RAPL_PACKAGE.match(domain.name):
                continue
            name = _read_text(domain / "name") or domain.name
            if not name.startswith("package"):
                continue  # e.g. "psys", which already holds the packages
            counter = domain / "energy_uj"
            if _read_int(counter) is None:
                unreadable.append(domain.name)
                continue
            modulus = _read_int(domain / "max_energy_range_uj")
            channels.append(
                Channel(
                    f"CPU {name} (RAPL)",
                    lambda path=counter: _read_int(path),
                    CounterAccumulator(scale=1e-6, modulus=modulus or None),
                )
            )
        if not channels:
            why = f"not readable: {', '.join(unreadable)}" if unreadable else "none found"
            raise EnergyUnavailable(f"RAPL package counters in {folder}: {why}")
        super().__init__(channels)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- monitor
class EnergyMonitor:
    """Sample energy sources on a daemon thread every ``interval`` seconds.

    Starts at once. :meth:`joules` and :meth:`watts` only read numbers the thread keeps, so
    the training thread never waits on a device. Nothing here raises into the caller: a
    source that raises, or whose every device missed ``max_missing`` samples in a row, is
    logged once and dropped (its energy so far is kept).

    Parameters
    ----------
    sources : sequence of EnergySource
        What to sample (see :func:`open_energy_monitor`); at least one.
    interval : float, optional
        Seconds between samples, > 0. Default 1.
    window : float, optional
        Span in seconds of the recent mean power :meth:`watts`, >= ``interval``. Default 10
        (or ``interval`` if longer).
    max_missing : int, optional
        Missed samples in a row after which a source is dropped, >= 1. Default 30.

    Raises
    ------
    ValueError
        If ``sources`` is empty or an option is out of range.

    Examples
    --------
    >>> class Fixed(EnergySource):        # a stand-in for a device: a counter at 50 J/s
    ...     def __init__(self):
    ...         t0 = time.monotonic()
    ...         read = lambda: 50.0 * (time.monotonic() - t0)
    ...         super().__init__([Channel("fake", read, CounterAccumulator())])
    >>> with EnergyMonitor([Fixed()], interval=0.02) as mon:
    ...     time.sleep(0.2)
    >>> 5.0 < mon.joules() < 15.0, 40.0 < mon.watts() < 60.0, mon.devices
    (True, True, ('fake',))
    """

    def __init__(
        self,
        sources: Sequence[EnergySource],
        *,
        interval: float = 1.0,
        window: float | None = None,
        max_missing: int = 30,
    ) -> None:
        sources = list(sources)
        if not sources:
            raise ValueError("`sources` must hold at least one energy source, got none.")
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise ValueError(f"`interval` must be a positive number of seconds, got {interval!r}.")
        if window is None:
            window = max(10.0, float(interval))
        if not (isinstance(window, (int, float)) and window >= interval):
            raise ValueError(f"`window` must be at least `interval` ({interval}), got {window!r}.")
        if isinstance(max_missing, bool) or not isinstance(max_missing, int) or max_missing < 1:
            raise ValueError(f"`max_missing` must be a positive int, got {max_missing!r}.")
        self.interval = float(interval)
        self.max_missing = max_missing
        self._active = sources
        self._dropped: list[EnergySource] = []
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, float]] = deque(
            maxlen=max(round(window / self.interval), 1) + 1
        )
        self._joules = 0.0
        self._total = EnergyTotal()
        self._per_device: dict[str, float] = {}
        self._devices = tuple(d for s in sources for d in s.devices)
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossforecast-energy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ reading
    def joules(self) -> float:
        """Energy measured since the monitor started, in joules (all devices)."""
        return self._joules

    def watts(self) -> float | None:
        """Mean power over the last ``window`` seconds (None before two samples)."""
        with self._lock:
            if len(self._recent) < 2:
                return None
            (t0, j0), (t1, j1) = self._recent[0], self._recent[-1]
        return (j1 - j0) / (t1 - t0) if t1 > t0 else None

    @property
    def devices(self) -> tuple[str, ...]:
        """What is being measured, one name per device (those dropped included)."""
        return self._devices

    def per_device(self) -> dict[str, float]:
        """Joules so far of each device."""
        with self._lock:
            return dict(self._per_device)

    def total(self) -> EnergyTotal:
        """Energy so far with its counts (missing samples, wraps, resets, gaps), all devices."""
        with self._lock:
            return self._total

    @property
    def n_dropped(self) -> int:
        """Sources dropped because they failed."""
        return len(self._dropped)

    # ------------------------------------------------------------------ sampling
    def _run(self) -> None:
        try:
            self._sample()
            while self._active and not self._stop.wait(self.interval):
                self._sample()
            if self._active:
                self._sample()
        except Exception as exc:  # never take the process down from a daemon thread
            logger.warning("lossforecast: energy sampling stopped (%r).", exc)
        finally:
            for source in self._active + self._dropped:
                _quietly(source.close)

    def _sample(self) -> None:
        now = time.monotonic()
        for source in list(self._active):
            try:
                source.sample(now)
                failed = source.failing(self.max_missing)
                reason = f"no reading in {self.max_missing} samples"
            except Exception as exc:
                failed, reason = True, f"{type(exc).__name__}: {exc}"
            if failed:
                self._active.remove(source)
                self._dropped.append(source)
                logger.warning(
                    "lossforecast: stopped measuring the energy of %s (%s); the energy so far "
                    "is kept.",
                    ", ".join(source.devices),
                    reason,
                )
        channels = [c for s in self._active + self._dropped for c in s.channels]
        totals = [c.total() for c in channels]
        total = sum(totals, EnergyTotal())
        with self._lock:
            self._total = total
            self._joules = total.joules
            self._per_device = {c.name: t.joules for c, t in zip(channels, totals, strict=True)}
            self._recent.append((now, total.joules))
            self.n_samples += 1

    # ------------------------------------------------------------------ closing
    def close(self, timeout: float = 2.0) -> bool:
        """Take a last sample, stop the thread and release the devices; True if it stopped."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> EnergyMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EnergyMonitor(devices={list(self._devices)!r}, interval={self.interval}, "
            f"joules={self._joules:.1f})"
        )


def open_energy_monitor(
    cuda_devices: Sequence[int | str] | None = None,
    *,
    interval: float = 1.0,
    rapl: bool = True,
    rapl_root: str | os.PathLike = DEFAULT_RAPL_ROOT,
) -> EnergyMonitor | None:
    """An :class:`EnergyMonitor` for what this process can measure, or None.

    The GPUs this process uses, through NVML (see :class:`NVMLSource`); when no GPU can be
    measured and ``rapl`` is true, the CPU packages through RAPL (:class:`RAPLSource`), so
    CPU runs get energy figures too. RAPL is not added to a GPU run (every rank on a node
    would count the same CPU packages again), nor used instead of GPUs named in
    ``cuda_devices`` that cannot be read (the CPU alone would understate the run). To
    measure both, build ``EnergyMonitor([NVMLSource(...), RAPLSource()])`` yourself.

    When nothing can be measured (no NVIDIA driver or ``nvidia-ml-py``, no GPU, no
    readable RAPL) it returns None and logs exactly one info message saying why; it never
    raises for that. When a monitor starts, one info message names the devices.

    Parameters
    ----------
    cuda_devices : sequence of int or str, optional
        CUDA devices of this process (torch indices, ``"cuda:N"`` or UUIDs), mapped through
        ``CUDA_VISIBLE_DEVICES``; default every visible GPU; ``[]`` for none (a CPU run).
        Under DDP pass this rank's device only.
    interval : float, optional
        Seconds between samples, > 0. Default 1.
    rapl : bool, optional
        Fall back to RAPL when no GPU is measured. Default True.
    rapl_root : str or os.PathLike, optional
        The powercap folder. Default ``/sys/class/powercap``.

    Returns
    -------
    EnergyMonitor or None
        A started monitor (call :meth:`EnergyMonitor.close` at the end), or None.

    Raises
    ------
    ValueError
        If ``interval`` is not a positive number.
    """
    if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
        raise ValueError(f"`interval` must be a positive number of seconds, got {interval!r}.")
    reasons: list[str] = []
    sources: list[EnergySource] = []
    if cuda_devices is None or len(cuda_devices) > 0:
        try:
            sources.append(NVMLSource(cuda_devices, interval=interval))
        except Exception as exc:
            reasons.append(f"no GPU reading ({exc})")
    else:
        reasons.append("no GPU in use")
    if not sources and rapl and not cuda_devices:  # not for GPUs we failed to read
        try:
            sources.append(RAPLSource(rapl_root, interval=interval))
        except Exception as exc:
            reasons.append(f"no CPU reading ({exc})")
    if not sources:
        logger.info("lossforecast: energy figures are off: %s.", "; ".join(reasons))
        return None
    monitor = EnergyMonitor(sources, interval=interval)
    logger.info(
        "lossforecast: measuring the energy of %s every %gs.", ", ".join(monitor.devices), interval
    )
    return monitor


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:
        logger.debug("lossforecast: %r while releasing an energy source", exc)
