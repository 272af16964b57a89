"""The pool core against a real PostgreSQL: fairness, limits, deadlines, lifetime, release."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from pool_helpers import assert_clean, config_for, open_pool, server_sessions
from poolwarden import (
    ConnectionFailed,
    Pool,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    ResetPolicy,
)
from poolwarden.embedded import EmbeddedPostgres


async def test_open_warms_min_size_and_stats_show_it(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=3, pool_size=5) as pool:
        stats = pool.stats()
        assert (stats.connections, stats.connections_idle, stats.connections_in_use) == (3, 3, 0)
        assert stats.connections_created_total == 3
        assert len(await server_sessions(pg, pool.config.application_name)) == 3
        assert "idle=3" in repr(pool)


async def test_fifo_fairness_serves_100_waiters_in_arrival_order(pg: EmbeddedPostgres) -> None:
    """100 tasks over 10 connections, each holding ~50 ms, 10 s timeout: no timeouts and
    every task is served in the order it asked."""
    async with open_pool(pg, min_size=10, pool_size=10, acquire_timeout=10) as pool:
        served: list[int] = []

        async def user(i: int) -> None:
            async with pool.connection() as conn:
                served.append(i)
                await conn.execute("SELECT pg_sleep(0.05)")

        tasks = []
        for i in range(100):
            tasks.append(asyncio.create_task(user(i)))
            await asyncio.sleep(0)  # each task reaches acquire() before the next starts
        await asyncio.gather(*tasks)
        stats = pool.stats()
    assert served == list(range(100))
    assert stats.acquire_timeouts_total == 0
    assert stats.acquires_total == 100
    assert stats.acquires_waited_total >= 90


async def test_released_connection_goes_to_oldest_waiter_not_a_newcomer(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        holder = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        await pool.release(holder)
        # A newcomer arriving after the release must queue behind the served waiter.
        newcomer = asyncio.create_task(pool.acquire(timeout=0.2))
        got = await waiter
        assert got is holder
        with pytest.raises(PoolTimeout):
            await newcomer
        await pool.release(got)


async def test_full_wait_queue_refuses_at_once_with_pool_exhausted(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, pool_size=1, max_waiting=2) as pool:
        held = await pool.acquire()
        waiters = [asyncio.create_task(pool.acquire(timeout=5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(PoolExhausted) as refused:
            await pool.acquire()
        assert refused.value.node == "test"
        assert refused.value.state is not None
        assert refused.value.state.waiting == 2
        assert "max_waiting=2" in str(refused.value)
        await pool.release(held)
        for task in waiters:
            await pool.release(await task)
        assert pool.stats().acquire_refusals_total == 1


async def test_timeout_error_names_node_wait_and_pool_state(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, pool_size=2, name="orders") as pool:
        held = [await pool.acquire(), await pool.acquire()]
        with pytest.raises(PoolTimeout) as timed_out:
            await pool.acquire(timeout=0.1)
        error = timed_out.value
        assert isinstance(error, TimeoutError)
        assert error.node == "orders"
        assert error.waited_s >= 0.1
        assert error.state is not None
        assert (error.state.in_use, error.state.idle, error.state.max_size) == (2, 0, 2)
        assert "'orders'" in str(error)
        assert "in_use=2" in str(error)
        for conn in held:
            await pool.release(conn)
        assert pool.stats().acquire_timeouts_total == 1


async def test_deadline_bounds_the_wait_and_an_expired_one_refuses_without_waiting(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, pool_size=1) as pool:
        with pytest.raises(PoolTimeout) as expired:
            await pool.acquire(deadline=time.monotonic() - 1)
        assert expired.value.waited_s == 0.0
        held = await pool.acquire()
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            await pool.acquire(timeout=30, deadline=time.monotonic() + 0.1)
        assert time.monotonic() - started < 5  # the deadline won over the 30 s timeout
        await pool.release(held)


async def test_overflow_connections_close_when_they_go_idle(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=2, max_overflow=2) as pool:
        held = [await pool.acquire() for _ in range(4)]
        assert pool.stats().connections_overflow == 2
        with pytest.raises(PoolTimeout):
            await pool.acquire(timeout=0.05)
        for conn in held:
            await pool.release(conn)
        stats = pool.stats()
        assert (stats.connections, stats.connections_idle) == (2, 2)
        assert stats.connections_closed_total == {"overflow": 2}


async def test_release_rolls_back_an_open_transaction(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        await conn.execute("SELECT pg_current_xact_id()")
        await pool.release(conn)
        async with pool.connection() as again:
            assert again is conn
            await assert_clean(again)
        assert pool.stats().restores_total == 1


async def test_release_after_failed_transaction_hands_on_a_clean_connection(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with pool.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("SELECT 1/0")
        async with pool.connection() as conn:
            await assert_clean(conn)


async def test_default_reset_keeps_session_settings_and_reset_true_clears_them(
    pg: EmbeddedPostgres,
) -> None:
    """The documented TRANSACTION policy: session SETs survive unless reset is asked for."""
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("SET work_mem = '7MB'")
        async with pool.connection(reset=True) as conn:
            assert await conn.fetchval("SHOW work_mem") == "7MB"
        async with pool.connection() as conn:
            assert await conn.fetchval("SHOW work_mem") != "7MB"


async def test_always_reset_policy_clears_session_state_every_time(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=1, reset=ResetPolicy.ALWAYS) as pool:
        async with pool.connection() as conn:
            await conn.execute("SET work_mem = '7MB'")
        async with pool.connection() as conn:
            assert await conn.fetchval("SHOW work_mem") != "7MB"


async def test_connection_setup_applies_timezone_timeouts_and_application_name(
    pg: EmbeddedPostgres,
) -> None:
    async def init(conn: asyncpg.Connection) -> None:
        await conn.execute("SET search_path = pg_catalog")

    async with open_pool(
        pg, statement_timeout=2.5, lock_timeout=1, idle_in_transaction_timeout=60, init=init,
        timezone="UTC",
    ) as pool, pool.connection() as conn:
        settings = await conn.fetchrow(
            "SELECT current_setting('TimeZone') tz, current_setting('statement_timeout') st,"
            " current_setting('lock_timeout') lt,"
            " current_setting('idle_in_transaction_session_timeout') it,"
            " current_setting('application_name') app, current_setting('search_path') sp"
        )
    assert settings is not None
    assert settings["tz"] == "UTC"
    assert settings["st"] == "2500ms"
    assert settings["lt"] == "1s"
    assert settings["it"] == "1min"
    assert settings["app"] == pool.config.application_name
    assert settings["sp"] == "pg_catalog"


async def test_release_twice_or_into_another_pool_is_an_error(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool, open_pool(pg) as other:
        conn = await pool.acquire()
        with pytest.raises(PoolError, match="not from this pool"):
            await other.release(conn)
        await pool.release(conn)
        with pytest.raises(PoolError, match="released twice"):
            await pool.release(conn)
        plain = await asyncpg.connect(pg.dsn)  # not a pool's connection at all
        try:
            with pytest.raises(PoolError, match="not from this pool"):
                await pool.release(plain)
        finally:
            await plain.close()


async def test_discard_closes_the_connection_and_counts_it(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=2) as pool:
        conn = await pool.acquire()
        pid = conn.get_server_pid()
        await pool.release(conn, discard=True)
        assert pool.stats().connections_closed_total == {"discarded": 1}
        async with pool.connection() as fresh:
            assert fresh.get_server_pid() != pid


async def test_resize_grows_and_shrinks_at_runtime(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=2) as pool:
        held = [await pool.acquire() for _ in range(2)]
        waiter = asyncio.create_task(pool.acquire(timeout=5))
        await asyncio.sleep(0.01)
        await pool.resize(pool_size=3)
        third = await waiter  # the new room went to the waiter
        assert pool.stats().connections == 3
        for conn in [*held, third]:
            await pool.release(conn)
        await pool.resize(pool_size=1)
        stats = pool.stats()
        assert (stats.pool_size, stats.connections) == (1, 1)
        assert stats.connections_closed_total.get("resized", 0) >= 1


async def test_max_lifetime_replaces_connections(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=1, max_lifetime=0.2, lifetime_jitter=0) as pool:
        async with pool.connection() as conn:
            first = conn.get_server_pid()
        await asyncio.sleep(0.3)
        async with pool.connection() as conn:
            assert conn.get_server_pid() != first
        assert pool.stats().connections_closed_total.get("lifetime", 0) >= 1


async def test_lifetime_is_checked_at_release_too(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=0, pool_size=1, max_lifetime=0.1, lifetime_jitter=0,
                         maintenance_interval=60) as pool:
        conn = await pool.acquire()
        await asyncio.sleep(0.15)
        await pool.release(conn)
        assert pool.stats().connections_closed_total == {"lifetime": 1}


async def test_idle_timeout_shrinks_to_min_size(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=4, idle_timeout=0.1) as pool:
        held = [await pool.acquire() for _ in range(4)]
        for conn in held:
            await pool.release(conn)
        assert pool.stats().connections == 4
        for _ in range(100):
            await asyncio.sleep(0.05)
            if pool.stats().connections == 1:
                break
        stats = pool.stats()
        assert stats.connections == 1
        assert stats.connections_closed_total == {"idle": 3}


async def test_pre_ping_only_after_the_idle_window(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=1, ping_after_idle=0.2) as pool:
        for _ in range(5):
            async with pool.connection():
                pass
        assert pool.stats().pings_total == 0  # reused at once: no ping
        await asyncio.sleep(0.3)
        async with pool.connection():
            pass
        assert pool.stats().pings_total == 1


async def test_pre_ping_can_be_turned_off(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=1, pool_size=1, ping_after_idle=0, pre_ping=False) as pool:
        await asyncio.sleep(0.05)
        async with pool.connection():
            pass
        assert pool.stats().pings_total == 0


async def test_close_drains_in_flight_work_then_closes_everything(pg: EmbeddedPostgres) -> None:
    pool = Pool(config_for(pg, min_size=2, pool_size=3))
    await pool.open()
    finished = asyncio.Event()

    async def in_flight() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.2)")
        finished.set()

    task = asyncio.create_task(in_flight())
    await asyncio.sleep(0.05)
    await pool.close(timeout=5)
    assert finished.is_set()
    await task
    with pytest.raises(PoolClosed):
        await pool.acquire()
    assert pool.stats().connections == 0
    for _ in range(50):
        if not await server_sessions(pg, pool.config.application_name):
            break
        await asyncio.sleep(0.02)
    assert await server_sessions(pg, pool.config.application_name) == []


async def test_close_after_drain_timeout_terminates_holders(pg: EmbeddedPostgres) -> None:
    pool = Pool(config_for(pg, min_size=1, pool_size=1))
    await pool.open()
    conn = await pool.acquire()
    await pool.close(timeout=0.05)
    assert conn.is_closed()
    await pool.release(conn)  # a late release of a terminated connection is harmless
    assert pool.stats().connections_closed_total == {"pool_closed": 1}


async def test_close_wakes_waiters_with_pool_closed(pg: EmbeddedPostgres) -> None:
    pool = Pool(config_for(pg, pool_size=1))
    await pool.open()
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire(timeout=10))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(pool.close(timeout=1))
    with pytest.raises(PoolClosed):
        await waiter
    await pool.release(held)
    await closing


async def test_open_with_wrong_password_fails_fast_without_the_password(
    pg: EmbeddedPostgres,
) -> None:
    bad = pg.dsn.replace(pg.dsn.split("://", 1)[1].split("@", 1)[0],
                         f"{pg.user}:Wr0ng%40secret%3Apw")
    pool = Pool(config_for(bad))
    with pytest.raises(ConnectionFailed) as failed:
        await pool.open()
    text = str(failed.value)
    assert "Wr0ng" not in text
    assert "Wr0ng" not in repr(pool.config)
    assert "password" in text.lower()  # the server said why


async def test_open_without_wait_warms_in_background(pg: EmbeddedPostgres) -> None:
    pool = Pool(config_for(pg, min_size=2, pool_size=2))
    await pool.open(wait=False)
    async with pool.connection() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    await pool.close()


async def test_acquire_before_open_is_a_clear_error(pg: EmbeddedPostgres) -> None:
    pool = Pool(config_for(pg))
    with pytest.raises(PoolClosed, match="not open"):
        await pool.acquire()
    assert "new" in repr(pool)
