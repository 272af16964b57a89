"""Health checks on real PostgreSQL: ok, stopped server, blackholed network, the monitor,
and readiness against the circuit breaker (opened for real through a fault proxy), plus the
readiness rules as a pure function."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from pool_helpers import config_for, open_pool
from poolwarden import CircuitOpen, Pool, PoolStats, PoolTimeout
from poolwarden.embedded import EmbeddedPostgres, free_port
from poolwarden.health import (
    HealthMonitor,
    HealthReport,
    NodeHealth,
    NotReadyReason,
    check_node,
    check_nodes,
    judge_readiness,
)
from poolwarden.protect.breaker import BreakerConfig
from poolwarden.testing import FaultProxy

# A check must end within its timeout; the margin covers scheduling on a loaded CI machine.
MARGIN_S = 2.0
# Fast reconnects, so that a restarted server is seen again within a second or so.
FAST_RECONNECT = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2}
# A refused check costs no I/O: it must come back at once, not after its timeout.
AT_ONCE_S = 0.5


def assert_no_secret(health: NodeHealth | HealthReport, password: str) -> None:
    assert password not in repr(health)
    assert password not in json.dumps(health.as_dict())


def breaker_pool(**overrides: object) -> dict[str, object]:
    """Pool options for a breaker test: a run of two refused connection attempts opens the
    breaker (no jitter: the open period is exact), reconnects are quick."""
    options: dict[str, object] = {
        "reconnect_initial_delay": 0.01, "reconnect_max_delay": 0.02,
        "breaker": BreakerConfig(consecutive_failures=2, open_s=0.3, max_open_s=0.3, jitter=0.0),
    }
    options.update(overrides)
    return options


async def test_healthy_primary_reports_latency_and_not_in_recovery(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        health = await check_node(pool, timeout=2.0)
    assert health.ok
    assert (health.error, health.error_type, health.retry_after_s) == (None, None, None)
    assert health.in_recovery is False
    assert health.latency_ms is not None
    assert 0 < health.latency_ms < 2000
    assert health.acquire_ms is not None
    assert health.node == pool.name
    assert health.stats.name == pool.name
    assert health.checked_at.tzinfo is not None


async def test_check_returns_its_connection_to_the_pool(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        await check_node(pool)
        stats = pool.stats()
    assert stats.connections_in_use == 0
    assert stats.acquires_total == 1


async def test_report_of_the_only_node_is_ok_and_json_safe(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        report = await check_nodes({pool.name: pool})
    assert report.ok
    assert [n.node for n in report.nodes] == [pool.name]
    assert report.node(pool.name).ok
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is True
    assert data["nodes"][pool.name]["in_recovery"] is False
    assert pg.password not in json.dumps(data)


async def test_report_ok_depends_on_required_nodes_only(
    pg: EmbeddedPostgres, fresh_pg: EmbeddedPostgres
) -> None:
    async with open_pool(pg, name="primary") as good, open_pool(
        fresh_pg, name="analytics", **FAST_RECONNECT
    ) as bad:
        fresh_pg.stop()
        report = await check_nodes([good, bad], timeout=0.5, required={"primary"})
        assert report.ok
        assert not report.node("analytics").ok
        everything = await check_nodes([good, bad], timeout=0.5)
        assert not everything.ok


async def test_standby_reports_in_recovery(replica: EmbeddedPostgres) -> None:
    async with open_pool(replica, name="replica") as pool:
        health = await check_node(pool)
    assert health.ok
    assert health.in_recovery is True


def test_empty_report_is_not_ok() -> None:
    assert not HealthReport(nodes=()).ok


@pytest.mark.slow
async def test_stopped_server_fails_within_timeout_without_leaking_password(
    fresh_pg: EmbeddedPostgres,
) -> None:
    async with open_pool(fresh_pg, **FAST_RECONNECT) as pool:
        fresh_pg.stop()
        # First the pooled connection the server cut, then fresh attempts that are refused.
        for _ in range(2):
            timeout = 1.0
            started = time.monotonic()
            health = await check_node(pool, timeout=timeout)
            elapsed = time.monotonic() - started
            assert not health.ok
            assert elapsed < timeout + MARGIN_S
            assert health.latency_ms is None
            assert health.in_recovery is None
            assert health.error
            assert fresh_pg.password not in health.error
            assert_no_secret(health, fresh_pg.password)
        assert health.error is not None
        assert health.error_type in {"PoolTimeout", "DeadlineExceeded", "CircuitOpen"}
        assert health.error.startswith(f"{health.error_type}: ")
        assert "cause: ConnectionFailed" in health.error


async def test_unreachable_server_error_names_the_cause_without_password(
    pg: EmbeddedPostgres,
) -> None:
    # Nothing listens on this port: every connection attempt is refused.
    dsn = pg.dsn.replace(f":{pg.port}/", f":{free_port()}/")
    pool = Pool(config_for(dsn, **FAST_RECONNECT))
    await pool.open(wait=False)
    try:
        health = await check_node(pool, timeout=0.5)
    finally:
        await pool.close(timeout=1)
    assert not health.ok
    assert health.error is not None
    assert health.error_type is not None
    assert health.error.startswith(f"{health.error_type}: ")
    assert "cause: ConnectionFailed" in health.error
    assert health.as_dict()["error_type"] == health.error_type
    assert_no_secret(health, pg.password)


@pytest.mark.slow
async def test_blackholed_server_fails_within_timeout(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    async with open_pool(
        proxy.dsn_for(pg.dsn), connect_timeout=0.5, command_timeout=1.0, release_timeout=0.5
    ) as pool:
        assert (await check_node(pool)).ok  # warmed up, a connection through the proxy
        proxy.blackhole()
        try:
            for _ in range(2):  # the warm connection, then a fresh attempt
                timeout = 1.0
                started = time.monotonic()
                health = await check_node(pool, timeout=timeout)
                elapsed = time.monotonic() - started
                assert not health.ok
                assert elapsed < timeout + MARGIN_S
                assert health.error_type is not None
                assert health.error_type.isidentifier()  # a class name, not a message
                assert_no_secret(health, pg.password)
        finally:
            proxy.heal()


async def test_check_is_cancellable(pg: EmbeddedPostgres, proxy: FaultProxy) -> None:
    async with open_pool(proxy.dsn_for(pg.dsn), release_timeout=0.5) as pool:
        proxy.blackhole()
        try:
            task = asyncio.create_task(check_node(pool, timeout=30))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.stats().connections_in_use == 0
        finally:
            proxy.heal()


# ---------------------------------------------------------------------- monitor


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_monitor_keeps_last_report_and_its_age(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        monitor = HealthMonitor(pool, interval=0.1, timeout=1.0)
        assert (monitor.last, monitor.age_s) == (None, None)
        assert not monitor.ready()
        assert monitor.live()
        async with monitor:
            await wait_for(lambda: monitor.last is not None)
            assert monitor.ready()
            first = monitor.last
            await wait_for(lambda: monitor.last is not first)
            age = monitor.age_s
            assert age is not None
            assert 0 <= age < 1.0
            assert "running" in repr(monitor)
        assert not monitor.running
        # Stopped: the report ages, and readiness with a tight freshness limit turns false.
        await asyncio.sleep(0.2)
        assert not monitor.ready(max_age_s=0.1)
        assert monitor.ready(max_age_s=60)


@pytest.mark.slow
async def test_monitor_turns_not_ready_on_stop_and_ready_after_start(
    fresh_pg: EmbeddedPostgres,
) -> None:
    async with open_pool(fresh_pg, **FAST_RECONNECT) as pool:
        monitor = HealthMonitor(pool, interval=0.1, timeout=0.5)
        async with monitor:
            await wait_for(monitor.ready)
            await asyncio.to_thread(fresh_pg.stop)
            await wait_for(lambda: not monitor.ready())
            assert monitor.live()
            last = monitor.last
            assert last is not None
            assert not last.ok
            assert fresh_pg.password not in json.dumps(last.as_dict())
            await asyncio.to_thread(fresh_pg.start)
            await wait_for(monitor.ready, timeout=15)
            assert monitor.live()


async def test_monitor_stop_is_idempotent_and_safe_before_start(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        monitor = HealthMonitor(pool, interval=0.1)
        await monitor.stop()
        monitor.start()
        monitor.start()
        await monitor.stop()
        await monitor.stop()
        assert not monitor.running


async def test_monitor_ends_when_its_target_is_gone(pg: EmbeddedPostgres) -> None:
    pool = Pool(config_for(pg))
    await pool.open()
    monitor = HealthMonitor(pool, interval=0.05, timeout=1.0)
    monitor.start()
    await wait_for(lambda: monitor.last is not None)
    await pool.close(timeout=1)
    del pool
    gc.collect()
    await wait_for(lambda: not monitor.running)
    await monitor.stop()


async def test_monitor_uses_a_health_source(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:

        class Source:
            async def health(self, *, timeout: float = 2.0) -> HealthReport:
                return await check_nodes([pool], timeout=timeout)

        source = Source()
        async with HealthMonitor(source, interval=0.1) as monitor:
            await wait_for(monitor.ready)
        del source


def test_monitor_rejects_bad_interval(pg: EmbeddedPostgres) -> None:
    with pytest.raises(ValueError, match="interval"):
        HealthMonitor(Pool(config_for(pg)), interval=0)


# ---------------------------------------------------------------------- the circuit breaker


async def open_breaker(pool: Pool, proxy: FaultProxy) -> None:
    """Open ``pool``'s breaker for real: the proxy resets new connections and cuts the
    current ones, then a caller's acquire needs a new connection and the refused attempts
    open the breaker under it (the caller gets CircuitOpen)."""
    proxy.refuse()
    proxy.reset_all()
    await asyncio.sleep(0.05)  # the pool's connections see the reset
    with pytest.raises(CircuitOpen):
        await asyncio.wait_for(pool.acquire(), 4.0)


LONG_OPEN = BreakerConfig(consecutive_failures=2, open_s=5.0, max_open_s=5.0, jitter=0.0)


async def test_an_open_breaker_refuses_the_check_at_once_with_its_retry_after_and_cause(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Breaker open: the check is refused by the pool without I/O, like any caller, and says
    so — ``CircuitOpen``, the rest of the open period, and the connection error that opened
    it — with no password anywhere."""
    async with open_pool(proxy.dsn_for(pg.dsn), **breaker_pool(breaker=LONG_OPEN)) as pool:
        await open_breaker(pool, proxy)
        started = time.monotonic()
        health = await check_node(pool, timeout=2.0)
        elapsed = time.monotonic() - started
    assert elapsed < AT_ONCE_S
    assert not health.ok
    assert health.error_type == "CircuitOpen"
    assert health.error is not None
    assert health.error.startswith("CircuitOpen: ")
    assert "cause: ConnectionFailed" in health.error
    assert health.retry_after_s is not None
    assert 0 < health.retry_after_s <= LONG_OPEN.open_s
    assert health.stats.breaker_state == "open"
    assert (health.acquire_ms, health.latency_ms) == (None, None)
    data = health.as_dict()
    assert (data["error_type"], data["retry_after_s"]) == ("CircuitOpen", health.retry_after_s)
    assert_no_secret(health, pg.password)


async def test_readiness_turns_off_when_the_breaker_opens_and_a_check_brings_it_back(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """The last report is fresh and ok, but the breaker opened after it: readiness is off at
    once (``circuit_open``), not at the next check. That check names ``CircuitOpen`` and the
    breaker's retry-after. With no traffic at all, the breaker does not move past its open
    period by itself; the next check is the probe that closes it, and readiness is back."""
    breaker = BreakerConfig(consecutive_failures=2, open_s=0.5, max_open_s=0.5, jitter=0.0)
    async with open_pool(proxy.dsn_for(pg.dsn), **breaker_pool(breaker=breaker)) as pool:
        monitor = HealthMonitor(pool, interval=60.0, timeout=1.0)  # checks only when told
        await monitor.refresh()
        assert monitor.ready()

        await open_breaker(pool, proxy)
        assert not monitor.ready()
        verdict = monitor.readiness()
        assert verdict.reason is NotReadyReason.CIRCUIT_OPEN
        (node,) = verdict.nodes
        assert node.health.ok  # the report itself predates the breaker...
        assert node.breaker_state == "open"  # ...which is read live
        assert node.retry_after_s is None  # no hint yet: it opened after the check

        await monitor.refresh()
        verdict = monitor.readiness()
        assert verdict.reason is NotReadyReason.CIRCUIT_OPEN
        (node,) = verdict.nodes
        assert node.health.error_type == "CircuitOpen"
        assert node.retry_after_s is not None
        assert 0 <= node.retry_after_s <= breaker.open_s
        assert verdict.retry_after_s == node.retry_after_s

        proxy.heal()
        await asyncio.sleep(breaker.open_s + 0.1)
        assert pool.stats().breaker_state == "open"  # only a caller moves it on: none came
        report = await monitor.refresh()
        assert report is not None
        assert report.ok
        assert monitor.ready()
        assert pool.stats().breaker_state == "closed"


async def test_a_check_does_not_take_the_probe_from_a_caller_holding_it(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Half open, a caller is the probe (waiting for a connection attempt that hangs): the
    check is refused at once, leaves the probe alone, and the node is not ready. When the
    network is back, the caller's probe closes the breaker and the check passes."""
    async with open_pool(proxy.dsn_for(pg.dsn), **breaker_pool(
        min_size=0, pool_size=2, connect_timeout=5.0, acquire_timeout=5.0,
    )) as pool:
        await open_breaker(pool, proxy)
        proxy.blackhole()  # from now on, connection attempts hang
        await asyncio.sleep(0.4)  # the open period is over: the next caller is the probe
        probe = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.1)
        assert pool.stats().breaker_state == "half_open"
        started = time.monotonic()
        health = await check_node(pool, timeout=2.0)
        assert time.monotonic() - started < AT_ONCE_S
        assert not health.ok
        assert health.error_type == "CircuitOpen"
        assert not probe.done()
        proxy.heal()
        conn = await asyncio.wait_for(probe, 5.0)
        await pool.release(conn)
        assert pool.stats().breaker_state == "closed"
        assert (await check_node(pool)).ok


async def test_a_check_that_gets_no_connection_as_the_probe_gives_the_probe_back(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Half open and nobody probing: the check is let through as the probe, but the
    connection attempt hangs. When the check times out the probe is free again: the next
    caller is let through to wait (and time out), not refused with CircuitOpen."""
    async with open_pool(proxy.dsn_for(pg.dsn), **breaker_pool(
        min_size=0, pool_size=2, connect_timeout=5.0, acquire_timeout=5.0,
    )) as pool:
        await open_breaker(pool, proxy)
        proxy.blackhole()
        try:
            await asyncio.sleep(0.4)
            health = await check_node(pool, timeout=0.3)
            assert not health.ok
            assert health.error_type in {"PoolTimeout", "DeadlineExceeded", "TimeoutError"}
            assert pool.stats().breaker_state == "half_open"
            with pytest.raises(PoolTimeout):
                await pool.acquire(timeout=0.2)
        finally:
            proxy.heal()


async def test_a_check_that_answers_while_the_breaker_opens_is_not_ok(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """The check holds a connection and its query is slow; meanwhile a caller's connection
    attempts are refused and open the breaker. The query answers, but callers are refused
    now: the check must not report ok and hide the open breaker."""
    async with open_pool(proxy.dsn_for(pg.dsn), **breaker_pool(
        pool_size=2, breaker=LONG_OPEN,
    )) as pool:
        proxy.delay(0.3)  # the check's round trip takes a while...
        proxy.refuse()  # ...and new connections are reset meanwhile
        try:
            check = asyncio.ensure_future(check_node(pool, timeout=5.0))
            await asyncio.sleep(0.05)  # it holds the pool's one connection
            with pytest.raises(CircuitOpen):
                await pool.acquire(timeout=3.0)  # needs a new one: the refusals open it
            health = await check
        finally:
            proxy.heal()
    assert health.latency_ms is not None  # the server did answer
    assert not health.ok
    assert health.error_type == "CircuitOpen"
    assert health.stats.breaker_state == "open"
    assert health.retry_after_s is not None
    assert 0 < health.retry_after_s <= LONG_OPEN.open_s
    assert_no_secret(health, pg.password)


async def test_readiness_recovers_after_a_check_failed_its_query_as_the_probe(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Half open, the check is the probe and gets an idle connection, but its query times
    out (network blackholed) and the connection is discarded. Once the network is back,
    checks must bring readiness back on their own."""
    async with open_pool(proxy.dsn_for(pg.dsn), **breaker_pool(
        min_size=0, pool_size=2, acquire_timeout=2.0, pre_ping=False,  # no ping: the query
    )) as pool:
        held = await pool.acquire()  # kept through the outage: idle when the probe comes
        proxy.refuse()
        with pytest.raises(CircuitOpen):
            await asyncio.wait_for(pool.acquire(), 4.0)
        await pool.release(held)
        await asyncio.sleep(0.4)
        proxy.blackhole()
        monitor = HealthMonitor(pool, interval=60.0, timeout=0.5)
        try:
            report = await monitor.refresh()
            assert report is not None
            assert report.nodes[0].error_type == "TimeoutError"  # during the query
        finally:
            proxy.heal()
        deadline = time.monotonic() + 3.0
        while not monitor.ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await monitor.refresh()
        assert monitor.ready()


# ---------------------------------------------------------------------- readiness rules (pure)


def offline_stats(node: str, breaker: str) -> PoolStats:
    """A pool's stats snapshot (the pool never opened: no server) with ``breaker``."""
    stats = Pool(config_for("postgresql://judge@127.0.0.1:9/none", name=node)).stats()
    return dataclasses.replace(stats, breaker_state=breaker)


def checked(
    node: str = "primary", *, error_type: str | None = None, breaker: str = "closed",
    retry_after_s: float | None = None,
) -> NodeHealth:
    """A check of ``node``: ok unless ``error_type`` names what failed it."""
    ok = error_type is None
    return NodeHealth(
        node=node, ok=ok, latency_ms=1.0 if ok else None, in_recovery=False if ok else None,
        checked_at=datetime.now(UTC), stats=offline_stats(node, breaker),
        error=None if ok else f"{error_type}: it failed", error_type=error_type,
        retry_after_s=retry_after_s,
    )


def test_readiness_needs_a_report_and_a_fresh_one() -> None:
    report = HealthReport(nodes=(checked(),))
    assert judge_readiness(None, age_s=None, max_age_s=10).reason is NotReadyReason.NO_REPORT
    assert judge_readiness(report, age_s=1.0, max_age_s=10).ready
    stale = judge_readiness(report, age_s=11.0, max_age_s=10)
    assert (stale.ready, stale.reason) == (False, NotReadyReason.STALE)
    empty = judge_readiness(HealthReport(nodes=()), age_s=1.0, max_age_s=10)
    assert empty.reason is NotReadyReason.NO_REPORT


@pytest.mark.parametrize("now", ["open", "half_open"])
def test_a_breaker_refusing_now_overrides_an_ok_check(now: str) -> None:
    """Open, or half open (only probes get through): not ready, whatever the check said."""
    report = HealthReport(nodes=(checked(),))
    verdict = judge_readiness(report, age_s=1.0, max_age_s=10,
                              live={"primary": offline_stats("primary", now)})
    assert verdict.reason is NotReadyReason.CIRCUIT_OPEN
    (node,) = verdict.nodes
    assert (node.ready, node.breaker_state, node.retry_after_s) == (False, now, None)


@pytest.mark.parametrize("now", ["closed", "disabled"])
def test_a_breaker_that_lets_calls_through_leaves_an_ok_check_ready(now: str) -> None:
    report = HealthReport(nodes=(checked(),))
    verdict = judge_readiness(report, age_s=1.0, max_age_s=10,
                              live={"primary": offline_stats("primary", now)})
    assert verdict.ready
    assert verdict.nodes[0].breaker_state == now


def test_without_live_stats_the_breaker_is_read_from_the_check() -> None:
    report = HealthReport(nodes=(checked(breaker="half_open"),))
    verdict = judge_readiness(report, age_s=1.0, max_age_s=10)
    assert verdict.reason is NotReadyReason.CIRCUIT_OPEN


def test_a_refused_check_gives_the_breakers_retry_after_less_the_reports_age() -> None:
    report = HealthReport(nodes=(
        checked(error_type="CircuitOpen", breaker="open", retry_after_s=2.0),))
    open_now = {"primary": offline_stats("primary", "open")}
    verdict = judge_readiness(report, age_s=0.5, max_age_s=10, live=open_now)
    assert verdict.reason is NotReadyReason.CIRCUIT_OPEN
    assert verdict.nodes[0].retry_after_s == pytest.approx(1.5)
    assert verdict.retry_after_s == pytest.approx(1.5)
    later = judge_readiness(report, age_s=3.0, max_age_s=10, live=open_now)
    assert later.retry_after_s == 0.0  # a probe may go: the next check will be it


def test_any_other_failed_check_says_check_failed_without_retry_after() -> None:
    report = HealthReport(nodes=(checked(error_type="PoolTimeout"),))
    verdict = judge_readiness(report, age_s=1.0, max_age_s=10)
    assert verdict.reason is NotReadyReason.CHECK_FAILED
    assert verdict.nodes[0].health.error_type == "PoolTimeout"
    assert verdict.retry_after_s is None


def test_only_required_nodes_decide_but_every_node_has_its_part() -> None:
    report = HealthReport(
        nodes=(checked("primary"),
               checked("analytics", error_type="CircuitOpen", breaker="open", retry_after_s=4.0)),
        required=frozenset({"primary"}),
    )
    verdict = judge_readiness(report, age_s=1.0, max_age_s=10)
    assert verdict.ready
    parts = {n.node: n for n in verdict.nodes}
    assert (parts["primary"].required, parts["primary"].reason) == (True, None)
    assert parts["analytics"].required is False
    assert parts["analytics"].reason is NotReadyReason.CIRCUIT_OPEN
    assert verdict.retry_after_s is None  # a node the answer does not depend on
    needs_analytics = dataclasses.replace(report, required=frozenset({"analytics"}))
    verdict = judge_readiness(needs_analytics, age_s=1.0, max_age_s=10)
    assert verdict.reason is NotReadyReason.CIRCUIT_OPEN
    assert verdict.retry_after_s == pytest.approx(3.0)


def test_a_refused_check_whose_breaker_closed_since_gives_no_wait() -> None:
    """The check was refused, but a caller's probe has closed the breaker since: still not
    ready until the next check says so, and nothing to wait for."""
    report = HealthReport(nodes=(
        checked(error_type="CircuitOpen", breaker="open", retry_after_s=2.0),))
    verdict = judge_readiness(report, age_s=0.5, max_age_s=10,
                              live={"primary": offline_stats("primary", "closed")})
    assert verdict.reason is NotReadyReason.CIRCUIT_OPEN
    assert (verdict.nodes[0].breaker_state, verdict.retry_after_s) == ("closed", 0.0)
