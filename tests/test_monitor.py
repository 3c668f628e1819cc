"""Tests for Monitor (plain training loops) and the helpers the adapters share with it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from lossforecast import Event, Forecast, Forecaster, Monitor, Priors
from lossforecast._callbacks import check_options, never_raises
from lossforecast._monitor import LossWindow, join_schedule, train_loss_step
from lossforecast.sinks import ConsoleSink, Sink

T = 400
LR = np.r_[
    np.linspace(1e-4, 1e-3, 40), 1e-3 * 0.5 * (1 + np.cos(np.pi * np.arange(T - 40) / (T - 40)))
]


def _loss(step):
    return 2.0 + 3.0 * (step + 10) ** -0.4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give `lr_schedule`"),
        ({"optimizer": object()}, "`total_steps`"),
        ({"lr_schedule": LR, "total_steps": 10}, "`total_steps` is 10"),
        ({"lr_schedule": LR, "every_n_steps": 0}, "`every_n_steps`"),
        ({"lr_schedule": LR, "total_steps": -5}, "`total_steps`"),
        ({"scheduler": object(), "total_steps": 5}, "no `.optimizer`"),
        ({"lr_schedule": LR, "coverage": 2.0}, "`coverage`"),
        ({"lr_schedule": LR, "sinks": [], "log_dir": "runs/x"}, "`log_dir` sets up the default"),
    ],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Monitor(**kwargs)


@pytest.mark.parametrize(
    ("updates", "window", "expected"),
    [(1, 1, -1), (2, 1, 0), (10, 1, 8), (10, 2, 7), (10, 4, 6), (50, 50, 23)],
)
def test_train_loss_step(updates, window, expected):
    # mean of steps (updates - window - 1) .. (updates - 2), rounded down
    assert train_loss_step(updates, window) == expected


def test_step_feeds_window_means_at_their_mean_step():
    mon = Monitor(LR, every_n_steps=5)
    for s in range(100):
        mon.step(float(s))  # the loss of batch s is s
    state = mon.forecaster.state_dict()["observations"]
    assert mon.updates == 100 and mon.forecaster.n_points == 20
    assert mon.forecaster.last_step == train_loss_step(100, 5) == 96
    # window (95..99) has mean loss 97 and belongs to steps 94..98
    assert state["last_loss"] == 97.0
    assert mon.close()


def test_forecast_in_the_background_matches_a_synchronous_fit():
    mon = Monitor(LR, every_n_steps=4)
    for s in range(240):
        mon.step(_loss(s))
    _wait_until_fitted(mon, 0)
    background = mon.forecast()
    assert mon.close()
    assert isinstance(background, Forecast) and background.step == T - 1
    assert mon.fitter.n_fits >= 1 and mon.fitter.n_errors == 0
    assert background.low < background.loss < background.high


class Collect(Sink):
    def __init__(self) -> None:
        self.seen: list[Event] = []

    def write(self, event: Event) -> None:
        self.seen.append(event)


#: How long a test waits for a background fit. The fitter rests 49 times as long as its last
#: fit took (2% duty), so on a loaded machine a 0.3 s fit means 15 s to the next one: a 10 s
#: wait ran out there, and the test went on with an old fit and failed.
FIT_WAIT = 120.0


def _wait_for_fit(mon: Monitor, after: int) -> None:
    deadline = time.monotonic() + FIT_WAIT
    while mon.fitter.n_fits <= after:
        if time.monotonic() > deadline:
            pytest.fail(f"no background fit after fit {after} within {FIT_WAIT:.0f} s")
        time.sleep(0.01)  # the fit runs in the background


def _wait_until_fitted(mon: Monitor, through: int) -> None:
    """Block until a background fit has used the observations up to step ``through``."""
    deadline = time.monotonic() + FIT_WAIT
    while (f := mon.forecast()) is None or f.observed_step < through:
        if time.monotonic() > deadline:
            pytest.fail(f"no background fit through step {through} within {FIT_WAIT:.0f} s")
        time.sleep(0.01)


def test_events_go_to_the_sinks_and_finish_emits_one_summary():
    sink = Collect()
    mon = Monitor(LR, every_n_steps=4, sinks=[sink])
    for s in range(200):
        mon.step(_loss(s))
    _wait_until_fitted(mon, 196)  # the window of steps 196..199 is placed at step 196
    for s in range(200, 300):
        mon.step(_loss(s))
    assert mon.finish() is not None
    assert mon.finish() is not None  # a second call emits nothing more

    assert sink.seen == mon.events and mon.events[-1].is_summary
    forecasts = [e for e in mon.events if e.kind == "forecast" and not e.is_summary]
    assert len(forecasts) >= 1 and [e.is_summary for e in mon.events].count(True) == 1
    assert {e.kind for e in mon.events} <= {"forecast", "warning"}  # the wait may be a stall
    first = next(e for e in forecasts if e.step >= 200)
    assert first.step < 210 and first.data["observed_step"] >= 196  # the fit through 200
    assert first.trajectory.steps[0] == first.step and first.trajectory.steps[-1] == T - 1
    assert len(first.trajectory.steps) == 33
    assert first.data["observed_loss"] == pytest.approx(_loss(first.step), rel=0.01)
    assert abs(first.data["residual"]) < 0.01 * first.data["observed_loss"]
    assert first.data["seconds_to_finish"] >= 0.0
    summary = mon.events[-1]
    assert summary.step == 299 and summary.data["forecasts"] == len(forecasts)
    assert summary.data["reached_loss"] == pytest.approx(_loss(299), rel=0.01)
    assert summary.data["observed_step"] == forecasts[-1].data["observed_step"]


def test_default_sinks_are_the_console_and_tensorboard_with_log_dir(tmp_path):
    assert [type(s) for s in Monitor(LR).bus.sinks] == [ConsoleSink]
    pytest.importorskip("tensorboard")
    mon = Monitor(LR, log_dir=tmp_path / "run")
    assert [type(s).__name__ for s in mon.bus.sinks] == ["ConsoleSink", "TensorBoardSink"]
    mon.close()
    off = Monitor(LR, every_n_steps=4, sinks=[])
    for s in range(200):
        off.step(_loss(s))
    _wait_for_fit(off, 0)
    off.step(_loss(200))
    off.finish()
    assert off.bus.sinks == [] and off.events[-1].is_summary  # still kept for the program


def test_close_without_finish_emits_no_summary():
    sink = Collect()
    mon = Monitor(LR, sinks=[sink])
    for s in range(50):
        mon.step(_loss(s))
    assert mon.close()
    assert not any(e.is_summary for e in sink.seen)


def test_tensor_losses_are_read_once_per_window():
    torch = pytest.importorskip("torch")
    mon = Monitor(LR, every_n_steps=3)
    for s in range(9):
        mon.step(torch.tensor(float(s), requires_grad=True) * 1.0)
    assert mon.forecaster.state_dict()["observations"]["last_loss"] == 7.0
    mon.close()


def test_steps_past_the_schedule_never_raise(caplog):
    mon = Monitor(LR[:10])
    with caplog.at_level("WARNING", logger="lossforecast"):
        for _ in range(30):
            mon.step(1.0)
    assert mon.n_errors == 19 and mon.forecaster.last_step == 9
    assert sum("outside the planned schedule" in r.getMessage() for r in caplog.records) == 1
    mon.close()


@pytest.mark.parametrize("broken", ["refit", "update", "forecast"])
def test_broken_forecaster_never_raises(broken, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("deliberately broken")

    monkeypatch.setattr(Forecaster, broken, boom)
    mon = Monitor(LR, every_n_steps=2)
    for s in range(200):
        mon.step(_loss(s))
    assert mon.forecast() is None
    assert mon.close()


def test_state_round_trip_continues_the_run():
    full = Monitor(LR, every_n_steps=5)
    first = Monitor(LR, every_n_steps=5)
    for s in range(300):
        full.step(_loss(s))
        if s < 150:
            first.step(_loss(s))
    state = json.loads(json.dumps(first.state_dict()))
    # A second JSON copy, not first.state_dict() again: first's background fit may land in
    # between and change its last_params.
    untouched = json.loads(json.dumps(state))
    resumed = Monitor(LR, every_n_steps=5)
    resumed.load_state_dict(state)
    assert state == untouched  # load_state_dict leaves its argument as it was
    for s in range(150, 300):
        resumed.step(_loss(s))
    assert resumed.updates == 300
    assert (
        resumed.forecaster.state_dict()["observations"]
        == full.forecaster.state_dict()["observations"]
    )
    for mon in (full, first, resumed):
        mon.close()


def test_load_rejects_another_version():
    mon = Monitor(LR)
    with pytest.raises(ValueError, match="version"):
        mon.load_state_dict({"version": 99})


def test_schedule_captured_from_a_torch_scheduler_and_recaptured_on_resume():
    torch = pytest.importorskip("torch")

    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

    opt, sched = make()
    mon = Monitor(optimizer=opt, scheduler=sched, total_steps=100)
    planned = mon.forecaster.schedule.lr.copy()
    for _ in range(30):
        opt.step()
        sched.step()
        mon.step(1.0)
    assert planned[30] == pytest.approx(opt.param_groups[0]["lr"])
    state = mon.state_dict()
    mon.close()

    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    resumed = Monitor(scheduler=sched2, total_steps=100)  # captured from the resumed scheduler...
    resumed.load_state_dict(state)  # ...then joined to the saved past
    np.testing.assert_allclose(resumed.forecaster.schedule.lr, planned, rtol=1e-12)
    resumed.close()


def test_plateau_scheduler_is_reported(caplog):
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with caplog.at_level("WARNING", logger="lossforecast"):
        mon = Monitor(
            optimizer=opt, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt), total_steps=50
        )
    assert "ReduceLROnPlateau" in mon.schedule_note
    assert [r.getMessage() for r in caplog.records] == [f"lossforecast: {mon.schedule_note}"]


def test_monitor_runs_with_torch_blocked():
    code = (
        "import sys\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'lightning', 'transformers'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "import numpy as np\n"
        "from lossforecast import Monitor\n"
        "mon = Monitor(np.linspace(1, 0.1, 50), every_n_steps=2)\n"
        "for s in range(40):\n"
        "    mon.step(1.0 / (s + 1))\n"
        "assert mon.close() and mon.n_errors == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("saved", "start", "expected", "noted"),
    [
        (None, 0, [3.0, 2.0], False),
        ([9.0, 8.0, 7.0], 2, [9.0, 8.0, 3.0, 2.0], False),
        (None, 2, [3.0, 3.0, 3.0, 2.0], True),
        ([9.0], 2, [3.0, 3.0, 3.0, 2.0], True),
    ],
)
def test_join_schedule(saved, start, expected, noted):
    lr, note = join_schedule(saved, start, [3.0, 2.0])
    assert lr.tolist() == expected and (note is not None) == noted


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"law": "cubic"}, ValueError, "`law`"),
        ({"target_step": -2}, ValueError, "`target_step`"),
        ({"target_step": True}, ValueError, "`target_step`"),
        ({"horizon": 3}, TypeError, "horizon"),
        ({"target_loss": "low"}, ValueError, "`target_loss`"),
        ({"peak_flops": -1.0}, ValueError, "peak_flops"),
    ],
)
def test_check_options(options, error, match):
    with pytest.raises(error, match=match):
        check_options(options)


def test_never_raises_logs_once_per_hook(caplog):
    class Hooks:
        @never_raises
        def on_step(self):
            raise KeyError("gone")

    hooks = Hooks()
    with caplog.at_level("WARNING", logger="lossforecast"):
        for _ in range(3):
            hooks.on_step()
    assert [r.getMessage() for r in caplog.records] == [
        "lossforecast: on_step failed (KeyError: 'gone'); training goes on."
    ]


def test_status_scorecard_and_eta_in_every_event(tmp_path):
    sink = Collect()
    mon = Monitor(LR, every_n_steps=4, sinks=[sink], run_dir=tmp_path)
    assert mon.status().forecast is None and mon.status().progress == 0.0
    for s in range(150):
        mon.step(_loss(s))
    _wait_until_fitted(mon, 144)  # the window of steps 144..147
    for s in range(150, 300):
        mon.step(_loss(s))
    status = mon.status()
    assert status.step == 300 and status.progress == pytest.approx(0.75)
    assert status.forecast is not None and status.seconds_to_finish > 0
    assert status.eta.endswith("Z")
    mon.emit(Event("warning", "warning", 300, "something odd"))
    warning = mon.events[-1]
    assert warning.data["eta"] == mon.status().eta and warning.data["progress"] == 0.75
    assert mon.status().warnings == status.warnings + 1  # (the test's wait may be a stall)
    mon.emit(Event("advice", "info", 300, "cool down now"))
    assert mon.status().advice == (*status.advice, "cool down now")
    assert mon.status().warnings == status.warnings + 1  # advice is not a warning
    mon.finish()

    summary = mon.events[-1]
    assert summary.is_summary and summary.data["progress"] == 0.75 and "eta" in summary.data
    card = json.loads((tmp_path / "lossforecast_scorecard.json").read_text())
    assert card["reached_loss"] == pytest.approx(summary.data["reached_loss"])
    kept = {row["milestone"]: row for row in card["milestones"] if "forecast" in row}
    assert sorted(kept) == [0.5]  # no fit before 25%; stopped at step 299 < 75% (299.25)
    assert summary.data["scorecard/forecast_at_50pct"] == kept[0.5]["forecast"]


class ConstantPower:
    """Stands in for an EnergyMonitor (no GPU or RAPL counter on the test machines)."""

    def __init__(self, watts: float) -> None:
        self._watts, self._t0, self.closed = watts, time.monotonic(), False

    def joules(self) -> float:
        return self._watts * (time.monotonic() - self._t0)

    def watts(self) -> float:
        return self._watts

    def close(self) -> None:
        self.closed = True


def test_forecast_events_carry_throughput_energy_and_cost_to_finish(caplog):
    caplog.set_level("INFO", logger="lossforecast")
    mon = Monitor(
        LR, every_n_steps=4, sinks=[], target_loss=2.3, flops_per_step=1e9, peak_flops=1e12
    )
    # no GPU and no readable RAPL here: energy is off, said once
    assert mon.compute.energy is None
    assert len([r for r in caplog.records if "energy" in r.getMessage().lower()]) == 1
    power = mon.compute.energy = ConstantPower(300.0)
    for s in range(200):
        mon.step(_loss(s))
        time.sleep(0.0005)
    _wait_until_fitted(mon, 196)
    for s in range(200, 204):
        mon.step(_loss(s))  # emits the forecast of the fit through step 196
    event = [e for e in mon.events if e.kind == "forecast"][-1]
    assert event.data["observed_step"] >= 196
    d = event.data
    assert 0 < d["compute/mfu"] == pytest.approx(1e9 / d["compute/seconds_per_step"] / 1e12)
    assert d["compute/watts"] == 300.0
    remaining = T - 1 - event.step
    assert d["flops_to_finish"] == pytest.approx(1e9 * remaining)
    assert d["joules_to_finish"] == pytest.approx(300.0 * d["compute/seconds_per_step"] * remaining)
    # the planned curve reaches 2.3 before the end: the step it does, within the plan
    assert event.step < d["cost/target_loss_step"] < T
    assert mon.status().cost["flops_to_finish"] > 0
    mon.finish()
    assert power.closed


def test_history_dir_learns_from_the_previous_run(tmp_path, caplog):
    caplog.set_level("INFO", logger="lossforecast")
    (tmp_path / "notes.json").write_text("{not json")  # foreign files are skipped

    def run(labels):
        mon = Monitor(LR, every_n_steps=4, sinks=[], history_dir=tmp_path, labels=labels)
        for s in range(T):
            mon.step(_loss(s))
        mon.finish()
        return mon

    first = run({"model": "tiny"})
    assert first.forecaster.priors == Priors.default()
    (summary,) = [p for p in tmp_path.glob("*.json") if p.name != "notes.json"]
    assert json.loads(summary.read_text())["labels"] == {"model": "tiny"}
    second = run({"model": "tiny"})
    assert second.forecaster.priors != Priors.default()
    assert any("sharpened by 1 past run" in r.getMessage() for r in caplog.records)
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_history_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFORECAST_HISTORY", str(tmp_path))
    mon = Monitor(LR, sinks=[], energy=False)
    assert str(mon.history_dir) == str(tmp_path)
    mon.close()


def test_loss_window_sums_floats_and_tensors_and_starts_over():
    window = LossWindow()
    assert window.take_sum() == (None, 0) and window.take_mean() is None
    window.add(1.0)
    window.add(np.float32(2.0))
    assert window.count == 2 and window.take_sum() == (3.0, 2)
    assert window.count == 0
    torch = pytest.importorskip("torch")
    for value in (1.5, 2.5, 5.0):
        window.add(torch.tensor(value, requires_grad=True) * 1.0)  # summed detached, at read
    total, count = window.take_sum()
    assert count == 3 and float(total) == 9.0 and not total.requires_grad
