"""The advisor (pure): each rule on hand-made snapshots, and its guarantees as properties."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolwarden import PoolConfig, PoolStats
from poolwarden.advisor import Finding, Severity, advise
from poolwarden.sizing import ServerBudget

DSN = "postgresql://u:p@h/db"


def config(**overrides: Any) -> PoolConfig:
    return PoolConfig(dsn=DSN, **overrides)


def snapshot(**overrides: Any) -> PoolStats:
    """A quiet, healthy pool of 10 + 5 with 5 in use; override what the test is about."""
    values: dict[str, Any] = {
        "name": "primary", "min_size": 1, "pool_size": 10, "max_overflow": 5, "max_size": 15,
        "max_waiting": 1000, "connections": 10, "connections_idle": 5,
        "connections_in_use": 5, "connections_opening": 0, "connections_overflow": 0,
        "requests_waiting": 0, "closed": False, "acquires_total": 0,
        "acquires_waited_total": 0, "acquire_wait_ms_total": 0.0,
        "acquire_timeouts_total": 0, "acquire_refusals_total": 0,
        "acquire_cancelled_total": 0, "connections_created_total": 10,
        "connection_errors_total": 0,
    }
    values.update(overrides)
    values["max_size"] = values["pool_size"] + values["max_overflow"]
    return PoolStats(**values)


def full(**overrides: Any) -> PoolStats:
    """Every one of the 15 connections in use and 4 callers queued."""
    return snapshot(connections=15, connections_idle=0, connections_in_use=15,
                    connections_overflow=5, requests_waiting=4, **overrides)


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def only(findings: list[Finding], code: str) -> Finding:
    [finding] = [f for f in findings if f.code == code]
    return finding


# -- a healthy pool --------------------------------------------------------------------------


def test_a_healthy_pool_gets_no_findings() -> None:
    stats = snapshot(acquires_total=10_000, acquires_waited_total=10,
                     acquire_wait_ms_total=50.0)
    assert advise(config(), stats) == []


def test_a_fresh_pool_with_no_traffic_gets_no_findings() -> None:
    assert advise(config(), snapshot()) == []


# -- too small, or held too long -------------------------------------------------------------


def starved_pair(**overrides: Any) -> tuple[PoolStats, PoolStats]:
    """Over the interval: 1000 acquires, 300 queued for 120 ms each on a full pool."""
    before = snapshot(acquires_total=5000, acquires_waited_total=100,
                      acquire_wait_ms_total=1000.0, connections_created_total=15,
                      connections_closed_total={"overflow": 5})
    after = full(acquires_total=6000, acquires_waited_total=400,
                 acquire_wait_ms_total=1000.0 + 300 * 120.0, connections_created_total=20,
                 connections_closed_total={"overflow": 5}, **overrides)
    return before, after


def test_queueing_on_a_full_pool_is_pool_too_small() -> None:
    before, after = starved_pair()
    finding = only(advise(config(), after, before), "pool_too_small")
    assert finding.severity is Severity.WARNING
    # 300 / 1000 queued = 30%; (36000 ms) / 300 = 120 ms mean; grow 10 by half -> 15.
    assert finding.evidence["waited_percent"] == 30.0
    assert finding.evidence["mean_wait_ms"] == 120.0
    assert finding.evidence["window"] == "interval"
    assert finding.changes == {"pool_size": 15, "max_overflow": 5}
    assert "Raise DB_POOL_SIZE from 10 to 15" in finding.action
    assert "Hold times were not given" in finding.message


def test_timeouts_on_a_full_pool_are_critical() -> None:
    # 20 timeouts of 1020 attempts = 1.96% >= 1%.
    before, after = starved_pair(acquire_timeouts_total=20)
    findings = advise(config(), after, before)
    assert codes(findings)[:2] == ["acquire_timeouts", "pool_too_small"]
    timeouts = only(findings, "acquire_timeouts")
    assert timeouts.severity is Severity.CRITICAL
    assert timeouts.evidence["percent"] == 1.96
    assert "DB_POOL_TIMEOUT (now 5 s)" in timeouts.action
    assert only(findings, "pool_too_small").severity is Severity.CRITICAL


def test_long_holds_are_reported_instead_of_a_small_pool() -> None:
    before, after = starved_pair()
    findings = advise(config(), after, before, hold_time_p99_ms=800.0, query_time_p99_ms=20.0)
    assert "pool_too_small" not in codes(findings)
    held = only(findings, "connections_held_too_long")
    assert held.severity is Severity.CRITICAL
    assert held.evidence["hold_time_p99_ms"] == 800.0
    assert "enable leak detection" in held.action
    assert held.changes == {}


def test_holds_close_to_query_time_confirm_the_pool_is_too_small() -> None:
    before, after = starved_pair()
    # 50 ms held for 20 ms of queries: 2.5x, under the 5x bar.
    findings = advise(config(), after, before, hold_time_p99_ms=50.0, query_time_p99_ms=20.0)
    finding = only(findings, "pool_too_small")
    assert "Hold times were not given" not in finding.message


def test_long_holds_without_queueing_are_a_warning() -> None:
    stats = snapshot(acquires_total=10_000)
    finding = only(advise(config(), stats, hold_time_p99_ms=500.0, query_time_p99_ms=10.0),
                   "connections_held_too_long")
    assert finding.severity is Severity.WARNING


def test_growth_stays_within_the_server_budget() -> None:
    # 60 - 3 - 5 = 52 usable over 4 processes = 13 each: pool 15 is cut to 13, no overflow.
    before, after = starved_pair()
    server = ServerBudget(max_connections=60, processes=4)
    finding = only(advise(config(), after, before, server=server), "pool_too_small")
    assert finding.changes == {"pool_size": 13, "max_overflow": 0}
    assert "set DB_MAX_OVERFLOW from 5 to 0" in finding.action


def test_no_room_in_the_budget_means_no_growth() -> None:
    # 50 - 3 - 5 = 42 over 4 processes = 10 each: pool_size 10 cannot grow.
    before, after = starved_pair()
    server = ServerBudget(max_connections=50, processes=4)
    finding = only(advise(config(), after, before, server=server), "pool_too_small")
    assert finding.changes == {}
    assert "no room to grow" in finding.action


def test_waiting_for_a_server_that_is_down_is_not_a_small_pool() -> None:
    stats = snapshot(acquires_total=50, acquire_timeouts_total=30,
                     connection_errors_total=12, connections_created_total=0,
                     connections=0, connections_idle=0, connections_in_use=0)
    findings = advise(config(), stats)
    assert codes(findings) == ["acquire_timeouts", "connection_errors"]
    assert only(findings, "connection_errors").severity is Severity.CRITICAL
    assert "connection-error finding" in only(findings, "acquire_timeouts").action


def test_some_connection_errors_among_successes_are_a_warning() -> None:
    finding = only(advise(config(), snapshot(connection_errors_total=2)), "connection_errors")
    assert finding.severity is Severity.WARNING
    assert "(10 succeeded)" in finding.message


def test_a_rare_timeout_below_the_limit_is_not_a_small_pool() -> None:
    # 1 timeout in 10001 attempts, pool at 10 of 15: reported, but no growth proposed.
    stats = snapshot(acquires_total=10_000, acquire_timeouts_total=1)
    assert codes(advise(config(), stats)) == ["acquire_timeouts"]


def test_refusals_are_reported_with_their_share() -> None:
    # 3 refusals of 10000 + 3 attempts: under 1%, a warning.
    stats = snapshot(acquires_total=10_000, acquire_refusals_total=3, max_waiting=50)
    finding = only(advise(config(), stats), "acquire_refusals")
    assert finding.severity is Severity.WARNING
    assert finding.evidence["refusals"] == 3
    assert "max_waiting=50" in finding.message


# -- too big, overflow -----------------------------------------------------------------------


def test_a_mostly_idle_pool_is_shrunk_to_twice_its_peak() -> None:
    before = snapshot(pool_size=50, connections=50, connections_idle=47, connections_in_use=3,
                      acquires_total=1000)
    after = snapshot(pool_size=50, connections=50, connections_idle=48, connections_in_use=2,
                     acquires_total=11_000)
    finding = only(advise(config(pool_size=50), after, before), "pool_too_big")
    assert finding.severity is Severity.INFO
    assert finding.evidence["peak_in_use"] == 3
    assert finding.changes == {"pool_size": 6}
    assert "Lower DB_POOL_SIZE from 50 to 6" in finding.action


def test_shrinking_stops_at_min_size() -> None:
    stats = snapshot(pool_size=50, min_size=10, connections=50, connections_idle=48,
                     connections_in_use=2, acquires_total=10_000)
    finding = only(advise(config(pool_size=50, min_size=10), stats), "pool_too_big")
    assert finding.changes == {"pool_size": 10}


def test_a_pool_in_use_above_a_quarter_is_not_too_big() -> None:
    stats = snapshot(pool_size=40, connections=40, connections_idle=29, connections_in_use=11,
                     acquires_total=10_000)
    assert advise(config(pool_size=40), stats) == []


def test_overflow_in_constant_use_moves_into_pool_size() -> None:
    # 50 overflow closes over 1000 acquires = 5% >= 1%; 3 overflow open now -> pool 13 + 2.
    before = snapshot(acquires_total=1000, connections_closed_total={"overflow": 10})
    after = snapshot(acquires_total=2000, connections=13, connections_idle=0,
                     connections_in_use=13, connections_overflow=3,
                     connections_closed_total={"overflow": 60})
    finding = only(advise(config(), after, before), "overflow_always_used")
    assert finding.evidence["overflow_closes"] == 50
    assert finding.changes == {"pool_size": 13, "max_overflow": 2}
    assert "the same ceiling of 15" in finding.action


# -- churn and pings -------------------------------------------------------------------------


def churn_pair(reason: str, **overrides: Any) -> tuple[PoolStats, PoolStats]:
    """100 connections replaced (closed for ``reason``, reopened) over 1000 acquires."""
    before = snapshot(acquires_total=1000, connections_created_total=10,
                      connections_closed_total={reason: 0})
    after = snapshot(acquires_total=2000, connections_created_total=110,
                     connections_closed_total={reason: 100}, **overrides)
    return before, after


def test_churn_from_a_short_lifetime_raises_the_recycle() -> None:
    before, after = churn_pair("lifetime")
    finding = only(advise(config(max_lifetime=60.0), after, before), "connection_churn")
    assert finding.evidence["replaced"] == 100
    assert finding.evidence["closed_lifetime"] == 100
    assert finding.changes == {"max_lifetime": 1800.0}
    assert "Raise DB_POOL_RECYCLE from 60 to 1800 s" in finding.action


def test_churn_from_lost_connections_points_at_the_server() -> None:
    before, after = churn_pair("error")
    finding = only(advise(config(), after, before), "connection_churn")
    assert finding.changes == {}
    assert "check its logs" in finding.action


def test_churn_from_idle_closes_raises_min_size_up_to_what_is_used() -> None:
    before, after = churn_pair("idle", connections_in_use=6, connections_idle=4)
    finding = only(advise(config(), after, before), "connection_churn")
    assert finding.changes == {"min_size": 6}


def test_opening_connections_to_grow_is_not_churn() -> None:
    stats = snapshot(acquires_total=1000, connections_created_total=10)
    assert "connection_churn" not in codes(advise(config(), stats))


def test_ping_failures_are_a_warning_above_one_percent() -> None:
    finding = only(advise(config(), snapshot(pings_total=100, ping_failures_total=5)),
                   "ping_failures")
    assert finding.severity is Severity.WARNING
    assert "DB_POOL_IDLE_TIMEOUT (now 300 s)" in finding.action
    rare = only(advise(config(), snapshot(pings_total=1000, ping_failures_total=1)),
                "ping_failures")
    assert rare.severity is Severity.INFO


# -- server budget and idle transactions -----------------------------------------------------


def test_processes_over_the_server_budget_are_critical() -> None:
    # 8 x 15 = 120 > 100 - 3 - 5 = 92; 92 // 8 = 11 each: pool 10 + overflow 1.
    server = ServerBudget(max_connections=100, processes=8)
    finding = only(advise(config(), snapshot(), server=server), "server_budget_exceeded")
    assert finding.severity is Severity.CRITICAL
    assert finding.evidence["total_max"] == 120
    assert finding.evidence["usable"] == 92
    assert finding.changes == {"pool_size": 10, "max_overflow": 1}
    assert "8 processes x 15 = 120" in finding.message
    assert "(8 x 11 = 88 ≤ 92)" in finding.action


def test_a_budget_cut_below_min_size_lowers_min_size_too() -> None:
    # 40 - 3 - 5 = 32 over 8 = 4 each, below min_size 6.
    server = ServerBudget(max_connections=40, processes=8)
    stats = snapshot(min_size=6)
    finding = only(advise(config(min_size=6), stats, server=server), "server_budget_exceeded")
    assert finding.changes == {"pool_size": 4, "max_overflow": 0, "min_size": 4}


def test_a_budget_without_one_connection_per_process() -> None:
    server = ServerBudget(max_connections=12, processes=8)  # 12 - 3 - 5 = 4 for 8
    finding = only(advise(config(), snapshot(), server=server), "server_budget_exceeded")
    assert finding.changes == {}
    assert "PgBouncer" in finding.action


def test_a_nearly_full_budget_is_flagged_for_deploys() -> None:
    # 6 x 15 = 90 of 92: over 90%.
    server = ServerBudget(max_connections=100, processes=6)
    finding = only(advise(config(), snapshot(), server=server), "server_budget_tight")
    assert finding.severity is Severity.INFO
    assert advise(config(), snapshot(), server=ServerBudget(max_connections=100,
                                                           processes=4)) == []


def test_idle_in_transaction_sessions_suggest_a_server_timeout() -> None:
    finding = only(advise(config(), snapshot(), idle_in_transaction=2), "idle_in_transaction")
    assert finding.severity is Severity.WARNING
    assert finding.changes == {"idle_in_transaction_timeout": 60.0}
    assert "DB_IDLE_IN_TRANSACTION_TIMEOUT" in finding.action


def test_many_idle_in_transaction_sessions_are_critical() -> None:
    # 4 of 15 >= a quarter; a timeout is already set, so no change is proposed.
    finding = only(advise(config(idle_in_transaction_timeout=30.0), snapshot(),
                          idle_in_transaction=4), "idle_in_transaction")
    assert finding.severity is Severity.CRITICAL
    assert finding.changes == {}


# -- the window and the output ---------------------------------------------------------------


def test_a_previous_snapshot_that_is_not_earlier_falls_back_to_the_whole_life() -> None:
    before = snapshot(acquires_total=5000)
    after = snapshot(acquires_total=100, acquire_refusals_total=1)  # the pool was recreated
    finding = only(advise(config(), after, before), "acquire_refusals")
    assert finding.evidence["window"] == "since start"
    assert finding.evidence["attempts"] == 101


def test_findings_come_most_severe_first() -> None:
    before, after = starved_pair(acquire_refusals_total=1, pings_total=1000,
                                 ping_failures_total=1)
    severities = [f.severity for f in advise(config(), after, before)]
    order = [Severity.CRITICAL, Severity.WARNING, Severity.INFO]
    assert severities == sorted(severities, key=order.index)
    assert Severity.INFO in severities


def test_findings_are_frozen() -> None:
    finding = advise(config(), snapshot(connection_errors_total=1))[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.code = "other"  # type: ignore[misc]


# -- properties ------------------------------------------------------------------------------

REASONS = ("lifetime", "idle", "overflow", "error", "reset_failed", "ping_failed",
           "server_restarted", "discarded", "resized", "pool_closed")


@st.composite
def stats_strategy(draw: st.DrawFn, pool_size: int, max_overflow: int,
                   min_size: int) -> PoolStats:
    max_size = pool_size + max_overflow
    in_use = draw(st.integers(0, max_size))
    idle = draw(st.integers(0, max_size - in_use))
    opening = draw(st.integers(0, max_size - in_use - idle))
    acquires = draw(st.integers(0, 10**6))
    waited = draw(st.integers(0, acquires))
    pings = draw(st.integers(0, 10**5))
    return snapshot(
        min_size=min_size, pool_size=pool_size, max_overflow=max_overflow,
        connections=in_use + idle + opening, connections_idle=idle,
        connections_in_use=in_use, connections_opening=opening,
        connections_overflow=max(0, in_use + idle + opening - pool_size),
        requests_waiting=draw(st.integers(0, 100)), acquires_total=acquires,
        acquires_waited_total=waited,
        acquire_wait_ms_total=draw(st.floats(0, 1e9, allow_nan=False)),
        acquire_timeouts_total=draw(st.integers(0, 1000)),
        acquire_refusals_total=draw(st.integers(0, 1000)),
        acquire_cancelled_total=draw(st.integers(0, 1000)),
        connections_created_total=draw(st.integers(0, 10**5)),
        connection_errors_total=draw(st.integers(0, 100)),
        connections_closed_total=draw(st.dictionaries(st.sampled_from(REASONS),
                                                      st.integers(0, 10**5))),
        pings_total=pings, ping_failures_total=draw(st.integers(0, pings)),
    )


@st.composite
def scenario(draw: st.DrawFn) -> dict[str, Any]:
    pool_size = draw(st.integers(1, 100))
    max_overflow = draw(st.integers(0, 50))
    min_size = draw(st.integers(0, pool_size))
    sizes = {"pool_size": pool_size, "max_overflow": max_overflow, "min_size": min_size}
    stats = draw(stats_strategy(**sizes))
    previous = draw(st.none() | stats_strategy(**sizes))
    server = draw(st.none() | st.builds(
        ServerBudget, max_connections=st.integers(20, 2000), reserved=st.integers(0, 10),
        other_connections=st.integers(0, 9), headroom=st.integers(0, 10),
        processes=st.integers(1, 64)))
    return {
        "config": config(max_lifetime=draw(st.floats(1, 7200)), **sizes),
        "stats": stats, "previous": previous, "server": server,
        "hold_time_p99_ms": draw(st.none() | st.floats(0, 1e6)),
        "query_time_p99_ms": draw(st.none() | st.floats(0, 1e6)),
        "idle_in_transaction": draw(st.none() | st.integers(0, 500)),
    }


@given(scenario())
def test_advise_never_raises_and_never_proposes_an_invalid_or_oversized_pool(
    case: dict[str, Any],
) -> None:
    cfg, stats, server = case["config"], case["stats"], case["server"]
    findings = advise(cfg, stats, case["previous"], server=server,
                      hold_time_p99_ms=case["hold_time_p99_ms"],
                      query_time_p99_ms=case["query_time_p99_ms"],
                      idle_in_transaction=case["idle_in_transaction"])
    assert len(codes(findings)) == len(set(codes(findings)))
    for finding in findings:
        assert finding.message
        assert finding.action
        assert finding.evidence["window"] in {"interval", "since start"}
        changed = dataclasses.replace(cfg, **finding.changes)  # a valid PoolConfig
        if "min_size" not in finding.changes or finding.code == "connection_churn":
            assert changed.pool_size >= stats.min_size  # never shrunk below min_size
        grew = changed.max_size > stats.max_size
        if server is not None and grew:
            assert server.processes * changed.max_size <= server.usable
        if finding.code == "server_budget_exceeded" and finding.changes:
            assert server is not None
            assert server.processes * changed.max_size <= server.usable
