"""The AsyncEngine built on a core, against a real PostgreSQL: its connections and
transactions run their calls on kept greenlets (none created per checkout), option engines
and ``engine.begin()`` are of the same kind, and a cancellation during the rollback that
ends ``async with engine.connect()`` gives the slot back at once without committing
anything."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pool_helpers import engine_on, open_pool, server_sessions
from poolwarden import Pool
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.sqlalchemy import _greenlets
from poolwarden.sqlalchemy._engine import (
    CoreAsyncConnection,
    CoreAsyncEngine,
    CoreAsyncTransaction,
)
from poolwarden.testing.proxy import FaultProxy


@pytest.fixture
async def core(pg: EmbeddedPostgres) -> AsyncIterator[Pool]:
    async with open_pool(pg, min_size=1, pool_size=2) as pool:
        yield pool


@pytest.fixture
async def engine(core: Pool) -> AsyncIterator[AsyncEngine]:
    async with engine_on(core) as built:
        yield built


async def test_connections_transactions_and_option_engines_are_the_cores(
    engine: AsyncEngine,
) -> None:
    assert isinstance(engine, CoreAsyncEngine)
    async with engine.begin() as conn:
        assert isinstance(conn, CoreAsyncConnection)
        assert isinstance(conn.get_transaction(), CoreAsyncTransaction)
        assert (await conn.scalar(text("SELECT 1"))) == 1
    options = engine.execution_options(isolation_level="REPEATABLE READ")
    assert isinstance(options, CoreAsyncEngine)
    async with options.connect() as conn:
        level = await conn.scalar(text("SHOW transaction_isolation"))
        assert level == "repeatable read"
        async with conn.begin_nested() as savepoint:
            assert isinstance(savepoint, CoreAsyncTransaction)
            await conn.execute(text("SELECT 1"))


async def test_checkouts_create_no_greenlet_per_call(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hundred checkouts, each connect, execute, commit and close: SQLAlchemy's
    greenlet_spawn would make four hundred greenlets; the kept ones serve them all."""
    created = 0
    original = _greenlets._Worker.__init__

    def counting(self: _greenlets._Worker) -> None:
        nonlocal created
        created += 1
        original(self)

    async with engine.connect() as conn:  # a first checkout sets the dialect up
        await conn.execute(text("SELECT 1"))
    monkeypatch.setattr(_greenlets._Worker, "__init__", counting)
    for n in range(100):
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT CAST(:n AS int)"), {"n": n})).scalar() == n
            await conn.commit()
    assert created <= 1


async def test_a_cancellation_during_the_exit_rollback_gives_the_slot_back_at_once(
    pg: EmbeddedPostgres, proxy: FaultProxy, unique_name: str
) -> None:
    """A row inserted, then the block ends while the server answers slowly: the task is
    cancelled during the ROLLBACK of the exit. The cancellation reaches the caller at once
    (not after the rollback), the connection goes back to the core to be closed, the row
    was never committed, and the engine goes on working."""
    admin = await asyncpg.connect(pg.dsn)
    try:
        await admin.execute(f"CREATE TABLE {unique_name} (id int)")
        async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1,
                             command_timeout=10) as core, engine_on(core) as engine:
            exiting = asyncio.Event()

            async def work() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text(f"INSERT INTO {unique_name} VALUES (1)"))
                    proxy.delay(1.0)
                    exiting.set()

            task = asyncio.create_task(work())
            await exiting.wait()
            await asyncio.sleep(0.2)  # the ROLLBACK is on its way through the slow proxy
            cancelled_at = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - cancelled_at < 0.5
            stats = core.stats()
            assert stats.connections_in_use == 0
            assert sum(stats.connections_closed_total.values()) == 1
            proxy.heal()
            assert await admin.fetchval(f"SELECT count(*) FROM {unique_name}") == 0
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
            # the interrupted session is gone from the server, not left in a transaction
            for _ in range(50):
                sessions = await server_sessions(pg, core.config.application_name)
                if all(row["state"] == "idle" for row in sessions):
                    break
                await asyncio.sleep(0.1)
            assert all(row["state"] == "idle" for row in sessions), sessions
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {unique_name}")
        await admin.close()
