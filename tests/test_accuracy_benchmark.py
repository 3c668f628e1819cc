"""benchmarks/accuracy.py's scoring: the tables and target checks say what the rows hold."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lossforecast import MultiPowerLaw, Priors, Schedule
from lossforecast._laws import LawInputs

MPL, LRA = "lossforecast (multi-power)", "lossforecast (lr-annealing)"


@pytest.fixture(scope="module")
def accuracy(load_script):
    return load_script("benchmarks/accuracy.py")


def _rows(accuracy, rng: np.random.Generator, plain_factor: float = 4.0) -> tuple[list[dict], dict]:
    """Rows for 20 runs of two sources: two laws, and a plain fit whose error is
    ``plain_factor`` times the multi-power one's on every other run (no answer on the rest)."""
    rows, errors = [], {}
    for i in range(20):
        base = dict(run=f"r{i}", source="a" if i < 10 else "b", family="wsd")
        for c in accuracy.CUTOFFS:
            e_mpl, e_lra = rng.normal(0.0, 0.01, size=2)
            errors[(i, c)] = (e_mpl, e_lra)
            rows.append(dict(base, method=MPL, cutoff=c, error=e_mpl, cov80=abs(e_mpl) < 0.01))
            rows.append(dict(base, method=LRA, cutoff=c, error=e_lra, cov80=True))
            plain = dict(base, method=accuracy.PLAIN, cutoff=c)
            if i % 2 == 0:  # the plain fit answers every other run only
                plain.update(error=plain_factor * e_mpl, cov80=False)
            rows.append(plain)
    return rows, errors


def test_law_mixtures_score_the_weighted_average_of_the_two_forecasts(accuracy):
    rows, errors = _rows(accuracy, np.random.default_rng(0))
    table, _ = accuracy.summarise(rows)
    section = table[table.index("## Averaging the laws") :].split("\n\n")[1].splitlines()
    half = next(line for line in section if line.startswith("| 0.5 |"))
    expected = [
        np.abs([0.5 * a + 0.5 * b for (i, cut), (a, b) in errors.items() if cut == c])
        for c in accuracy.CUTOFFS
    ]
    cells = half.strip("|").split("|")[1:]
    for cell, e in zip(cells, expected, strict=True):
        assert cell.strip() == f"{100 * np.median(e):.2f}% / {100 * np.percentile(e, 90):.2f}%"


def test_law_mixtures_need_exactly_two_laws(accuracy):
    rows, _ = _rows(accuracy, np.random.default_rng(1))
    table, _ = accuracy.summarise([r for r in rows if r["method"] != LRA])
    assert "Averaging the laws" not in table


@pytest.mark.parametrize("plain_factor, verdict", [(4.0, "yes"), (1.5, "NO")])
def test_targets_compare_like_for_like_on_the_runs_the_plain_fit_answers(
    accuracy, plain_factor, verdict
):
    rows, errors = _rows(accuracy, np.random.default_rng(2), plain_factor)
    _, summary = accuracy.summarise(rows)
    c = accuracy.CUTOFFS[0]
    on_plain = np.median([abs(errors[(i, c)][0]) for i in range(0, 20, 2)])
    assert summary[f"{MPL}|{c}|on_plain_runs"] == pytest.approx(on_plain)
    assert summary[f"{accuracy.PLAIN}|{c}"]["n"] == 10
    line = accuracy.check_targets(summary, MPL)[0]
    # on the same runs the plain fit's error is plain_factor times ours
    assert f"(on the 10 runs it answers: {100 * on_plain:.2f}%, {verdict})" in line


@pytest.mark.parametrize(
    ("hold_out", "trained_on"),
    [
        ("source", {"b-cosine", "b-wsd"}),
        ("source-and-family", {"b-wsd"}),
    ],
)
def test_priors_for_a_held_out_run_never_see_what_it_holds_out(accuracy, hold_out, trained_on):
    """Runs of source a with a cosine schedule: under ``source`` their priors come from every
    run of source b; under ``source-and-family`` from source b's runs of other families."""
    runs = [
        SimpleNamespace(name=f"{src}-{kind}", source=src, schedule=sched)
        for src in ("a", "b")
        for kind, sched in (("cosine", "cosine-final0.1"), ("wsd", "wsd-linear-0.2"))
    ]
    held = accuracy.HOLD_OUT[hold_out].key(runs[0])
    assert {r.name for r in runs if accuracy._unseen(r, held, hold_out)} == trained_on


@pytest.mark.parametrize(
    ("results", "flags", "hold_out"),
    [
        ("accuracy.md", "", "source"),
        (
            "accuracy_unseen_family.md",
            " --hold-out source-and-family --laws multi-power",
            "source-and-family",
        ),
    ],
)
def test_committed_results_open_with_the_header_the_script_writes(
    accuracy, results, flags, hold_out
):
    text = (Path(accuracy.__file__).parent / results).read_text()
    seconds = float(re.search(r"Wall time (\d+) s\.", text).group(1))
    assert text.startswith(accuracy.header(flags, hold_out, seconds) + "\n\n## ")


def _synthetic_wsd_run(final_shift: float = 0.0) -> SimpleNamespace:
    """A WSD run that follows the Multi-Power Law exactly, with a cooldown that removes far
    more than the priors expect; ``final_shift`` moves its recorded final loss (a share)."""
    theta = np.array([2.5, 3.78, 0.47, -0.3, -5.0, 0.7, 0.8])
    lr = 1e-3 * np.r_[np.linspace(0.01, 1.0, 500), np.ones(7500), np.linspace(1.0, 0.01, 2000)]
    steps = np.arange(510, len(lr), 10)
    loss = MultiPowerLaw().predict(theta, LawInputs.at(Schedule(lr), steps))
    return SimpleNamespace(
        steps=steps,
        loss=loss,
        lr_schedule=lr,
        final_step=int(steps[-1]),
        final_loss=float(loss[-1]) * (1.0 + final_shift),
        source="synthetic",
    )


def test_hindsight_fits_the_whole_curve_and_scores_the_recorded_final_loss(accuracy):
    """On a run that follows the law, the whole-curve fit ends on it; a final loss recorded
    1% high (noise in that one point) shows as a 1% miss, which no fit of the curve removes."""

    def hindsight(run: SimpleNamespace) -> float:
        return accuracy.hindsight_error(run, accuracy.whole_curve_fit(run))

    assert abs(hindsight(_synthetic_wsd_run())) < 5e-4
    assert hindsight(_synthetic_wsd_run(0.01)) == pytest.approx(-1 / 101, abs=5e-4)


def test_the_oracle_knows_the_drop_a_planned_cooldown_will_bring(accuracy):
    """A WSD run whose cooldown removes far more than the priors expect: halfway, before it
    starts, a forecaster cannot know; the oracle, pinned at the whole-curve fit, does."""
    run = _synthetic_wsd_run()
    schedule = Schedule(run.lr_schedule)
    priors = Priors.default()
    pinned = accuracy.oracle_priors(priors, run, accuracy.whole_curve_fit(run))
    assert all(
        pinned.laws["multi-power"].std[p] == accuracy.ORACLE_STD for p in accuracy.ORACLE_PINNED
    )
    base = dict(run="synthetic", source="synthetic", family="wsd")

    def error_at_half(p: Priors) -> float:
        rows = accuracy._forecast_rows(run, schedule, "multi-power", p, base, "method")
        return abs(next(r["error"] for r in rows if r["cutoff"] == 0.5))

    assert error_at_half(pinned) < 0.002 < error_at_half(priors)
