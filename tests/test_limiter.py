"""The adaptive concurrency limit as a pure policy: unit rules, properties over arbitrary
samples, and a simulated PostgreSQL server (processor sharing over its cores) on which the
limit must find the knee. All time is simulated."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolwarden.errors import ConfigurationError
from poolwarden.protect.limiter import AdaptiveLimit, LimiterConfig
from sim_helpers import run_processor_sharing

STEP = 0.02  # seconds between samples in the hand-fed tests: 10 samples close a window


def config(**overrides: Any) -> LimiterConfig:
    """The defaults, with probes of a known size (20 samples within 0.5 s) for hand-feeding."""
    return LimiterConfig(**{"probe_samples": 20, "probe_max_s": 0.5, **overrides})


def recording(config: LimiterConfig) -> tuple[AdaptiveLimit, list[tuple[int, int]]]:
    changes: list[tuple[int, int]] = []
    return AdaptiveLimit(config, on_change=lambda old, new: changes.append((old, new))), changes


def feed(limiter: AdaptiveLimit, latency: float, inflight: int, now: float,
         count: int) -> float:
    """``count`` samples, STEP apart from ``now``; returns the time after the last one."""
    for _ in range(count):
        limiter.on_sample(latency, inflight, now)
        now += STEP
    return now


def probed(tuned: LimiterConfig, no_load: float = 0.010) -> tuple[AdaptiveLimit, float]:
    """A limiter whose first probe measured ``no_load``; returns it and the time after."""
    limiter = AdaptiveLimit(tuned)
    now = feed(limiter, no_load, 1, 0.0, 1 + tuned.probe_samples)
    assert not limiter.probing
    assert limiter.no_load_latency_s == pytest.approx(no_load)
    return limiter, now


def window(limiter: AdaptiveLimit, latency: float, now: float,
           inflight: int | None = None) -> float:
    """One window of samples (at the current limit's concurrency unless told)."""
    return feed(limiter, latency, limiter.limit if inflight is None else inflight, now, 10)


# ---------------------------------------------------------------- probes


def test_the_first_sample_starts_a_probe_down_at_min_limit() -> None:
    limiter, changes = recording(config(initial=4))
    assert limiter.no_load_latency_s is None
    limiter.on_sample(0.03, 4, 0.0)
    assert limiter.probing
    assert limiter.limit == 1
    now = feed(limiter, 0.010, 1, STEP, 19)
    assert limiter.probing  # 19 samples: one short
    limiter.on_sample(0.012, 1, now)
    assert not limiter.probing
    assert limiter.limit == 4
    assert changes == [(4, 1), (1, 4)]
    assert limiter.no_load_latency_s == pytest.approx((19 * 0.010 + 0.012) / 20)


def test_a_probe_ignores_operations_that_started_under_the_old_concurrency() -> None:
    limiter = AdaptiveLimit(config(initial=6))
    limiter.on_sample(0.05, 6, 0.0)
    now = feed(limiter, 0.05, 6, STEP, 5)  # stragglers from before the probe
    now = feed(limiter, 0.010, 1, now, 20)
    assert not limiter.probing
    assert limiter.no_load_latency_s == pytest.approx(0.010)


def test_a_probe_without_samples_ends_after_probe_max_s_and_the_limit_holds() -> None:
    limiter, changes = recording(config(initial=4, probe_max_s=0.5))
    now = feed(limiter, 0.05, 4, 0.0, 26)  # 0.5 s of samples, none at low concurrency
    assert not limiter.probing
    assert limiter.limit == 4
    assert limiter.no_load_latency_s is None
    for _ in range(20):  # nothing to judge the latency against: no change
        now = window(limiter, 0.001, now)
    assert limiter.limit == 4
    assert changes == [(4, 1), (1, 4)]


def test_later_probes_halve_the_limit_and_average_the_no_load_latency() -> None:
    limiter, now = probed(config(initial=4, probe_interval_s=10.0), no_load=0.010)
    # Hold at 4: the queue is exactly beta (4 in flight, latency twice the no-load one).
    while now < 10.5:
        now = window(limiter, 0.020, now)
        if limiter.probing:
            break
    assert limiter.probing
    assert limiter.limit == 2
    feed(limiter, 0.014, 2, now, 20)
    assert not limiter.probing
    assert limiter.limit == 4
    assert limiter.no_load_latency_s == pytest.approx(0.012)  # halfway from 10 ms to 14 ms


# ---------------------------------------------------------------- the Vegas rule


def test_the_limit_grows_by_one_per_window_while_latency_stays_at_no_load() -> None:
    limiter, now = probed(config(initial=2, max_limit=10))
    seen = []
    for _ in range(5):
        now = window(limiter, 0.010, now)
        seen.append(limiter.limit)
    assert seen == [3, 4, 5, 6, 7]


def test_the_limit_grows_only_while_it_is_used() -> None:
    limiter, now = probed(config(initial=4))
    for _ in range(10):
        now = window(limiter, 0.010, now, inflight=2)  # two in flight: the limit is not the cap
    assert limiter.limit == 4


def test_a_queue_between_alpha_and_beta_holds_the_limit() -> None:
    limiter, now = probed(config(initial=4))
    for latency in (0.015, 0.020):  # queue = 4 * (1 - 10/15) = 1.33; 4 * (1 - 10/20) = 2
        now = window(limiter, latency, now)
        assert limiter.limit == 4


def test_a_queue_above_beta_shrinks_the_limit_by_one_near_the_target() -> None:
    limiter, now = probed(config(initial=4))
    window(limiter, 0.030, now)  # queue = 4 * (1 - 10/30) = 2.67
    assert limiter.limit == 3


def test_a_queue_far_above_beta_shrinks_the_limit_in_a_jump() -> None:
    limiter, now = probed(config(initial=10, max_limit=10))
    window(limiter, 0.060, now)  # queue = 10 * (1 - 10/60) = 8.3: three steps at once
    assert limiter.limit == 7


def test_the_thresholds_grow_with_big_limits_so_noise_is_not_a_queue() -> None:
    limiter, now = probed(config(initial=40, max_limit=50))
    now = window(limiter, 0.0108, now)  # 8% over no-load: queue 2.96, under 10% of 40
    assert limiter.limit == 41
    no_slack, later = probed(config(initial=40, max_limit=50, tolerance=0.0))
    window(no_slack, 0.0108, later)
    assert no_slack.limit == 39  # with fixed thresholds the same noise reads as a queue


def test_a_window_needs_both_its_duration_and_its_samples() -> None:
    limiter, now = probed(config(initial=2))
    feed(limiter, 0.010, 2, now, 9)  # 9 samples over 0.18 s: not enough samples
    assert limiter.limit == 2
    fast, now = probed(config(initial=2))
    for i in range(50):  # 50 samples within 0.05 s: not long enough
        fast.on_sample(0.010, 2, now + i * 0.001)
    assert fast.limit == 2
    fast.on_sample(0.010, 2, now + 0.1)
    assert fast.limit == 3


def test_invalid_latencies_are_ignored() -> None:
    limiter, now = probed(config(initial=2))
    for bad in (float("nan"), float("inf"), -0.01):
        now = feed(limiter, bad, 2, now, 20)
    assert limiter.limit == 2
    assert limiter.no_load_latency_s == pytest.approx(0.010)


# ---------------------------------------------------------------- drops


def test_a_drop_backs_off_multiplicatively_once_per_window() -> None:
    limiter, changes = recording(config(initial=8, max_limit=10))
    limiter.on_drop(1.0)
    assert limiter.limit == 6
    limiter.on_drop(1.05)  # the same burst of timeouts
    assert limiter.limit == 6
    limiter.on_drop(1.2)
    assert limiter.limit == 4
    for i in range(10):
        limiter.on_drop(2.0 + i)
    assert limiter.limit == 1
    assert changes == [(8, 6), (6, 4), (4, 3), (3, 2), (2, 1)]


def test_a_drop_during_a_probe_lowers_the_limit_it_returns_to() -> None:
    limiter = AdaptiveLimit(config(initial=8, max_limit=10))
    limiter.on_sample(0.02, 8, 0.0)
    assert limiter.probing
    limiter.on_drop(0.01)
    assert limiter.limit == 1  # still probing
    feed(limiter, 0.010, 1, 0.02, 20)
    assert limiter.limit == 6


# ---------------------------------------------------------------- configuration, repr


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        LimiterConfig(initial=20, min_limit=0, max_limit=10, alpha=-1.0, beta=-2.0,
                      tolerance=1.0, window_s=0.0, window_samples=0, probe_interval_s=-1.0,
                      probe_samples=0, probe_max_s=float("inf"), drop_ratio=1.0)
    variables = {p.variable for p in caught.value.problems}
    assert variables == {
        "limiter.initial", "limiter.min_limit", "limiter.alpha", "limiter.beta",
        "limiter.tolerance", "limiter.window_s", "limiter.window_samples",
        "limiter.probe_interval_s", "limiter.probe_samples", "limiter.probe_max_s",
        "limiter.drop_ratio",
    }


def test_config_rejects_max_below_min() -> None:
    with pytest.raises(ConfigurationError) as caught:
        LimiterConfig(initial=3, min_limit=3, max_limit=2)
    assert {p.variable for p in caught.value.problems} == {"limiter.max_limit",
                                                           "limiter.initial"}


def test_repr_shows_limit_and_no_load_latency() -> None:
    limiter = AdaptiveLimit(LimiterConfig())
    assert repr(limiter) == "<AdaptiveLimit limit=4 no_load=?>"
    limiter.on_sample(0.01, 4, 0.0)
    assert "probing" in repr(limiter)


# ---------------------------------------------------------------- properties

SAMPLE = st.tuples(
    st.sampled_from(["sample", "sample", "sample", "drop"]),
    st.one_of(st.floats(-0.1, 2.0), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.integers(-1, 40),
    st.floats(0.0, 0.3),
)


@st.composite
def configs(draw: st.DrawFn) -> LimiterConfig:
    low = draw(st.integers(1, 5))
    high = draw(st.integers(low, 30))
    return LimiterConfig(initial=draw(st.integers(low, high)), min_limit=low, max_limit=high,
                         window_samples=draw(st.integers(1, 10)),
                         probe_samples=draw(st.integers(1, 5)))


@settings(max_examples=300, deadline=None)
@given(config=configs(), ops=st.lists(SAMPLE, max_size=400))
def test_the_limit_never_leaves_its_bounds_whatever_the_samples(
    config: LimiterConfig, ops: list[tuple[str, float, int, float]],
) -> None:
    changes: list[tuple[int, int]] = []
    limiter = AdaptiveLimit(config, on_change=lambda old, new: changes.append((old, new)))
    now = 0.0
    previous = limiter.limit
    for kind, latency, inflight, step in ops:
        now += step
        if kind == "drop":
            limiter.on_drop(now)
        else:
            limiter.on_sample(latency, inflight, now)
        assert config.min_limit <= limiter.limit <= config.max_limit
        if limiter.limit != previous:
            assert changes[-1] == (previous, limiter.limit)
            previous = limiter.limit
    assert all(old != new for old, new in changes)


# ---------------------------------------------------------------- simulated servers


@pytest.mark.parametrize("service_s", [0.005, 0.010, 0.020])
@pytest.mark.parametrize("initial", [1, 4, 10])
def test_the_limit_settles_at_the_knee_of_a_two_core_server(
    service_s: float, initial: int,
) -> None:
    """CPU-bound queries on 2 cores: latency is flat up to 2 in flight, linear after. The
    limit must settle at 2-4 (not the pool's 10) and keep both cores busy."""
    limiter = AdaptiveLimit(LimiterConfig(initial=initial, max_limit=10))
    trace = run_processor_sharing(limiter, cores=2, service_s=service_s, duration_s=60.0,
                                  rng=random.Random(initial))
    assert 2 <= trace.settled() <= 4
    assert all(1 <= limit <= 10 for limit in trace.limits)
    capacity = 2 / service_s
    assert trace.throughput(since=30.0) >= 0.95 * capacity
    late = [lat for t, lat in zip(trace.times, trace.latencies, strict=True) if t >= 30.0]
    assert sum(late) / len(late) <= 2.2 * service_s  # about 3.5 in flight on 2 cores


@pytest.mark.parametrize("initial", [1, 4])
def test_the_limit_grows_to_max_when_latency_is_flat(initial: int) -> None:
    """An IO-bound server with 20 slots: no knee below the pool's max, so the max."""
    limiter = AdaptiveLimit(LimiterConfig(initial=initial, max_limit=10))
    trace = run_processor_sharing(limiter, cores=20, service_s=0.010, duration_s=20.0,
                                  rng=random.Random(7))
    assert trace.settled() == 10


def test_a_big_pool_on_an_idle_server_grows_to_its_max() -> None:
    limiter = AdaptiveLimit(LimiterConfig(initial=4, max_limit=50))
    trace = run_processor_sharing(limiter, cores=100, service_s=0.010, duration_s=20.0,
                                  rng=random.Random(8))
    assert trace.settled() == 50


@pytest.mark.parametrize("cores", [4, 8, 16])
def test_the_limit_follows_bigger_servers_knees(cores: int) -> None:
    limiter = AdaptiveLimit(LimiterConfig(initial=1, max_limit=50))
    trace = run_processor_sharing(limiter, cores=cores, service_s=0.010, duration_s=30.0,
                                  rng=random.Random(cores))
    assert cores <= trace.settled() <= round(cores * 1.25) + 2
    assert trace.throughput(since=15.0) >= 0.95 * cores / 0.010
