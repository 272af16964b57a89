"""Admission control of the wait queue as a pure policy: each rule, properties over arbitrary
inputs, and a simulated overload (500 callers on a pool of 10) where it must keep the served
fast and the pool busy. All time is simulated."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolwarden.errors import ConfigurationError
from poolwarden.protect.admission import APPOINTMENT_SPACING, Admission, AdmissionConfig
from sim_helpers import run_overload

SERVERS = 10  # hold 10 ms (the prior) over 10 connections: one connection use = 1 ms


def recording(
    config: AdmissionConfig | None = None,
) -> tuple[Admission, list[tuple[bool, float]]]:
    changes: list[tuple[bool, float]] = []
    admission = Admission(config or AdmissionConfig(),
                          on_change=lambda on, delay: changes.append((on, delay)))
    return admission, changes


def overloaded(config: AdmissionConfig | None = None) -> Admission:
    """An admission that entered overload at t=0.1 (delays of 10 ms since t=0)."""
    admission = Admission(config or AdmissionConfig())
    admission.on_served(0.010, 0.0)
    admission.on_served(0.010, 0.1)
    assert admission.overloaded
    return admission


# ---------------------------------------------------------------- hold time and expected wait


def test_the_expected_wait_is_the_position_times_the_hold_over_the_servers() -> None:
    admission = Admission()
    assert admission.hold_s == 0.01  # the prior
    assert admission.expected_wait(0, SERVERS) == pytest.approx(0.001)
    assert admission.expected_wait(9, SERVERS) == pytest.approx(0.010)
    assert admission.expected_wait(9, 1) == pytest.approx(0.100)
    assert admission.expected_wait(9, 0) == admission.expected_wait(9, 1)  # no servers: one


def test_the_first_hold_sample_replaces_the_prior_and_later_ones_move_an_ewma() -> None:
    admission = Admission(AdmissionConfig(hold_alpha=0.1))
    admission.on_hold(0.020)
    assert admission.hold_s == pytest.approx(0.020)
    admission.on_hold(0.030)
    assert admission.hold_s == pytest.approx(0.021)
    for bad in (math.nan, math.inf, -0.5):
        admission.on_hold(bad)
    assert admission.hold_s == pytest.approx(0.021)


# ---------------------------------------------------------------- the budget rule


def test_a_caller_is_admitted_when_its_expected_wait_fits_its_budget() -> None:
    admission = Admission()
    assert admission.admit(999, SERVERS, 1.0, 0.0) is None  # 1000 x 1 ms = its whole budget


def test_a_caller_that_would_time_out_in_the_queue_is_refused_at_once() -> None:
    admission, changes = recording()
    retry = admission.admit(1999, SERVERS, 1.0, 0.0)  # would wait 2 s with a 1 s budget
    assert retry == pytest.approx(2.0 - 0.5)  # back when the wait is half its budget
    assert not admission.overloaded
    assert changes == []


def test_a_caller_with_no_budget_left_is_refused_with_a_positive_retry_after() -> None:
    admission = Admission()
    retry = admission.admit(0, SERVERS, 0.0, 0.0)
    assert retry is not None
    assert retry >= AdmissionConfig().min_retry_after_s


# ---------------------------------------------------------------- overload detection (CoDel)


def test_a_delay_above_target_for_a_whole_interval_enters_overload() -> None:
    admission, changes = recording()
    admission.on_served(0.006, 0.00)
    admission.on_served(0.010, 0.05)
    assert not admission.overloaded  # above target, but not for an interval yet
    admission.on_served(0.012, 0.10)
    assert admission.overloaded
    assert changes == [(True, 0.012)]
    admission.on_served(0.012, 0.20)
    assert changes == [(True, 0.012)]  # no change, no report


def test_a_burst_that_drains_within_the_interval_is_not_overload() -> None:
    admission = Admission()
    admission.on_served(0.010, 0.00)
    admission.on_served(0.002, 0.05)  # under target: the standing queue is gone
    admission.on_served(0.010, 0.11)
    admission.on_served(0.010, 0.15)
    assert not admission.overloaded  # the interval restarted at 0.11
    admission.on_served(0.010, 0.22)
    assert admission.overloaded


def test_a_delay_under_target_ends_overload() -> None:
    admission, changes = recording()
    admission.on_served(0.010, 0.0)
    admission.on_served(0.010, 0.1)
    admission.on_served(0.001, 0.2)
    assert not admission.overloaded
    assert changes == [(True, 0.010), (False, 0.001)]


def test_a_queue_that_stays_dry_for_an_interval_ends_overload() -> None:
    """While overloaded, one moment of empty queue is not the end (refused callers come
    back at their appointments); a queue that stays dry for interval_s is."""
    admission, changes = recording()
    admission.on_served(0.010, 0.0)
    admission.on_served(0.010, 0.1)
    assert admission.overloaded
    admission.on_queue_empty(0.15)
    assert admission.overloaded  # a gap
    admission.on_served(0.010, 0.16)  # a late waiter again: the dry spell is over
    admission.on_queue_empty(0.2)
    admission.on_queue_empty(0.29)
    assert admission.overloaded  # dry for 90 ms only
    admission.on_queue_empty(0.31)
    assert not admission.overloaded
    assert changes == [(True, 0.010), (False, 0.0)]


def test_outside_overload_an_empty_queue_restarts_the_interval() -> None:
    admission, changes = recording()
    admission.on_served(0.010, 0.0)
    admission.on_queue_empty(0.05)
    admission.on_served(0.010, 0.11)  # would have entered overload without the empty queue
    assert not admission.overloaded
    admission.on_queue_empty(0.3)
    assert changes == []


def test_a_fast_serve_ends_overload_at_once() -> None:
    admission, changes = recording()
    admission.on_served(0.010, 0.0)
    admission.on_served(0.010, 0.1)
    admission.on_served(0.001, 0.12)
    assert not admission.overloaded
    assert changes == [(True, 0.010), (False, 0.001)]


# ---------------------------------------------------------------- admission while overloaded


def test_while_overloaded_a_wait_over_overload_wait_is_refused_whatever_the_budget() -> None:
    admission = overloaded()
    assert admission.admit(60, SERVERS, 10.0, 0.2) is not None  # 61 ms
    assert admission.admit(20, SERVERS, 10.0, 0.2) is None  # 21 ms: under the standing level


def test_while_overloaded_the_queue_is_kept_at_its_standing_level() -> None:
    admission = overloaded()  # standing level: half of 50 ms
    assert admission.admit(24, SERVERS, 1.0, 0.2) is None  # 25 ms
    assert admission.admit(25, SERVERS, 1.0, 0.2) is not None  # 26 ms, no appointment due


def test_appointments_start_when_the_queue_will_be_at_its_standing_level() -> None:
    admission = overloaded()
    now = 0.2
    retries = [admission.admit(100, SERVERS, 1.0, now) for _ in range(6)]
    assert retries[0] == pytest.approx(0.101 - 0.025)  # 101 ms now; standing level 25 ms
    times = [retry for retry in retries if retry is not None]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps == pytest.approx([0.001 * APPOINTMENT_SPACING] * 5)


def test_an_appointment_that_has_come_admits_one_caller_past_the_standing_level() -> None:
    admission = overloaded()
    retry = admission.admit(100, SERVERS, 1.0, 0.2)
    assert retry is not None
    back = 0.2 + retry
    assert admission.admit(35, SERVERS, 1.0, back - 0.001) is not None  # too early
    assert admission.admit(35, SERVERS, 1.0, back) is None  # its appointment: 36 ms is fine
    assert admission.admit(35, SERVERS, 1.0, back) is not None  # the ticket was taken


def test_an_appointment_still_caps_the_wait_at_overload_wait() -> None:
    admission = overloaded()
    retry = admission.admit(100, SERVERS, 1.0, 0.2)
    assert retry is not None
    assert admission.admit(55, SERVERS, 1.0, 0.2 + retry) is not None  # 56 ms


def test_an_appointment_missed_by_more_than_overload_wait_lapses() -> None:
    admission = overloaded()
    retry = admission.admit(100, SERVERS, 1.0, 0.2)
    assert retry is not None
    assert admission.admit(35, SERVERS, 1.0, 0.2 + retry + 0.051) is not None


def test_a_caller_under_the_standing_level_uses_up_an_appointment_that_has_come() -> None:
    admission = overloaded()
    retry = admission.admit(100, SERVERS, 1.0, 0.2)
    assert retry is not None
    back = 0.2 + retry
    assert admission.admit(5, SERVERS, 1.0, back) is None  # admitted, and took the ticket
    assert admission.admit(35, SERVERS, 1.0, back) is not None


# ---------------------------------------------------------------- retry_after and max_wait


def test_retry_after_is_the_time_to_drain_to_the_standing_level_clamped() -> None:
    config = AdmissionConfig(min_retry_after_s=0.002, max_retry_after_s=5.0)
    admission = Admission(config)
    assert admission.retry_after(0, SERVERS) == 0.002
    assert admission.retry_after(100, SERVERS) == pytest.approx(0.101 - 0.025)
    assert admission.retry_after(10**7, SERVERS) == 5.0
    admission.retry_after(100, SERVERS)
    assert admission.retry_after(100, SERVERS) == pytest.approx(0.076)  # books nothing


def test_max_wait_is_the_budget_and_sheds_stale_waiters_while_overloaded() -> None:
    admission = Admission()
    assert admission.max_wait(1.0) == 1.0
    assert admission.max_wait(0.02) == 0.02
    busy = overloaded()
    assert busy.max_wait(1.0) == pytest.approx(0.1)  # max(interval, 2 x overload_wait)
    assert busy.max_wait(0.02) == 0.02
    long_waits = overloaded(AdmissionConfig(overload_wait_s=0.2))
    assert long_waits.max_wait(1.0) == pytest.approx(0.4)


# ---------------------------------------------------------------- configuration, repr


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        AdmissionConfig(target_s=0.0, interval_s=-1.0, overload_wait_s=math.nan,
                        hold_alpha=0.0, hold_prior_s=-0.01, min_retry_after_s=math.inf,
                        max_retry_after_s=0.0)
    variables = {p.variable for p in caught.value.problems}
    assert variables == {
        "admission.target_s", "admission.interval_s", "admission.overload_wait_s",
        "admission.hold_alpha", "admission.hold_prior_s", "admission.min_retry_after_s",
        "admission.max_retry_after_s",
    }


def test_config_rejects_inconsistent_pairs() -> None:
    with pytest.raises(ConfigurationError) as caught:
        AdmissionConfig(target_s=0.05, overload_wait_s=0.05, min_retry_after_s=2.0,
                        max_retry_after_s=1.0)
    assert [p.variable for p in caught.value.problems] == [
        "admission.overload_wait_s", "admission.max_retry_after_s"]


def test_repr_shows_the_mode_and_hold_time() -> None:
    assert repr(Admission()) == "<Admission normal hold=10ms>"
    assert "overloaded" in repr(overloaded())


# ---------------------------------------------------------------- properties

BUDGETS = st.one_of(st.floats(-1.0, 100.0), st.sampled_from([math.nan, math.inf, 0.0]))


@settings(max_examples=300, deadline=None)
@given(
    calls=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 1000), BUDGETS,
                             st.floats(0.0, 1.0)), max_size=50),
    holds=st.lists(st.one_of(st.floats(0.0, 10.0), st.just(math.nan)), max_size=5),
    busy=st.booleans(),
)
def test_a_refusal_always_carries_a_finite_retry_after_within_bounds(
    calls: list[tuple[int, int, float, float]], holds: list[float], busy: bool,
) -> None:
    config = AdmissionConfig()
    admission = overloaded(config) if busy else Admission(config)
    for hold in holds:
        admission.on_hold(hold)
    now = 1.0
    for ahead, servers, budget, step in calls:
        now += step
        retry = admission.admit(ahead, servers, budget, now)
        if retry is not None:
            assert config.min_retry_after_s <= retry <= config.max_retry_after_s
        public = admission.retry_after(ahead, servers)
        assert config.min_retry_after_s <= public <= config.max_retry_after_s


@given(hold=st.floats(0.0, 100.0), servers=st.integers(-1, 10_000),
       ahead=st.integers(-5, 10**6))
def test_the_expected_wait_grows_with_the_queue_ahead(
    hold: float, servers: int, ahead: int,
) -> None:
    admission = Admission()
    admission.on_hold(hold)
    assert 0.0 <= admission.expected_wait(ahead, servers) <= admission.expected_wait(
        ahead + 1, servers)


@given(hold=st.floats(0.0, 1.0), servers=st.integers(1, 1000), ahead=st.integers(0, 100),
       now=st.floats(0.0, 1e6))
def test_without_overload_a_small_queue_and_a_big_budget_are_always_admitted(
    hold: float, servers: int, ahead: int, now: float,
) -> None:
    admission = Admission()
    admission.on_hold(hold)
    assert admission.admit(ahead, servers, 1000.0, now) is None


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0.0, 0.05), st.one_of(st.none(),
                                                                 st.floats(0.0, 0.03))),
                       max_size=200))
def test_overload_is_entered_only_after_a_full_interval_of_delays_over_target(
    events: list[tuple[float, float | None]],
) -> None:
    """``None`` is a release that found the queue empty; a number, a waiter's delay.
    Overload starts only after a full interval of delays over target; it ends at a delay
    under target, or when the queue has stayed dry (no delay seen) for an interval."""
    config = AdmissionConfig()
    admission, changes = recording(config)
    now = 0.0
    above_since: float | None = None  # when the current run of delays over target began
    dry_since: float | None = None  # overloaded, and the queue ran dry then
    for step, sojourn in events:
        now += step
        was = admission.overloaded
        if sojourn is None:
            admission.on_queue_empty(now)
            above_since = None
            ends = False
            if was:
                if dry_since is None:
                    dry_since = now
                elif now - dry_since >= config.interval_s:
                    ends, dry_since = True, None
            assert admission.overloaded == (was and not ends)
        else:
            admission.on_served(sojourn, now)
            dry_since = None
            if sojourn < config.target_s:
                above_since = None
                assert not admission.overloaded
            elif above_since is None:
                above_since = now
        if admission.overloaded and not was:
            assert above_since is not None
            assert now - above_since >= config.interval_s - 1e-9
    assert [on for on, _ in changes] == [i % 2 == 0 for i in range(len(changes))]


# ---------------------------------------------------------------- simulated overload


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_under_sustained_overload_the_served_are_fast_and_the_pool_stays_busy(
    seed: int,
) -> None:
    """500 callers with a 1 s budget on a pool of 10 holding 10 ms ±30% (capacity about
    1000/s, half the demand): after a 2 s warm-up, 20 s measured."""
    result = run_overload(Admission(), rng=random.Random(seed))
    assert result.goodput >= 0.97
    assert result.served >= 0.97 * 1000 * result.measured_s
    assert result.median_wait <= 0.040
    assert result.served_late == 0
    assert result.timed_out <= 0.001 * result.served
    assert statistics.quantiles(result.waits, n=100)[98] <= 0.050  # p99 within overload_wait
    assert result.refusals >= 0.9 * result.served  # the excess was refused, not queued
    assert result.failed <= 0.01 * result.served  # nearly every refused request came back


def test_a_plain_fifo_queue_makes_everyone_wait_about_half_a_second() -> None:
    """The baseline the policy is for: the same workload with everyone admitted."""
    result = run_overload(None, duration_s=5.0, rng=random.Random(1))
    assert result.goodput >= 0.97  # as busy...
    assert result.median_wait >= 0.4  # ...but every request waits for 490 others


@pytest.mark.parametrize(
    ("servers", "callers", "jitter"), [(10, 500, 0.9), (50, 2000, 0.3), (10, 5000, 0.3)],
)
def test_overload_handling_holds_for_other_shapes_of_overload(
    servers: int, callers: int, jitter: float,
) -> None:
    result = run_overload(Admission(), servers=servers, callers=callers, jitter=jitter,
                          duration_s=10.0, rng=random.Random(4))
    assert result.goodput >= 0.97
    assert result.median_wait <= 0.040
    assert result.served_late == 0
    assert result.timed_out <= 0.005 * result.served


def test_without_overload_nobody_is_refused() -> None:
    result = run_overload(Admission(), callers=20, duration_s=5.0, rng=random.Random(5))
    assert result.refusals == 0
    assert result.median_wait <= 0.015  # 20 callers on 10 connections: one use ahead
