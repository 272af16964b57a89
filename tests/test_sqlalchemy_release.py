"""The rollback that ends a SQLAlchemy checkout runs behind its release, against a real
PostgreSQL: the block's exit does not wait for the server's answer, the slot comes back
when it is through (the same connection, clean), nothing uncommitted survives, and a
rollback that fails or hangs back there costs the connection, never the slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import Integer, String, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pool_helpers import engine_on, open_pool, server_sessions, settled
from poolwarden import Pool, deadline
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.sqlalchemy import session_factory
from poolwarden.testing.proxy import FaultProxy


class _Base(DeclarativeBase):
    pass


class Entry(_Base):
    __tablename__ = "rolled_back_behind"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(40))


@pytest.fixture
async def admin(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg.dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {Entry.__tablename__}")
    await conn.execute(f"CREATE TABLE {Entry.__tablename__} (id int PRIMARY KEY, text text)")
    try:
        yield conn
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {Entry.__tablename__}")
        await conn.close()


async def _rows(admin: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await admin.fetch(f"SELECT id FROM {Entry.__tablename__} ORDER BY id")]


async def _state_of(admin: asyncpg.Connection, pid: int) -> str:
    return str(await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid))


INSERT = text(f"INSERT INTO {Entry.__tablename__} VALUES (1, 'uncommitted')")
PID = text("SELECT pg_backend_pid()")


async def test_the_exit_returns_before_the_rollback_is_answered(
    pg: EmbeddedPostgres, proxy: FaultProxy, admin: asyncpg.Connection
) -> None:
    """The server answers slowly when the block ends: the caller is out of the block while
    its transaction is still open on the server, the slot stays taken until the ROLLBACK is
    answered, and the next checkout then gets the same connection, clean."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1) as core, \
            engine_on(core) as engine:
        async with engine.connect() as conn:
            pid = (await conn.execute(PID)).scalar()
            await conn.execute(INSERT)
            proxy.delay(1.0)
        # out of the block; the ROLLBACK is still in the proxy
        assert await _state_of(admin, pid) == "idle in transaction"
        assert core.stats().connections_in_use == 1
        proxy.heal()
        async with engine.connect() as conn:  # waits for the slot
            assert (await conn.execute(PID)).scalar() == pid
            assert not (await conn.execute(text(
                "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"))).scalar()
        await settled(core)
        stats = core.stats()
        assert stats.restores_total == 2
        assert sum(stats.connections_closed_total.values()) == 0
    assert await _rows(admin) == []


async def test_a_rollback_that_fails_behind_the_release_costs_the_connection_only(
    pg: EmbeddedPostgres, proxy: FaultProxy, admin: asyncpg.Connection
) -> None:
    """The connection is reset while its ROLLBACK is on the way: the core counts it lost,
    opens another, and the engine goes on; the transaction died with the session."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1) as core, \
            engine_on(core) as engine:
        async with engine.connect() as conn:
            await conn.execute(INSERT)
            proxy.delay(1.0)
        assert proxy.reset_all() == 1
        proxy.heal()
        await settled(core)
        assert core.stats().connections_closed_total == {"error": 1}
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert await _rows(admin) == []


async def test_the_callers_deadline_does_not_bound_the_rollback(
    pg: EmbeddedPostgres, proxy: FaultProxy, admin: asyncpg.Connection
) -> None:
    """A deadline that passes while the rollback is still on the way belongs to the caller,
    who has left: the rollback finishes and the connection is kept."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1) as core, \
            engine_on(core) as engine:
        with deadline(0.5):
            async with engine.connect() as conn:
                pid = (await conn.execute(PID)).scalar()
                await conn.execute(INSERT)
                proxy.delay(1.0)
        await settled(core)
        proxy.heal()
        stats = core.stats()
        assert sum(stats.connections_closed_total.values()) == 0
        assert stats.restores_total == 1
        async with engine.connect() as conn:
            assert (await conn.execute(PID)).scalar() == pid
    assert await _rows(admin) == []


async def test_cancelling_the_caller_does_not_interrupt_its_rollback(
    pg: EmbeddedPostgres, proxy: FaultProxy, admin: asyncpg.Connection
) -> None:
    """The caller is cancelled while the rollback of its block is still on the way: the
    rollback is the pool's, not the caller's, and finishes; the connection is kept."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1) as core, \
            engine_on(core) as engine:
        left = asyncio.Event()

        async def work() -> int:
            async with engine.connect() as conn:
                pid = (await conn.execute(PID)).scalar()
                await conn.execute(INSERT)
                proxy.delay(1.0)
            left.set()
            await asyncio.sleep(30)
            return int(pid)

        task = asyncio.create_task(work())
        await left.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert core.stats().connections_in_use == 1  # the rollback is still on the way
        await settled(core)
        proxy.heal()
        assert sum(core.stats().connections_closed_total.values()) == 0
        assert core.stats().restores_total == 1
        sessions = await server_sessions(pg, core.config.application_name)
        assert [row["state"] for row in sessions] == ["idle"]
    assert await _rows(admin) == []


async def test_a_failed_transaction_is_rolled_back_behind_too(
    core: Pool, admin: asyncpg.Connection
) -> None:
    """A statement fails inside the block (the transaction is aborted on the server): the
    error reaches the caller as SQLAlchemy's, the aborted transaction is rolled back behind
    the release, and the same connection serves the next block."""
    async with engine_on(core) as engine:
        with pytest.raises(IntegrityError):
            async with engine.connect() as conn:
                pid = (await conn.execute(PID)).scalar()
                await conn.execute(INSERT)
                await conn.execute(INSERT)  # the same key again
        await settled(core)
        assert core.stats().restores_total == 1
        assert sum(core.stats().connections_closed_total.values()) == 0
        async with engine.connect() as conn:
            assert (await conn.execute(PID)).scalar() == pid
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert await _rows(admin) == []


async def test_an_explicit_rollback_is_not_left_behind(
    core: Pool, admin: asyncpg.Connection
) -> None:
    """``conn.rollback()`` inside the block is the caller's to wait for: the block goes on
    on the same connection in a new transaction, and what it then commits stays."""
    async with engine_on(core) as engine:
        async with engine.connect() as conn:
            await conn.execute(INSERT)
            await conn.rollback()
            await conn.execute(text(f"INSERT INTO {Entry.__tablename__} VALUES (2, 'kept')"))
            await conn.commit()
        # nothing was left open: the release found the connection clean
        assert core.stats().connections_in_use == 0
        assert core.stats().restores_total == 0
    assert await _rows(admin) == [2]


async def test_a_session_close_rolls_back_behind_after_its_savepoints(
    core: Pool, pg: EmbeddedPostgres, admin: asyncpg.Connection
) -> None:
    """A session closed with a savepoint open: the savepoint is rolled back first, then the
    root transaction behind the release; nothing of either survives, the server session is
    idle, and the connection serves the next session."""
    async with engine_on(core) as engine:
        factory = session_factory(engine)
        async with factory() as session:
            session.add(Entry(id=1, text="outer"))
            await session.flush()
            await session.begin_nested()
            session.add(Entry(id=2, text="inner"))
            await session.flush()
        await settled(core)
        assert core.stats().restores_total == 1
        sessions = await server_sessions(pg, core.config.application_name)
        assert {row["state"] for row in sessions} == {"idle"}
        async with factory() as session:
            assert await session.scalar(select(func.count()).select_from(Entry)) == 0
            session.add(Entry(id=3, text="committed"))
            await session.commit()
    assert await _rows(admin) == [3]


async def test_a_committed_block_leaves_nothing_behind(
    core: Pool, admin: asyncpg.Connection
) -> None:
    async with engine_on(core) as engine:
        async with engine.begin() as conn:
            await conn.execute(INSERT)
        assert core.stats().connections_in_use == 0
        assert core.stats().restores_total == 0
    assert await _rows(admin) == [1]


async def test_closing_the_pool_waits_for_a_rollback_behind(
    pg: EmbeddedPostgres, proxy: FaultProxy, admin: asyncpg.Connection
) -> None:
    """The pool is closed while a rollback is still on the way: close() waits for it, then
    closes the connection as it closes any other."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1) as core:
        async with engine_on(core) as engine, engine.connect() as conn:
            await conn.execute(INSERT)
            proxy.delay(0.5)
        await core.close()
        stats = core.stats()
        assert stats.restores_total == 1
        assert stats.connections_closed_total == {"pool_closed": 1}
    assert await _rows(admin) == []


@pytest.fixture
async def core(pg: EmbeddedPostgres) -> AsyncIterator[Pool]:
    async with open_pool(pg, min_size=1, pool_size=2) as pool:
        yield pool
