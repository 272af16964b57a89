"""Cancellation at every await of acquire, query, transaction and release.

Each scenario is started and cancelled after a growing number of event-loop steps (and then
after growing real delays), so that the cancellation lands on every await in turn: while
queued, while pinging, mid-query, mid-transaction, mid-rollback on release. After each one
the pool must be back to idle with no slot leaked, and every connection it hands out must be
clean — checked through the pool's stats and the server's own view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from pool_helpers import assert_clean, open_pool, server_sessions
from poolwarden import Pool
from poolwarden.embedded import EmbeddedPostgres

Scenario = Callable[[Pool, str], Awaitable[None]]


async def query(pool: Pool, table: str) -> None:
    async with pool.connection() as conn:
        await conn.fetchval("SELECT count(*) FROM generate_series(1, 2000)")


async def write_in_transaction(pool: Pool, table: str) -> None:
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        await conn.execute("SELECT pg_sleep(0.002)")
        await conn.execute(f"INSERT INTO {table} VALUES (2)")


async def raw_begin_without_commit(pool: Pool, table: str) -> None:
    conn = await pool.acquire()
    try:
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {table} VALUES (3)")
    finally:
        await pool.release(conn)


async def sleep_query(pool: Pool, table: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_sleep(0.01)")


SCENARIOS: dict[str, Scenario] = {
    "query": query,
    "transaction": write_in_transaction,
    "raw_begin": raw_begin_without_commit,
    "sleep": sleep_query,
}


async def _settle(pool: Pool) -> None:
    """Wait (bounded) for shielded restores started by cancelled holders to finish."""
    for _ in range(200):
        if pool.stats().connections_in_use == 0:
            return
        await asyncio.sleep(0.01)


async def _check_all_clean(pool: Pool) -> None:
    stats = pool.stats()
    assert stats.connections_in_use == 0, stats
    assert stats.requests_waiting == 0, stats
    held = [await pool.acquire(timeout=5) for _ in range(pool.config.pool_size)]
    try:
        for conn in held:
            await assert_clean(conn)
    finally:
        for conn in held:
            await pool.release(conn)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_cancel_at_every_step_leaks_nothing_and_hands_on_nothing_dirty(
    pg: EmbeddedPostgres, unique_name: str, name: str
) -> None:
    scenario = SCENARIOS[name]
    async with open_pool(pg, min_size=2, pool_size=2, ping_after_idle=0.0005) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"CREATE TABLE {unique_name} (v int)")
        cancelled = 0
        delays: list[tuple[int, float]] = [(steps, 0.0) for steps in range(40)]
        delays += [(0, ms / 1000) for ms in (0.2, 0.5, 1, 2, 3, 5, 8, 12)]
        for steps, delay in delays:
            task = asyncio.create_task(scenario(pool, unique_name))
            for _ in range(steps):
                await asyncio.sleep(0)
            if delay:
                await asyncio.sleep(delay)
            if not task.done():
                task.cancel()
                cancelled += 1
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await _settle(pool)
            await _check_all_clean(pool)
        # the scenario really was interrupted, many times (how many depends on the machine)
        assert cancelled >= 5
        async with pool.connection() as conn:
            # Only whole transactions ever committed: rows come in complete (1, 2) pairs.
            ones = await conn.fetchval(f"SELECT count(*) FROM {unique_name} WHERE v = 1")
            twos = await conn.fetchval(f"SELECT count(*) FROM {unique_name} WHERE v = 2")
            threes = await conn.fetchval(f"SELECT count(*) FROM {unique_name} WHERE v = 3")
            assert ones == twos
            assert threes == 0  # never committed, always rolled back
        sessions = await server_sessions(pg, pool.config.application_name)
        assert len(sessions) == pool.stats().connections
        assert all(row["state"] != "idle in transaction" for row in sessions)


async def test_cancelled_waiters_leave_the_queue_and_later_waiters_are_served(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        held = await pool.acquire()
        waiters = [asyncio.create_task(pool.acquire(timeout=5)) for _ in range(10)]
        await asyncio.sleep(0.01)
        for task in waiters[::2]:
            task.cancel()
        await asyncio.sleep(0)
        assert pool.stats().requests_waiting == 5
        await pool.release(held)
        for task in waiters[1::2]:
            await pool.release(await task)
        for task in waiters[::2]:
            with pytest.raises(asyncio.CancelledError):
                await task
        stats = pool.stats()
        assert stats.acquire_cancelled_total == 5
        assert (stats.connections_in_use, stats.requests_waiting) == (0, 0)


async def test_waiter_cancelled_in_the_step_it_was_served_passes_the_connection_on(
    pg: EmbeddedPostgres,
) -> None:
    """The acknowledged handoff: a connection handed to a waiter that is cancelled before
    it runs goes to the next waiter instead of being lost."""
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        held = await pool.acquire()
        first = asyncio.create_task(pool.acquire(timeout=5))
        second = asyncio.create_task(pool.acquire(timeout=5))
        await asyncio.sleep(0.01)
        await pool.release(held)  # handed to `first` ...
        first.cancel()  # ... which is cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await first
        conn = await asyncio.wait_for(second, 5)
        await pool.release(conn)
        assert pool.stats().connections == 1


async def test_holder_cancelled_during_release_restore_still_returns_the_slot(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, min_size=1, pool_size=1) as pool:
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        release = asyncio.create_task(pool.release(conn))
        await asyncio.sleep(0)
        release.cancel()
        with pytest.raises(asyncio.CancelledError):
            await release
        again = await pool.acquire(timeout=5)
        await assert_clean(again)
        await pool.release(again)
