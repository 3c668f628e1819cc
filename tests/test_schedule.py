"""Schedule features (S1, S2, the Multi-Power-Law LD term) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lossforecast import MultiPowerLaw, Schedule
from lossforecast._laws import LawInputs
from lossforecast._schedule import annealing_area

EXACT = 10**6  # max_groups large enough that every LR change is its own group ...


def _exact(lr: np.ndarray) -> Schedule:
    """... unless a change is below 1/EXACT of the total change (such are merged): the
    properties that compare with a per-step reference skip those schedules."""
    sched = Schedule(lr, max_groups=EXACT)
    rel = lr / lr.max()
    peak = int(np.argmax(lr))
    assume(len(sched.decrements) == np.count_nonzero(np.diff(rel[peak:])))
    return sched


# ---------------------------------------------------------------------------- schedules
def _segment(kind: str, n: int, start: float, end: float) -> np.ndarray:
    t = np.arange(1, n + 1) / n
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + np.cos(np.pi * t))
    if kind == "exp" and start > 0:
        return start * (max(end, 1e-3 * start) / start) ** t
    return np.full(n, end)  # "step": jump to ``end`` and stay (a plateau when end == start)


@st.composite
def schedules(draw, max_len: int = 160) -> np.ndarray:
    """Warmup, then random plateaus, drops (sudden or smooth), rewarms and decays to zero."""
    peak = draw(st.floats(1e-5, 1.0))
    warm = draw(st.integers(0, 20))
    lr = [_segment("linear", warm, draw(st.floats(0.0, 0.5)) * peak, peak)] if warm else []
    lr.append(np.full(draw(st.integers(1, 20)), peak))
    level = peak
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["step", "linear", "cosine", "exp"]))
        n = draw(st.integers(1, 30))
        # mostly decays; sometimes a rewarm (up, but below the peak), a plateau, or zero
        target = draw(
            st.one_of(
                st.floats(0.0, 1.0).map(lambda f, lvl=level: f * lvl),
                st.floats(0.0, 1.0).map(lambda f, lvl=level: lvl + f * (peak - lvl)),
                st.just(level),
                st.just(0.0),
            )
        )
        lr.append(_segment(kind, n, level, target))
        level = float(lr[-1][-1])
    out = np.concatenate(lr)[:max_len]
    # a positive entry always exists (the plateau at the peak)
    return out


# ---------------------------------------------------------------------------- references
def _s1_reference(lr: np.ndarray) -> np.ndarray:
    rel = lr / lr.max()
    return np.array([sum(rel[: s + 1]) for s in range(len(lr))])  # O(T^2) on purpose


def _s2_reference(lr: np.ndarray, decay: float) -> np.ndarray:
    """Loop over steps: m_i = decay m_{i-1} + (lr_{i-1} - lr_i) after the peak; S2 = sum m."""
    rel = lr / lr.max()
    peak_step = int(np.argmax(lr))
    m, total, out = 0.0, 0.0, []
    for i in range(len(lr)):
        change = rel[i - 1] - rel[i] if i > peak_step else 0.0
        m = decay * m + change
        total += m
        out.append(total)
    return np.array(out)


def _ld_reference(lr: np.ndarray, c: float, beta: float, gamma: float) -> np.ndarray:
    """LD(t) = sum_{peak<k<=t} (lr_{k-1} - lr_k) G(lr_k^-gamma S_k(t)), G(x) = 1-(Cx+1)^-beta."""
    rel = lr / lr.max()
    peak_step = int(np.argmax(lr))
    out = []
    for t in range(len(lr)):
        total = 0.0
        for k in range(peak_step + 1, t + 1):
            drop = rel[k - 1] - rel[k]
            if drop == 0.0:
                continue
            area_k_to_t = sum(rel[k : t + 1])
            z = max(rel[k], 1e-12) ** -gamma * area_k_to_t
            total += drop * (1.0 - (c * z + 1.0) ** -beta)
        out.append(total)
    return np.array(out)


def _unit_annealing_term(law, theta: np.ndarray, x: LawInputs) -> np.ndarray:
    """The law's annealing term per unit amplitude, read off ``predict`` (linear in it)."""
    i = law.params.index("log_amp")
    one, two = theta.copy(), theta.copy()
    one[i], two[i] = 0.0, np.log(2.0)
    return law.predict(one, x) - law.predict(two, x)


def _scale(lr: np.ndarray) -> float:
    rel = lr / lr.max()
    return 1.0 + float(np.abs(np.diff(rel)).sum())


# ---------------------------------------------------------------------------- properties
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@SETTINGS
@given(schedules())
def test_area_matches_brute_force(lr):
    sched = Schedule(lr)
    np.testing.assert_allclose(sched.area, _s1_reference(lr), rtol=1e-12, atol=1e-9)
    assert sched.total_steps == len(lr)
    assert sched.peak_lr == lr.max()
    assert sched.warmup_steps == int(np.argmax(lr))


@SETTINGS
@given(schedules(), st.floats(0.5, 0.999))
def test_annealing_area_exact_groups_matches_loop(lr, decay):
    sched = _exact(lr)
    steps = np.arange(len(lr))
    got = annealing_area(sched, steps, decay)
    ref = _s2_reference(lr, decay)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * _scale(lr) / (1 - decay))


@SETTINGS
@given(schedules(max_len=400), st.floats(0.9, 0.999))
def test_annealing_area_default_grouping_is_close(lr, decay):
    ref = _s2_reference(lr, decay)
    got = annealing_area(Schedule(lr), np.arange(len(lr)), decay)
    # grouping moves each change by less than a group's span; bounded by the total change
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3 * _scale(lr) / (1 - decay))


@SETTINGS
@given(
    schedules(max_len=80),
    st.floats(np.log(1e-3), np.log(5.0)),
    st.floats(0.1, 3.0),
    st.floats(0.0, 1.2),
)
def test_multi_power_ld_term_matches_per_step_sum(lr, log_c, beta, gamma):
    law = MultiPowerLaw()
    theta = np.array([2.0, 0.5, 0.4, 0.0, log_c, beta, gamma])
    steps = np.arange(len(lr))
    x = LawInputs.at(_exact(lr), steps)
    got = _unit_annealing_term(law, theta, x)
    ref = _ld_reference(lr, np.exp(log_c), beta, gamma)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10 * _scale(lr))


def test_wsd_example_by_hand():
    lr = np.array([0.5, 1.0, 1.0, 1.0, 0.5, 0.0])
    sched = Schedule(lr, max_groups=EXACT)
    assert sched.area.tolist() == [0.5, 1.5, 2.5, 3.5, 4.0, 4.0]
    # m = [0, 0, 0, 0, .5, .5*d + .5]
    d = 0.9
    np.testing.assert_allclose(annealing_area(sched, [3, 4, 5], d), [0.0, 0.5, 0.5 + 0.5 * d + 0.5])


def test_lr_area_is_in_the_optimizers_units():
    # relative area times the peak: the LR summed over steps 0..s, whatever the peak
    for peak in (1.0, 3e-4):
        sched = Schedule(peak * np.array([0.5, 1.0, 1.0, 1.0, 0.5, 0.0]))
        assert [sched.lr_area(s) for s in (0, 3, 5)] == pytest.approx(
            [0.5 * peak, 3.5 * peak, 4.0 * peak]
        )


def test_warmup_decrease_is_not_annealing():
    lr = np.array([0.3, 0.2, 0.6, 1.0, 1.0])  # dips during warmup, before the peak
    sched = Schedule(lr, max_groups=EXACT)
    assert len(sched.decrements) == 0
    assert annealing_area(sched, [4], 0.9).tolist() == [0.0]


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("lr", "match"),
    [
        ([], "empty"),
        ([1.0, float("nan"), 1.0], "NaN or infinite entry at step 1"),
        ([1.0, float("inf")], "NaN or infinite entry at step 1"),
        ([1.0, -0.1], "negative entry at step 1"),
        ([[1.0, 1.0], [1.0, 1.0]], "one-dimensional"),
        ([0.0, 0.0, 0.0], "no positive entry"),
        (["a", "b"], "sequence of numbers"),
    ],
)
def test_bad_schedule_raises(lr, match):
    with pytest.raises(ValueError, match=match):
        Schedule(lr)


def test_bad_max_groups_raises():
    with pytest.raises(ValueError, match="`max_groups` must be a positive int, got 0"):
        Schedule([1.0, 0.5], max_groups=0)


@pytest.mark.parametrize(
    ("steps", "match"), [([5], "outside the planned schedule"), ([-1], "outside"), ([1.5], "whole")]
)
def test_check_steps_rejects(steps, match):
    with pytest.raises(ValueError, match=match):
        Schedule([1.0, 1.0, 0.5]).check_steps(steps)
