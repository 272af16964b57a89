"""The circuit breaker as a pure policy: when it opens, how long it stays open, how it probes,
what it reports. All time is given explicitly (monotonic seconds); nothing sleeps."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolwarden.errors import ConfigurationError
from poolwarden.protect.breaker import BreakerConfig, BreakerState, CircuitBreaker, Transition

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
NO_JITTER = BreakerConfig(jitter=0.0)


def recording(
    config: BreakerConfig = NO_JITTER,
) -> tuple[CircuitBreaker, list[Transition]]:
    seen: list[Transition] = []
    return CircuitBreaker(config, on_transition=seen.append), seen


def fail(breaker: CircuitBreaker, times: int, now: float) -> None:
    for _ in range(times):
        breaker.record_failure(now)


def opened_at(now: float, config: BreakerConfig = NO_JITTER) -> CircuitBreaker:
    breaker = CircuitBreaker(config)
    fail(breaker, config.consecutive_failures, now)
    assert breaker.state is OPEN
    return breaker


# ---------------------------------------------------------------- closed


def test_a_closed_breaker_allows_every_call_and_asks_no_wait() -> None:
    breaker, seen = recording()
    for i in range(100):
        assert breaker.allow(float(i))
        breaker.record_success(float(i))
    assert breaker.state is CLOSED
    assert breaker.retry_after(100.0) == 0.0
    assert seen == []


def test_a_run_of_consecutive_failures_opens_it() -> None:
    breaker, seen = recording()
    fail(breaker, 4, 1.0)
    assert breaker.state is CLOSED
    breaker.record_failure(1.5)
    assert breaker.state is OPEN
    assert seen == [Transition(CLOSED, OPEN, "consecutive_failures", 1.5)]


def test_a_success_ends_the_failure_run() -> None:
    breaker = CircuitBreaker(BreakerConfig(jitter=0.0, min_calls=1000))  # no rate rule
    for _ in range(10):
        fail(breaker, 4, 1.0)
        breaker.record_success(1.0)
    assert breaker.state is CLOSED


def test_the_failure_rate_over_the_window_opens_it_once_min_calls_were_seen() -> None:
    # Alternating outcomes never make a run, but half of the calls fail.
    breaker, seen = recording(BreakerConfig(jitter=0.0, min_calls=20, failure_rate=0.5))
    for i in range(9):
        breaker.record_success(float(i) / 10)
        breaker.record_failure(float(i) / 10)
    breaker.record_success(0.95)
    assert breaker.state is CLOSED  # 19 calls: too few to judge a rate
    breaker.record_failure(0.98)  # the 20th call, the 10th failure
    assert breaker.state is OPEN
    assert seen == [Transition(CLOSED, OPEN, "failure_rate", 0.98)]


def test_a_failure_rate_below_the_threshold_keeps_it_closed() -> None:
    breaker = CircuitBreaker(BreakerConfig(jitter=0.0, min_calls=20, failure_rate=0.5))
    for i in range(300):
        now = i / 100
        breaker.record_failure(now)
        breaker.record_success(now)
        breaker.record_success(now)  # one failure in three
    assert breaker.state is CLOSED


def test_failures_older_than_the_window_no_longer_count() -> None:
    config = BreakerConfig(jitter=0.0, consecutive_failures=100, min_calls=10, window_s=10.0)
    recent, stale = CircuitBreaker(config), CircuitBreaker(config)
    for breaker in (recent, stale):
        fail(breaker, 9, 0.0)
    recent.record_failure(9.5)  # the 10th call while the first nine are still in the window
    stale.record_failure(10.5)  # the first nine slid out: one call, one failure, too few
    assert recent.state is OPEN
    assert stale.state is CLOSED


def test_the_window_slides_bucket_by_bucket() -> None:
    config = BreakerConfig(jitter=0.0, consecutive_failures=100, min_calls=4, window_s=10.0,
                           failure_rate=0.5)
    breaker = CircuitBreaker(config)
    breaker.record_failure(0.0)
    breaker.record_failure(5.0)
    breaker.record_success(10.2)  # the failure at 0.0 has slid out; the one at 5.0 remains
    breaker.record_success(10.3)
    assert breaker.state is CLOSED  # 1 failure in 3 calls
    breaker.record_failure(10.4)  # 2 in 4: half
    assert breaker.state is OPEN


# ---------------------------------------------------------------- open


def test_an_open_breaker_refuses_until_its_period_is_over() -> None:
    breaker, seen = recording()
    fail(breaker, 5, 10.0)
    assert not breaker.allow(10.0)
    assert breaker.retry_after(10.0) == pytest.approx(2.0)
    assert not breaker.allow(11.5)
    assert breaker.retry_after(11.5) == pytest.approx(0.5)
    assert breaker.retry_after(12.0) == 0.0
    assert breaker.allow(12.0)  # the probe
    assert breaker.state is HALF_OPEN
    assert seen[-1] == Transition(OPEN, HALF_OPEN, "open_period_over", 12.0)


def test_outcomes_reported_while_open_change_nothing() -> None:
    breaker, seen = recording()
    fail(breaker, 5, 0.0)
    breaker.record_success(0.5)  # calls let through before it opened, ending now
    breaker.record_failure(0.6)
    breaker.record_abandoned(0.7)
    assert breaker.state is OPEN
    assert breaker.retry_after(1.0) == pytest.approx(1.0)
    assert len(seen) == 1


def test_jitter_shortens_the_open_period_by_at_most_its_fraction() -> None:
    config = BreakerConfig(jitter=0.2, open_s=2.0)
    for draw, expected in ((0.0, 2.0), (0.5, 1.8), (0.999999, 1.6)):
        breaker = CircuitBreaker(config, rand=functools.partial(float, draw))
        fail(breaker, 5, 0.0)
        assert breaker.retry_after(0.0) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- half open


def test_half_open_lets_only_the_configured_number_of_probes_through() -> None:
    breaker = opened_at(0.0, BreakerConfig(jitter=0.0, half_open_probes=2))
    assert breaker.allow(2.0)
    assert breaker.allow(2.0)
    assert not breaker.allow(2.0)
    assert breaker.retry_after(2.0) == pytest.approx(2.0)  # open_s: the probes decide
    assert breaker.state is HALF_OPEN


def test_an_abandoned_probe_frees_its_slot() -> None:
    breaker = opened_at(0.0)
    assert breaker.allow(2.0)
    assert not breaker.allow(2.1)
    breaker.record_abandoned(2.2)
    assert breaker.retry_after(2.3) == 0.0
    assert breaker.allow(2.3)
    assert breaker.state is HALF_OPEN


def test_a_successful_probe_closes_it_and_starts_afresh() -> None:
    breaker, seen = recording()
    fail(breaker, 5, 0.0)
    assert breaker.allow(2.0)
    breaker.record_success(2.05)
    assert breaker.state is CLOSED
    assert seen[-1] == Transition(HALF_OPEN, CLOSED, "probe_succeeded", 2.05)
    fail(breaker, 4, 3.0)  # the window and the run were emptied: no carry-over
    assert breaker.state is CLOSED
    breaker.record_failure(3.0)
    assert breaker.retry_after(3.0) == pytest.approx(2.0)  # the first period again


def test_failed_probes_double_the_open_period_up_to_the_maximum() -> None:
    breaker, seen = recording(BreakerConfig(jitter=0.0, open_s=2.0, max_open_s=30.0))
    now = 0.0
    fail(breaker, 5, now)
    periods = []
    for _ in range(6):
        now += breaker.retry_after(now)
        assert breaker.allow(now)
        breaker.record_failure(now)
        periods.append(breaker.retry_after(now))
    assert periods == pytest.approx([4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
    assert [t.reason for t in seen[-2:]] == ["open_period_over", "probe_failed"]


def test_a_successful_probe_after_failed_ones_resets_the_period() -> None:
    breaker = opened_at(0.0)
    for now in (2.0, 6.0):  # two failed probes: periods 4 then 8
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert breaker.allow(14.0)
    breaker.record_success(14.0)
    fail(breaker, 5, 20.0)
    assert breaker.retry_after(20.0) == pytest.approx(2.0)


# ---------------------------------------------------------------- reset and reporting


def test_reset_closes_it_and_reports_only_a_real_change() -> None:
    breaker, seen = recording()
    breaker.reset()
    assert seen == []
    fail(breaker, 5, 7.0)
    breaker.reset(8.0)
    assert breaker.state is CLOSED
    assert breaker.allow(8.0)
    assert seen[-1] == Transition(OPEN, CLOSED, "reset", 8.0)
    fail(breaker, 5, 9.0)
    breaker.reset()  # no time given: the latest time the breaker saw
    assert seen[-1] == Transition(OPEN, CLOSED, "reset", 9.0)


def test_repr_shows_the_state_and_counts() -> None:
    breaker = CircuitBreaker(NO_JITTER)
    breaker.record_failure(0.0)
    breaker.record_success(0.0)
    text = repr(breaker)
    assert "closed" in text
    assert "window=1/2" in text


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BreakerConfig(consecutive_failures=0, failure_rate=1.5, window_s=0.0, min_calls=0,
                      open_s=-1.0, max_open_s=float("nan"), half_open_probes=0, jitter=1.0)
    variables = {p.variable for p in caught.value.problems}
    assert variables == {
        "breaker.consecutive_failures", "breaker.failure_rate", "breaker.window_s",
        "breaker.min_calls", "breaker.open_s", "breaker.max_open_s",
        "breaker.half_open_probes", "breaker.jitter",
    }


def test_config_rejects_a_maximum_below_the_first_period() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BreakerConfig(open_s=10.0, max_open_s=5.0)
    assert [p.variable for p in caught.value.problems] == ["breaker.max_open_s"]
    assert "5.0" in str(caught.value)


def test_the_default_config_is_valid() -> None:
    assert CircuitBreaker().state is CLOSED


# ---------------------------------------------------------------- properties

OPS = st.lists(
    st.tuples(st.sampled_from(["allow", "success", "failure", "abandoned", "reset"]),
              st.floats(0.0, 5.0)),
    max_size=200,
)
REASONS = {"consecutive_failures", "failure_rate", "probe_failed", "probe_succeeded",
           "open_period_over", "reset"}


@settings(max_examples=300, deadline=None)
@given(ops=OPS, probes=st.integers(1, 3), run=st.integers(1, 6), draw=st.floats(0.0, 0.999))
def test_any_sequence_keeps_state_transitions_and_retry_after_consistent(
    ops: list[tuple[str, float]], probes: int, run: int, draw: float,
) -> None:
    config = BreakerConfig(consecutive_failures=run, half_open_probes=probes, min_calls=3,
                           window_s=2.0, open_s=0.5, max_open_s=4.0)
    seen: list[Transition] = []
    breaker = CircuitBreaker(config, on_transition=seen.append, rand=lambda: draw)
    now = 0.0
    for op, step in ops:
        now += step
        wait = breaker.retry_after(now)
        assert 0.0 <= wait <= config.max_open_s
        if op == "allow":
            assert breaker.allow(now) == (wait == 0.0)
        elif op == "success":
            breaker.record_success(now)
        elif op == "failure":
            breaker.record_failure(now)
        elif op == "abandoned":
            breaker.record_abandoned(now)
        else:
            breaker.reset(now)
    state = CLOSED
    for transition in seen:
        assert transition.old is state
        assert transition.new is not transition.old
        assert transition.reason in REASONS
        state = transition.new
    assert breaker.state is state


@given(outcomes=st.lists(st.booleans(), max_size=300), run=st.integers(1, 8))
def test_with_the_rate_rule_out_of_reach_it_opens_exactly_when_the_run_is_long_enough(
    outcomes: list[bool], run: int,
) -> None:
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=run, min_calls=10_000))
    current = 0
    for i, ok in enumerate(outcomes):
        now = i * 0.01
        if ok:
            breaker.record_success(now)
            current = 0
        else:
            breaker.record_failure(now)
            current += 1
        assert (breaker.state is OPEN) == (current >= run)
        if current >= run:
            return
