"""The fault suite's scenarios that the pool, transaction and protection tests do not
already cover (terminated backends, fast restart under load, server down and back, write
transactions cut by resets: see test_pool_faults.py, test_transactions.py and
test_pool_protection.py). Real servers, our own TCP fault proxy."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest

from pool_helpers import config_for, open_pool, server_sessions
from poolwarden import (
    CircuitOpen,
    ConnectionFailed,
    DeadlineExceeded,
    Pool,
    PoolTimeout,
    deadline,
)
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.testing import FaultProxy


async def test_blackhole_every_call_is_bounded_by_its_deadline(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Proves: with the network silently dropping everything, a statement in flight and a
    new acquire both end at the caller's deadline (not at the 30 s command timeout)."""
    config = config_for(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1, command_timeout=30,
                        connect_timeout=30, acquire_timeout=30, release_timeout=0.5)
    async with Pool(config) as pool:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.3), pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.3), pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        assert time.monotonic() - started < 10  # two 0.3 s budgets, not 30 s timeouts
        proxy.heal()


async def test_added_latency_slows_calls_but_deadlines_still_hold(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Proves: 100 ms of added latency each way is survived by calls with room for it,
    and a call whose budget is shorter than one round trip fails with DeadlineExceeded and
    leaves the pool clean (the statement was cancelled, the connection reused)."""
    config = config_for(proxy.dsn_for(pg.dsn), min_size=1, pool_size=2)
    async with Pool(config) as pool:
        proxy.delay(0.1)
        async with deadline(5.0), pool.connection() as conn:
            assert await conn.fetchval("SELECT 42") == 42
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.05), pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        proxy.heal()
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            assert not conn.is_in_transaction()
        assert pool.stats().connections_in_use == 0


async def test_server_max_connections_reached_gives_typed_errors_then_recovers() -> None:
    """Proves: when the server has no connection slot left ("too many clients"), acquires
    fail with typed errors caused by ConnectionFailed (no hang, no password) and, once
    slots are freed, the pool connects again."""
    with EmbeddedPostgres(max_connections=6) as server:
        # superuser_reserved_connections (3) are kept for the admin: fill the rest
        hogs = []
        for _ in range(10):
            try:
                hogs.append(await asyncpg.connect(server.dsn))
            except (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError):
                break
        config = config_for(server, min_size=0, pool_size=2, acquire_timeout=1.0,
                            reconnect_initial_delay=0.02, reconnect_max_delay=0.1)
        pool = Pool(config)
        await pool.open(wait=False)
        try:
            started = time.monotonic()
            with pytest.raises((PoolTimeout, CircuitOpen)) as failed:
                await pool.acquire()
            assert time.monotonic() - started < 5
            assert isinstance(failed.value.__cause__, ConnectionFailed)
            assert "too many" in str(failed.value.__cause__).lower() or "reserved" in str(
                failed.value.__cause__).lower()
            assert server.password not in str(failed.value.__cause__)
            for hog in hogs:
                await hog.close()
            for _ in range(100):
                try:
                    async with pool.connection(timeout=1.0) as conn:
                        assert await conn.fetchval("SELECT 1") == 1
                    break
                except (PoolTimeout, CircuitOpen):
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("no recovery after slots were freed")
        finally:
            await pool.close()


async def test_cancellation_storm_leaves_the_pool_idle_with_nothing_leaked(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """Proves: 100 tasks doing multi-statement transactions through a pool of 5, half of
    them cancelled at random moments (waiting, mid-statement, mid-commit): afterwards every
    connection is idle in the pool, none is in use, the server shows no session idle in a
    transaction, and every row belongs to a task that finished (no half transactions)."""
    rng = random.Random(7)
    async with open_pool(pg, min_size=5, pool_size=5) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"CREATE TABLE {unique_name} (task int, step int)")

        async def work(task: int) -> int:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(f"INSERT INTO {unique_name} VALUES ($1, 1)", task)
                await conn.execute("SELECT pg_sleep($1)", rng.uniform(0, 0.02))
                await conn.execute(f"INSERT INTO {unique_name} VALUES ($1, 2)", task)
            return task

        tasks = [asyncio.create_task(work(i)) for i in range(100)]
        for task in rng.sample(tasks, 50):
            await asyncio.sleep(rng.uniform(0, 0.01))
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        finished = {r for r in results if isinstance(r, int)}
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        assert cancelled >= 1
        assert not [r for r in results if isinstance(r, BaseException)
                    and not isinstance(r, asyncio.CancelledError)]
        for _ in range(100):  # shielded rollbacks of cancelled holders finish in the background
            if pool.stats().connections_in_use == 0:
                break
            await asyncio.sleep(0.02)
        stats = pool.stats()
        assert stats.connections_in_use == 0
        assert stats.requests_waiting == 0
        sessions = await server_sessions(pg, pool.config.application_name)
        assert all(s["state"] == "idle" for s in sessions)
        async with pool.connection() as conn:
            rows = await conn.fetch(f"SELECT task, count(*) AS n FROM {unique_name} GROUP BY task")
    by_task = {r["task"]: r["n"] for r in rows}
    # a task cancelled after its COMMIT may have rows: what matters is atomicity
    assert all(n == 2 for n in by_task.values())  # never half a transaction
    assert finished <= set(by_task)  # every finished task committed both rows
