"""Health checks on real PostgreSQL: ok, stopped server, blackholed network, the monitor."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable

import pytest

from pool_helpers import config_for, open_pool
from poolwarden import Pool
from poolwarden.embedded import EmbeddedPostgres, free_port
from poolwarden.health import HealthMonitor, HealthReport, NodeHealth, check_node, check_nodes
from poolwarden.testing import FaultProxy

# A check must end within its timeout; the margin covers scheduling on a loaded CI machine.
MARGIN_S = 2.0
# Fast reconnects, so that a restarted server is seen again within a second or so.
FAST_RECONNECT = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2}


def assert_no_secret(health: NodeHealth | HealthReport, password: str) -> None:
    assert password not in repr(health)
    assert password not in json.dumps(health.as_dict())


async def test_healthy_primary_reports_latency_and_not_in_recovery(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        health = await check_node(pool, timeout=2.0)
    assert health.ok
    assert health.error is None
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
        assert health.error.startswith(("PoolTimeout", "DeadlineExceeded", "CircuitOpen"))
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
    assert "cause: ConnectionFailed" in health.error
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
