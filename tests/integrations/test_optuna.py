"""ForecastPruner, TrialReporter and the helpers with real Optuna studies (in-memory and sqlite).

Synthetic curves come from the Multi-Power Law itself; real ones are replays of
``shared/data`` runs (Luo et al., ICLR 2025, the ``mpl-*`` runs).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from lossforecast.integrations.optuna import (  # noqa: E402
    FORECAST_KEY,
    PRUNED_KEY,
    SCHEDULE_KEY,
    ForecastPruner,
    TrialReporter,
    _schedule_from_attrs,
    forecast_value,
    set_schedule,
)

from lossforecast import MultiPowerLaw, Schedule, load_runs  # noqa: E402
from lossforecast._laws import LawInputs  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
T, WARM, EVERY = 10_000, 500, 50
#: Multi-Power Law parameters with a strong response to annealing, so a cosine run is ahead
#: of a WSD run until the WSD cooldown, and the WSD run ends lower.
THETA = np.array([2.5, 3.78, 0.47, -0.9, -5.0, 0.7, 0.8])

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cosine() -> np.ndarray:
    t = np.arange(T - WARM) / (T - WARM)
    return 1e-3 * np.r_[np.linspace(0.01, 1.0, WARM), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t))]


def _wsd() -> np.ndarray:
    lr = 1e-3 * np.r_[np.linspace(0.01, 1.0, WARM), np.ones(T - WARM)]
    n = int(0.2 * T)
    lr[-n:] = np.linspace(1e-3, 0.0, n)
    return lr


def _curve(lr: np.ndarray, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(WARM, T, EVERY)
    return steps, MultiPowerLaw().predict(THETA, LawInputs.at(Schedule(lr), steps)) + shift


def _replay(curves, *, return_forecast: bool = True):
    """An objective that replays ``curves[trial.number]`` = (lr, steps, losses)."""

    def objective(trial):
        lr, steps, losses = curves[trial.number]
        reporter = TrialReporter(trial, lr)
        for step, loss in zip(steps.tolist(), losses.tolist(), strict=True):
            if reporter.report(step, loss):
                trial.set_user_attr("stopped_at", step)
                value = forecast_value(trial)
                if value is None or not return_forecast:
                    raise optuna.TrialPruned()
                return value
        return float(losses[-1])

    return objective


def _pruner(**kw) -> ForecastPruner:
    return ForecastPruner(**kw)  # checks every 2% of the planned steps by default


def _run(pruner, curves, storage=None, **kw):
    study = optuna.create_study(pruner=pruner, storage=storage)
    study.optimize(_replay(curves, **kw), n_trials=len(curves))
    return study


def _is_pruned(trial) -> bool:
    return trial.state == optuna.trial.TrialState.PRUNED or bool(trial.user_attrs.get(PRUNED_KEY))


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": 0.5}, "`confidence` must be in"),
        ({"confidence": 1.0}, "`confidence` must be in"),
        ({"n_startup_trials": -1}, "`n_startup_trials` must be an int >= 0"),
        ({"n_warmup_steps": -1}, "`n_warmup_steps` must be an int >= 0"),
        ({"interval_steps": 0}, "`interval_steps` must be an int >= 1"),
        ({"interval_steps": 1.5}, "`interval_steps` must be an int >= 1"),
        ({"interval_steps": True}, "`interval_steps` must be an int >= 1"),
        ({"min_progress": 1.0}, "`min_progress` must be in"),
        ({"patience": 0}, "`patience` must be an int >= 1"),
        ({"law": "linear"}, "`law` must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForecastPruner(**kwargs)


def test_maximize_study_is_refused():
    study = optuna.create_study(direction="maximize", pruner=ForecastPruner())
    trial = study.ask()
    trial.report(1.0, 0)
    with pytest.raises(ValueError, match="direction='minimize'"):
        trial.should_prune()


def test_reporter_rejects_bad_every_and_schedule():
    trial = optuna.create_study().ask()
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        TrialReporter(trial, _cosine(), every=0)
    with pytest.raises(ValueError, match="negative entry"):
        TrialReporter(trial, [1e-3, -1e-3])


# ---------------------------------------------------------------------- schedule attribute
@pytest.mark.parametrize(
    ("lr", "split"), [(_wsd(), False), (_cosine()[:3000], False), (_cosine(), True)]
)
def test_schedule_round_trips_exactly(lr, split):
    study = optuna.create_study()
    trial = study.ask()
    set_schedule(trial, lr)
    frozen = study.trials[0]
    assert np.array_equal(_schedule_from_attrs(frozen.user_attrs), lr)
    # every stored text fits a MySQL TEXT column; long cosines are split
    assert all(len(v) <= 60_000 for v in frozen.user_attrs.values() if isinstance(v, str))
    assert (f"{SCHEDULE_KEY}_parts" in frozen.user_attrs) == split


# ---------------------------------------------------------------------- decisions
def test_wsd_behind_cosine_now_but_better_at_the_end_is_kept():
    cos_steps, cos_loss = _curve(_cosine())
    wsd_steps, wsd_loss = _curve(_wsd())
    mid = len(cos_steps) * 3 // 4
    assert wsd_loss[mid] > cos_loss[mid] + 0.05  # behind at 75% ...
    assert wsd_loss[-1] < cos_loss[-1] - 0.05  # ... and ahead at the end
    curves = [(_cosine(), cos_steps, cos_loss), (_wsd(), wsd_steps, wsd_loss)]

    study = _run(_pruner(), curves)
    wsd = study.trials[1]
    assert wsd.state == optuna.trial.TrialState.COMPLETE and not _is_pruned(wsd)
    assert study.best_trial.number == 1

    median = _run(optuna.pruners.MedianPruner(n_startup_trials=1, interval_steps=500), curves)
    assert median.trials[1].state == optuna.trial.TrialState.PRUNED
    assert median.best_trial.number == 0  # the median rule loses the best trial


def test_clearly_bad_trial_is_pruned_and_keeps_its_forecast():
    steps, good = _curve(_cosine())
    curves = [(_cosine(), steps, good), (_cosine(), steps, good + 0.3)]
    study = _run(_pruner(), curves)
    bad = study.trials[1]
    attrs = bad.user_attrs
    assert attrs[PRUNED_KEY] is True and attrs["lossforecast_reason"] == "forecast"
    assert attrs["stopped_at"] < 0.5 * T
    truth = float(good[-1] + 0.3)
    assert attrs[f"{FORECAST_KEY}_low"] <= attrs[FORECAST_KEY] <= attrs[f"{FORECAST_KEY}_high"]
    assert attrs[f"{FORECAST_KEY}_low"] > attrs["lossforecast_reference"] == pytest.approx(good[-1])
    assert attrs[f"{FORECAST_KEY}_coverage"] == pytest.approx(0.8)
    assert attrs[f"{FORECAST_KEY}_step"] == T - 1
    assert abs(attrs[FORECAST_KEY] - truth) < 0.1
    # the objective returned the forecast: the trial finished with it as its value
    assert bad.state == optuna.trial.TrialState.COMPLETE
    assert bad.value == forecast_value(bad) == attrs[FORECAST_KEY]
    assert study.best_trial.number == 0


def test_forecast_of_pruned_trials_is_not_a_reference():
    steps, good = _curve(_cosine())
    curves = [
        (_cosine(), steps, good + 0.3),
        (_cosine(), steps, good),
        (_cosine(), steps, good + 0.6),
        (_cosine(), steps, good + 0.35),
    ]
    study = _run(_pruner(), curves)
    # trial 2 returned a forecast; trial 3 is compared with trial 1's measured value
    assert study.trials[2].user_attrs[PRUNED_KEY]
    assert study.trials[3].user_attrs["lossforecast_reference"] == pytest.approx(good[-1])


def test_no_pruning_before_min_progress_startup_or_warmup():
    steps, good = _curve(_cosine())
    curves = [(_cosine(), steps, good), (_cosine(), steps, good + 0.3)]
    late = _run(_pruner(min_progress=0.6), curves)
    assert late.trials[1].user_attrs["stopped_at"] >= 0.6 * T - 1
    warm = _run(_pruner(n_warmup_steps=7000), curves)
    assert warm.trials[1].user_attrs["stopped_at"] >= 7000
    never = _run(_pruner(n_startup_trials=2), curves)
    assert not _is_pruned(never.trials[1])


def test_diverged_trial_is_pruned_without_forecast():
    steps, good = _curve(_cosine())
    broken = good.copy()
    broken[40:] = np.nan
    study = _run(_pruner(), [(_cosine(), steps, good), (_cosine(), steps, broken)])
    trial = study.trials[1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["lossforecast_reason"] == "diverged"
    assert trial.user_attrs["stopped_at"] == steps[40]
    assert forecast_value(trial) is None


def test_trial_without_schedule_is_never_pruned(caplog):
    steps, good = _curve(_cosine())
    study = optuna.create_study(pruner=_pruner(interval_steps=1))
    study.optimize(_replay([(_cosine(), steps, good)]), n_trials=1)
    trial = study.ask()
    with caplog.at_level(logging.WARNING, logger="lossforecast"):
        for step, loss in zip(steps.tolist(), (good + 1.0).tolist(), strict=True):
            trial.report(loss, step)
            assert not trial.should_prune()
    assert sum("stored no LR schedule" in r.getMessage() for r in caplog.records) == 1


def test_pruner_failure_keeps_the_trial(monkeypatch, caplog):
    import lossforecast.integrations.optuna as mod

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(mod.Forecaster, "forecast", broken)
    steps, good = _curve(_cosine())
    with caplog.at_level(logging.WARNING, logger="lossforecast"):
        study = _run(_pruner(), [(_cosine(), steps, good), (_cosine(), steps, good + 0.5)])
    assert not _is_pruned(study.trials[1])
    assert sum("ForecastPruner failed" in r.getMessage() for r in caplog.records) == 1


def test_each_check_adds_only_new_points(monkeypatch):
    import lossforecast.integrations.optuna as mod

    calls: dict[int, list[int]] = {}
    original = mod.Forecaster.update

    def counting(self, step, loss):
        calls.setdefault(id(self), []).append(step)
        original(self, step, loss)

    monkeypatch.setattr(mod.Forecaster, "update", counting)
    steps, good = _curve(_cosine())
    _run(_pruner(interval_steps=1), [(_cosine(), steps, good), (_cosine(), steps, good + 0.3)])
    # one forecaster per trial, each reported point added once, in order
    assert len(calls) == 2
    for fed in calls.values():
        assert fed == steps[: len(fed)].tolist()


def test_reporter_reports_every_nth_increasing_step():
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    reporter = TrialReporter(trial, _cosine(), every=10)
    for step in [0, 5, 10, 10, 7, 20, 25]:
        assert reporter.report(step, 3.0) is False
    study.tell(trial, 3.0)
    assert sorted(study.trials[0].intermediate_values) == [0, 10, 20]
    assert reporter.forecast is None and reporter.pruned is False


# ---------------------------------------------------------------------- samplers learn
def test_returned_forecast_ranks_with_finished_trials_in_tpe():
    """TPE ranks a trial that returned its forecast by that value; a PRUNED trial by step."""
    split = pytest.importorskip("optuna.samplers._tpe.sampler")._split_trials
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def make(state, value=None, reported=None, attrs=None):
        return optuna.trial.create_trial(
            state=state,
            value=value,
            params={"x": 0.5},
            distributions=dist,
            intermediate_values=reported or {},
            user_attrs=attrs or {},
        )

    done = optuna.trial.TrialState.COMPLETE
    measured = [make(done, v, {100: v + 0.1}) for v in (3.0, 3.5, 3.6)]
    for recipe in ("return", "report then prune"):
        study = optuna.create_study()
        for t in measured:
            study.add_trial(t)
        if recipe == "return":
            study.add_trial(make(done, 3.2, {50: 3.4}, {PRUNED_KEY: True, FORECAST_KEY: 3.2}))
        else:  # the alternative: report the forecast at the last step, then prune
            study.add_trial(make(optuna.trial.TrialState.PRUNED, None, {50: 3.4, 9_999: 3.2}))
        below, _ = split(study, study.get_trials(), n_below=2)
        values = sorted(t.value if t.value is not None else 3.2 for t in below)
        if recipe == "return":
            assert values == [3.0, 3.2]
        else:
            assert values == [3.0, 3.5]  # a pruned trial ranks after every finished one


# ---------------------------------------------------------------------- real curves
@pytest.fixture(scope="module")
def mpl_runs():
    if not DATA.is_dir():
        pytest.skip("no shared/data")
    return {r.name: r for r in load_runs(DATA) if r.name.startswith("mpl-")}


def _real(run):
    return (run.lr_schedule, run.steps, run.loss)


def test_real_wsd_run_is_kept_where_median_cuts_it(mpl_runs):
    cosine, wsd = mpl_runs["mpl-100m-cosine-24000"], mpl_runs["mpl-100m-wsd-20000-24000"]
    assert wsd.final_loss < cosine.final_loss
    # MedianPruner compares values at the same step: put the cosine run on the WSD run's steps
    on_wsd_steps = np.interp(wsd.steps, cosine.steps, cosine.loss)
    curves = [(cosine.lr_schedule, wsd.steps, on_wsd_steps), _real(wsd)]
    study = _run(ForecastPruner(interval_steps=1000), curves)
    assert not _is_pruned(study.trials[1]) and study.best_trial.number == 1
    median = _run(optuna.pruners.MedianPruner(n_startup_trials=1, interval_steps=1000), curves)
    assert median.trials[1].state == optuna.trial.TrialState.PRUNED
    assert median.trials[1].user_attrs["stopped_at"] < 20_000  # before its cooldown


def test_real_bad_run_is_pruned_early(mpl_runs):
    big, small = mpl_runs["mpl-400m-cosine-24000"], mpl_runs["mpl-25m-cosine-24000"]
    study = _run(ForecastPruner(interval_steps=1000), [_real(big), _real(small)])
    trial = study.trials[1]
    assert trial.user_attrs[PRUNED_KEY] and trial.user_attrs["stopped_at"] < 0.3 * 24_000
    assert trial.value == pytest.approx(small.final_loss, rel=0.02)


# ---------------------------------------------------------------------- sqlite, processes
def _worker(url: str, shift: float) -> None:
    """One process: load the shared study and run one trial of the cosine curve + ``shift``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steps, loss = _curve(_cosine(), shift)
    study = optuna.load_study(study_name="shared", storage=url, pruner=_pruner())
    study.optimize(_replay({0: (_cosine(), steps, loss), 1: (_cosine(), steps, loss)}), n_trials=1)


def test_sqlite_storage_across_processes(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="shared", storage=url)
    ctx = multiprocessing.get_context("spawn")
    for shift in (0.0, 0.3):  # the second process's pruner reads the first one's result
        proc = ctx.Process(target=_worker, args=(url, shift))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0
    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert not _is_pruned(trials[0])
    bad = trials[1]
    assert bad.user_attrs[PRUNED_KEY] is True  # written by the other process's pruner
    assert math.isfinite(forecast_value(bad)) and bad.value == forecast_value(bad)
    assert np.array_equal(_schedule_from_attrs(bad.user_attrs), _cosine())
