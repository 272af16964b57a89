"""Real faults: terminated backends, a restarted or stopped server, a blackholed or resetting
network (through our TCP fault proxy), and a server that refuses connections for a while."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest

from pool_helpers import assert_clean, config_for, open_pool, terminate
from poolwarden import CircuitOpen, ConnectionFailed, Pool, PoolTimeout, PoolwardenError
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.testing import FaultProxy

pytestmark = pytest.mark.slow


async def test_backends_terminated_while_idle_are_replaced_without_errors(
    pg: EmbeddedPostgres,
) -> None:
    """asyncpg sees the server close an idle socket; acquire skips such a connection at no
    cost, so callers never get a dead one."""
    async with open_pool(pg, min_size=3, pool_size=3) as pool:
        assert await terminate(pg, pool.config.application_name) == 3
        await asyncio.sleep(0.2)  # let the event loop read the servers' goodbyes
        for _ in range(6):
            async with pool.connection() as conn:
                assert await conn.fetchval("SELECT 1") == 1
        assert pool.stats().connections_closed_total.get("error", 0) >= 3


async def test_backend_terminated_mid_query_fails_that_query_only(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=2, pool_size=2) as pool:
        victim_ready = asyncio.Event()

        async def victim() -> None:
            async with pool.connection() as conn:
                victim_ready.set()
                await conn.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(victim())
        await victim_ready.wait()
        await asyncio.sleep(0.05)
        admin = await asyncpg.connect(pg.dsn)
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND state = 'active'",
            pool.config.application_name,
        )
        await admin.close()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await task
        stats = pool.stats()
        assert stats.connections_in_use == 0
        assert stats.connections_closed_total.get("error") == 1
        async with pool.connection() as conn:
            await assert_clean(conn)


async def test_server_restart_under_load_recovers_with_no_stuck_callers(
    fresh_pg: EmbeddedPostgres,
) -> None:
    """20 workers loop through a 5-connection pool while the server restarts. Every call
    ends (success or a typed/driver error) within its bounds, work resumes afterwards, and
    connections from before the restart are never handed out again."""
    config = config_for(fresh_pg, min_size=5, pool_size=5, acquire_timeout=3, command_timeout=3,
                        reconnect_initial_delay=0.05, reconnect_max_delay=0.5)
    async with Pool(config) as pool:
        stop = asyncio.Event()
        outcomes = {"ok": 0, "error": 0, "ok_after_restart": 0}
        restarted = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                try:
                    async with pool.connection() as conn:
                        await conn.fetchval("SELECT 1")
                    outcomes["ok"] += 1
                    if restarted.is_set():
                        outcomes["ok_after_restart"] += 1
                except (PoolwardenError, asyncpg.PostgresError, asyncpg.InterfaceError,
                        asyncpg.InternalClientError, OSError):
                    outcomes["error"] += 1
                    await asyncio.sleep(0.01)

        workers = [asyncio.create_task(worker()) for _ in range(20)]
        await asyncio.sleep(0.3)
        before = pool.stats().connections_created_total
        await asyncio.to_thread(fresh_pg.restart, "fast")
        restarted.set()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=10)  # nobody is stuck
        stats = pool.stats()
    assert outcomes["ok_after_restart"] > 0
    assert stats.connections_created_total > before
    closed = stats.connections_closed_total
    assert closed.get("error", 0) + closed.get("ping_failed", 0) + closed.get(
        "server_restarted", 0) >= 5


async def test_connections_held_across_a_newer_server_are_closed_when_released(
    pg: EmbeddedPostgres, replica: EmbeddedPostgres, proxy: FaultProxy,
) -> None:
    """The address now leads to a server that started later (a failover behind one address):
    once the pool has seen it, a connection held from before is closed on release, not
    reused, and an idle one is closed at once."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=2, pool_size=3) as pool:
        held = await pool.acquire()
        before_pid = held.get_server_pid()
        proxy.target_port = replica.port  # new connections reach the standby
        newer = await pool.acquire()  # the idle one from before
        newest = await pool.acquire()  # a new connection: the pool learns of the newer server
        assert await newest.fetchval("SELECT pg_is_in_recovery()") is True
        assert pool.stats().server_restarts_total == 1
        await pool.release(held)
        await pool.release(newer)
        await pool.release(newest)
        closed = pool.stats().connections_closed_total
        assert closed.get("server_restarted") == 2
        for _ in range(3):
            async with pool.connection() as conn:
                assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
                assert conn.get_server_pid() != before_pid


async def test_server_down_gives_timeouts_caused_by_the_connection_error_then_recovers(
    fresh_pg: EmbeddedPostgres,
) -> None:
    config = config_for(fresh_pg, min_size=1, pool_size=2, acquire_timeout=0.5,
                        reconnect_initial_delay=0.05, reconnect_max_delay=0.2)
    async with Pool(config) as pool:
        await asyncio.to_thread(fresh_pg.stop, "fast")
        await asyncio.sleep(0.2)
        started = time.monotonic()
        # a timeout, or — once the reconnect attempts have failed in a row — the breaker's
        # fast refusal; either way caused by the connection error
        with pytest.raises((PoolTimeout, CircuitOpen)) as timed_out:
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        assert time.monotonic() - started < 3
        assert isinstance(timed_out.value.__cause__, ConnectionFailed)
        assert fresh_pg.password not in str(timed_out.value.__cause__)
        await asyncio.to_thread(fresh_pg.start)
        for _ in range(50):
            try:
                async with pool.connection(timeout=1) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
                break
            except (PoolTimeout, CircuitOpen):
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the pool did not recover after the server came back")


async def test_blackholed_server_is_bounded_by_command_and_connect_timeouts(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    config = config_for(proxy.dsn_for(pg.dsn), min_size=1, pool_size=2, command_timeout=0.5,
                        connect_timeout=0.5, acquire_timeout=1.0, release_timeout=0.5)
    async with Pool(config) as pool:
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        # A new connection cannot be made either: the acquire is bounded by its timeout.
        with pytest.raises(PoolTimeout):
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        assert time.monotonic() - started < 6
        proxy.heal()
        stats = pool.stats()
        assert stats.connections_in_use == 0


async def test_connection_reset_mid_transaction_discards_the_connection(
    pg: EmbeddedPostgres, proxy: FaultProxy, unique_name: str
) -> None:
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"CREATE TABLE {unique_name} (v int)")
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError, OSError)):
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(f"INSERT INTO {unique_name} VALUES (1)")
                proxy.reset_all()
                await conn.execute(f"INSERT INTO {unique_name} VALUES (2)")
        async with pool.connection() as conn:
            await assert_clean(conn)
            assert await conn.fetchval(f"SELECT count(*) FROM {unique_name}") == 0
        assert pool.stats().connections_closed_total.get("error") == 1


async def test_refused_connections_are_retried_with_backoff_not_a_stampede(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """200 callers wait 2 s on a pool whose server refuses connections: attempts are paced by
    the backoff (at most two at a time), not one per caller; the pool heals afterwards."""
    config = config_for(proxy.dsn_for(pg.dsn), min_size=0, pool_size=10, acquire_timeout=2.0,
                        reconnect_initial_delay=0.05, reconnect_max_delay=0.4)
    async with Pool(config) as pool:
        async with pool.connection():
            pass
        await pool.resize(min_size=0)
        proxy.refuse()
        await pool.release(await pool.acquire(), discard=True)  # now it holds none
        accepted_before = proxy.connections_accepted
        results = await asyncio.gather(
            *(pool.acquire() for _ in range(200)), return_exceptions=True
        )
        attempts = proxy.connections_accepted - accepted_before
        # waiting until their timeout, or failed fast once the breaker opened
        assert all(isinstance(r, PoolTimeout | CircuitOpen) for r in results)
        assert 1 <= attempts < 80
        assert pool.stats().connection_errors_total >= attempts - 2
        proxy.heal()
        for _ in range(30):
            with contextlib.suppress(PoolTimeout, CircuitOpen):
                async with pool.connection(timeout=0.5) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
                    break
            await asyncio.sleep(0.1)  # a refusal by the open breaker is immediate
        else:
            pytest.fail("no recovery after heal")
