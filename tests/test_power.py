"""Tests for the energy sources and the sampler: the no-GPU path, NVML mapping, RAPL, thread."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types

import pytest

from lossforecast._energy import CounterAccumulator, PowerIntegrator
from lossforecast._power import (
    Channel,
    EnergyMonitor,
    EnergySource,
    EnergyUnavailable,
    NVMLSource,
    RAPLSource,
    nvml_device_ids,
    open_energy_monitor,
)

LOGGER = "lossforecast._power"


def info_and_above(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.INFO]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ------------------------------------------------------------------ fake NVML
class FakeNVML(types.ModuleType):
    """A stand-in ``pynvml`` for GPUs that cannot run here: the calls NVMLSource makes."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus, *, fail_init=False):
        super().__init__("pynvml")
        self.gpus = gpus  # list of dicts: uuid, name, energy (mJ, or None), power (mW)
        self.migs = {}  # MIG UUID -> parent index
        self.fail_init = fail_init
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return ("gpu", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid in self.migs:
            return ("mig", uuid)
        for i, gpu in enumerate(self.gpus):
            if gpu["uuid"] == uuid:
                return ("gpu", i)
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        return ("gpu", self.migs[handle[1]])

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle[1]]["uuid"]

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle[1]]["name"].encode()  # old pynvml versions return bytes

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        value = self.gpus[handle[1]]["energy"]
        if value is None:
            raise self.NVMLError("Not Supported")
        return value

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.gpus[handle[1]]["power"]


def two_gpus():
    return [
        {"uuid": "GPU-aaaa-0000", "name": "NVIDIA H100 80GB HBM3", "energy": 1_000, "power": 1},
        {"uuid": "GPU-bbbb-1111", "name": "Tesla T4", "energy": None, "power": 70_000},
    ]


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNVML(two_gpus())
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


# ------------------------------------------------------------------ the no-GPU path
def test_nothing_to_measure_on_this_machine_gives_none_and_one_info_message(caplog, tmp_path):
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        pass
    else:  # pragma: no cover - a machine with an NVIDIA driver
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML; the no-GPU path is tested with fakes below")
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    monitor = open_energy_monitor(rapl_root=tmp_path / "no-powercap")
    assert monitor is None
    records = info_and_above(caplog)
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "energy figures are off" in records[0].getMessage()


@pytest.mark.parametrize("nvml", ["missing", "no driver"])
def test_no_nvml_and_no_rapl_gives_none_and_exactly_one_info(nvml, monkeypatch, caplog, tmp_path):
    if nvml == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([], fail_init=True))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for _ in range(3):  # every call answers the same way, without raising
        assert open_energy_monitor(rapl_root=tmp_path) is None
    records = info_and_above(caplog)
    assert [r.levelno for r in records] == [logging.INFO] * 3
    text = records[0].getMessage()
    expected = "nvidia-ml-py" if nvml == "missing" else "NVML Shared Library Not Found"
    assert expected in text and "RAPL" in text


def test_no_gpus_visible_is_reported_once(fake_nvml, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    assert open_energy_monitor(rapl=False) is None
    records = info_and_above(caplog)
    assert len(records) == 1 and "no GPU is visible" in records[0].getMessage()
    assert fake_nvml.inits == fake_nvml.shutdowns == 1


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_open_energy_monitor_rejects_bad_interval(interval):
    with pytest.raises(ValueError, match="`interval`"):
        open_energy_monitor(interval=interval)


# ------------------------------------------------------------------ CUDA_VISIBLE_DEVICES
@pytest.mark.parametrize(("devices", "visible", "expected"), [
    (None, None, None),
    (None, "", []),
    (None, "2,3", [2, 3]),
    ([0], None, [0]),
    ([1], "2,3", [3]),
    (["cuda:1"], "2, 3", [3]),
    (["cuda"], "5", [5]),
    (None, "0,-1,1", [0]),  # CUDA stops at the first invalid entry
    (None, "1,foo,2", [1]),
    (None, "GPU-8a1f2b,MIG-4c5d6e", ["GPU-8a1f2b", "MIG-4c5d6e"]),
    ([1], "GPU-aaaa,GPU-bbbb", ["GPU-bbbb"]),
    (["5e1c9b7a-0000"], None, ["GPU-5e1c9b7a-0000"]),  # torch's uuid has no prefix
    (["MIG-4c5d6e"], "0", ["MIG-4c5d6e"]),
])  # fmt: skip
def test_nvml_device_ids(devices, visible, expected):
    assert nvml_device_ids(devices, visible) == expected


@pytest.mark.parametrize(("devices", "visible"), [([2], "0,1"), ([0], ""), ([-1], None)])
def test_nvml_device_ids_rejects_invisible_devices(devices, visible):
    with pytest.raises(ValueError, match="is not visible"):
        nvml_device_ids(devices, visible)


# ------------------------------------------------------------------ NVMLSource (fake NVML)
def test_nvml_source_uses_the_counter_or_integrates_power(fake_nvml):
    source = NVMLSource(interval=1.0)
    assert source.devices == (
        "GPU 0: NVIDIA H100 80GB HBM3 (energy counter)",
        "GPU 1: Tesla T4 (power x time)",
    )
    counter, power = source.channels
    assert isinstance(counter.accumulator, CounterAccumulator)
    assert isinstance(power.accumulator, PowerIntegrator)
    for t in range(4):
        fake_nvml.gpus[0]["energy"] = 1_000 + 250_000 * t  # 250 W in millijoules
        source.sample(float(t))
    assert counter.total().joules == pytest.approx(750.0)
    assert power.total().joules == pytest.approx(70.0 * 3)
    source.close()
    source.close()
    assert fake_nvml.shutdowns == 1


def test_nvml_source_maps_the_torch_index_through_cuda_visible_devices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert NVMLSource([0]).devices == ("GPU 1: Tesla T4 (power x time)",)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")  # a UUID prefix, as CUDA allows
    assert NVMLSource([0]).devices == ("GPU GPU-bbbb: Tesla T4 (power x time)",)


def test_nvml_source_measures_a_mig_instance_through_its_gpu_once(fake_nvml, monkeypatch):
    fake_nvml.migs = {"MIG-1111": 0, "MIG-2222": 0}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1111,MIG-2222")
    source = NVMLSource()
    assert len(source.devices) == 1
    assert "whole GPU shared by its MIG instances" in source.devices[0]


def test_nvml_source_without_energy_or_power_is_unavailable(fake_nvml):
    for gpu in fake_nvml.gpus:
        gpu["energy"] = None
        gpu["power"] = None
    fake_nvml.nvmlDeviceGetPowerUsage = lambda handle: (_ for _ in ()).throw(
        FakeNVML.NVMLError("Not Supported")
    )
    with pytest.raises(EnergyUnavailable, match="reports its energy or power"):
        NVMLSource()
    assert fake_nvml.inits == fake_nvml.shutdowns == 1


def test_open_energy_monitor_measures_the_gpus_and_closes(fake_nvml, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor = open_energy_monitor([0], interval=0.01)
    try:
        assert monitor is not None
        assert monitor.devices == ("GPU 0: NVIDIA H100 80GB HBM3 (energy counter)",)
        assert wait_for(lambda: monitor.n_samples >= 2)
    finally:
        assert monitor.close()
    assert fake_nvml.shutdowns == 1
    assert len(info_and_above(caplog)) == 1


# ------------------------------------------------------------------ RAPL (fake sysfs)
def make_domain(root, name, label, energy, max_range=1_000_000_000):
    folder = root / name
    folder.mkdir()
    (folder / "name").write_text(label + "\n")
    if energy is None:
        (folder / "energy_uj").mkdir()  # unreadable as a file, like a root-only counter
    else:
        (folder / "energy_uj").write_text(f"{energy}\n")
    (folder / "max_energy_range_uj").write_text(f"{max_range}\n")
    return folder / "energy_uj"


def test_rapl_source_reads_the_package_domains_and_wraps(tmp_path):
    pkg0 = make_domain(tmp_path, "intel-rapl:0", "package-0", 999_000_000)
    pkg1 = make_domain(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    make_domain(tmp_path, "intel-rapl:0:0", "core", 1)  # part of package 0
    make_domain(tmp_path, "intel-rapl:2", "psys", 1)  # the platform, holds the packages
    make_domain(tmp_path, "intel-rapl-mmio:0", "package-0", 1)  # the same package again
    source = RAPLSource(tmp_path)
    assert source.devices == ("CPU package-0 (RAPL)", "CPU package-1 (RAPL)")
    source.sample(0.0)
    pkg0.write_text("4000000\n")  # wrapped at 1e9 uJ: +5 J
    pkg1.write_text("8000000\n")  # +3 J
    source.sample(1.0)
    first, second = (c.total() for c in source.channels)
    assert first.joules == pytest.approx(5.0) and first.n_wraps == 1
    assert second.joules == pytest.approx(3.0)


def test_rapl_source_skips_unreadable_counters(tmp_path):
    make_domain(tmp_path, "intel-rapl:0", "package-0", None)
    with pytest.raises(EnergyUnavailable, match="not readable: intel-rapl:0"):
        RAPLSource(tmp_path)
    make_domain(tmp_path, "intel-rapl:1", "package-1", 10)
    assert RAPLSource(tmp_path).devices == ("CPU package-1 (RAPL)",)


def test_rapl_source_without_powercap(tmp_path):
    with pytest.raises(EnergyUnavailable, match="no "):
        RAPLSource(tmp_path / "missing")


def test_open_energy_monitor_falls_back_to_rapl_on_a_cpu_run(tmp_path, caplog):
    counter = make_domain(tmp_path, "intel-rapl:0", "package-0", 0)
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor = open_energy_monitor([], interval=0.01, rapl_root=tmp_path)
    assert monitor is not None
    try:
        assert monitor.devices == ("CPU package-0 (RAPL)",)
        assert wait_for(lambda: monitor.n_samples >= 1)
        counter.write_text("2500000\n")
        assert wait_for(lambda: monitor.joules() == pytest.approx(2.5))
    finally:
        assert monitor.close()
    assert monitor.per_device() == {"CPU package-0 (RAPL)": pytest.approx(2.5)}
    assert open_energy_monitor([], rapl=False) is None


# ------------------------------------------------------------------ the sampler thread
class Ramp(EnergySource):
    """A stand-in device: an energy counter rising at ``watts`` (or failing on demand)."""

    def __init__(self, name="fake", watts=100.0):
        self.t0 = time.monotonic()
        self.watts = watts
        self.fail = False
        self.closed = threading.Event()
        super().__init__([Channel(name, self.read, CounterAccumulator())])

    def read(self):
        return self.watts * (time.monotonic() - self.t0)

    def sample(self, now):
        if self.fail:
            raise OSError("device fell off the bus")
        super().sample(now)

    def close(self):
        self.closed.set()


def test_monitor_measures_energy_and_power_off_the_training_thread():
    source = Ramp(watts=100.0)
    monitor = EnergyMonitor([source], interval=0.01, window=0.2)
    assert monitor._thread.daemon and monitor._thread is not threading.current_thread()
    assert wait_for(lambda: monitor.n_samples >= 30)
    assert monitor.watts() == pytest.approx(100.0, rel=0.05)
    j = monitor.joules()
    assert monitor.close()
    assert source.closed.is_set()
    assert monitor.joules() >= j > 0
    assert monitor.total().n_samples == monitor.n_samples
    assert monitor.close()  # twice is fine


def test_failing_source_is_logged_once_and_dropped(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    good, bad = Ramp("good", 50.0), Ramp("bad", 20.0)
    monitor = EnergyMonitor([good, bad], interval=0.01)
    assert wait_for(lambda: monitor.n_samples >= 5)
    bad.fail = True
    assert wait_for(lambda: monitor.n_dropped == 1)
    kept = monitor.per_device()["bad"]
    assert wait_for(lambda: monitor.n_samples >= 20)
    assert monitor.per_device()["bad"] == kept > 0  # its energy so far stays in the total
    assert monitor.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "bad" in warnings[0].getMessage()
    assert good.closed.is_set() and bad.closed.is_set()


def test_source_missing_every_sample_is_dropped():
    channel = Channel("silent", lambda: None, PowerIntegrator(interval=0.01))
    monitor = EnergyMonitor([EnergySource([channel])], interval=0.01, max_missing=3)
    assert wait_for(lambda: monitor.n_dropped == 1)
    assert monitor.close()
    assert monitor.joules() == 0.0 and monitor.watts() in (None, 0.0)


def test_a_read_that_raises_is_a_missing_sample():
    calls = iter([0.0, RuntimeError("busy"), 30.0])

    def read():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    channel = Channel("flaky", read, CounterAccumulator())
    for t in range(3):
        channel.sample(float(t))
    total = channel.total()
    assert (total.joules, total.n_missing) == (30.0, 1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"interval": 0}, "`interval`"),
    ({"interval": 1.0, "window": 0.5}, "`window`"),
    ({"max_missing": 0}, "`max_missing`"),
])  # fmt: skip
def test_monitor_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyMonitor([Ramp()], **kwargs)


def test_monitor_needs_a_source():
    with pytest.raises(ValueError, match="`sources`"):
        EnergyMonitor([])


def test_rapl_does_not_stand_in_for_gpus_that_cannot_be_read(monkeypatch, tmp_path, caplog):
    make_domain(tmp_path, "intel-rapl:0", "package-0", 0)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([], fail_init=True))
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert open_energy_monitor([0], rapl_root=tmp_path) is None  # a GPU run: CPU alone misleads
    monitor = open_energy_monitor(rapl_root=tmp_path, interval=0.01)  # devices unknown: CPU
    assert monitor is not None and monitor.devices == ("CPU package-0 (RAPL)",)
    assert monitor.close()
    assert len(info_and_above(caplog)) == 2
