"""SQLAlchemy on the pool core, against a real PostgreSQL: sessions commit and roll back,
checkouts obey the core's limits and show in its stats, dead and dirty connections are never
handed on, the raw path shares the core, and the sync engine carries the same settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, exc, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

from pool_helpers import engine_on, open_pool, terminate
from poolwarden import Pool, PoolExhausted, PoolTimeout
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.pool import PoolConfig
from poolwarden.sqlalchemy import (
    create_async_engine_on,
    create_sync_engine,
    session_factory,
    session_scope,
)


@pytest.fixture
async def core(pg: EmbeddedPostgres) -> AsyncIterator[Pool]:
    async with open_pool(pg, pool_size=3) as pool:
        yield pool


@pytest.fixture
async def items(core: Pool, unique_name: str) -> AsyncIterator[Table]:
    table = Table(
        unique_name, MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
        Column("data", JSONB),
    )
    async with engine_on(core) as engine:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        yield table
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not reached")


async def hold_session(factory_engine: AsyncEngine, started: asyncio.Event,
                       release: asyncio.Event) -> None:
    async with session_scope(session_factory(factory_engine)) as session:
        await session.execute(text("SELECT 1"))
        started.set()
        await release.wait()


async def test_crud_through_a_session_scope_commits(core: Pool, items: Table) -> None:
    async with engine_on(core) as engine:
        factory = session_factory(engine)
        async with session_scope(factory) as session:
            await session.execute(items.insert(), [{"id": 1, "name": "a", "data": {"k": [1]}},
                                                   {"id": 2, "name": "b", "data": None}])
        async with session_scope(factory) as session:
            await session.execute(items.update().where(items.c.id == 1).values(name="a2"))
            await session.execute(items.delete().where(items.c.id == 2))
        async with session_scope(factory) as session:
            rows = (await session.execute(select(items).order_by(items.c.id))).all()
    assert [tuple(row) for row in rows] == [(1, "a2", {"k": [1]})]
    assert core.stats().connections_in_use == 0


async def test_an_exception_in_the_scope_rolls_back_and_propagates(
    core: Pool, items: Table
) -> None:
    async with engine_on(core) as engine:
        factory = session_factory(engine)
        with pytest.raises(RuntimeError, match="boom"):
            async with session_scope(factory) as session:
                await session.execute(items.insert().values(id=1, name="lost"))
                raise RuntimeError("boom")
        async with session_scope(factory) as session:
            assert (await session.execute(select(items))).all() == []
    stats = core.stats()
    assert stats.connections_in_use == 0
    # SQLAlchemy rolled back on its side; the core found the connection clean: one round trip.
    assert stats.restores_total == 0


async def test_session_checkouts_are_counted_in_the_core_stats(core: Pool) -> None:
    before = core.stats().acquires_total
    async with engine_on(core) as engine:
        factory = session_factory(engine)
        for _ in range(5):
            async with session_scope(factory) as session:
                assert await session.scalar(text("SELECT 1")) == 1
    stats = core.stats()
    assert stats.acquires_total - before == 5
    assert stats.connections_in_use == 0
    assert stats.connections_created_total == 1  # one connection, reused five times


async def test_limits_apply_a_third_session_waits_and_a_fourth_is_refused(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, pool_size=2, max_overflow=0, max_waiting=1) as core, \
            engine_on(core) as engine:
        release = asyncio.Event()
        started = [asyncio.Event(), asyncio.Event()]
        holders = [asyncio.create_task(hold_session(engine, s, release)) for s in started]
        for event in started:
            await event.wait()
        third_started = asyncio.Event()
        third = asyncio.create_task(hold_session(engine, third_started, release))
        await until(lambda: core.stats().requests_waiting == 1)
        assert not third_started.is_set()

        with pytest.raises(PoolExhausted):
            async with session_scope(session_factory(engine)) as session:
                await session.execute(text("SELECT 1"))

        release.set()
        await asyncio.gather(*holders, third)
        stats = core.stats()
    assert third_started.is_set()
    assert stats.acquire_refusals_total == 1
    assert stats.acquires_waited_total >= 1
    assert stats.connections_in_use == 0


async def test_a_session_cancelled_while_waiting_for_a_connection_leaks_no_slot(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, pool_size=1, max_overflow=0) as core, engine_on(core) as engine:
        release, started = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold_session(engine, started, release))
        await started.wait()
        waiter_started = asyncio.Event()
        waiter = asyncio.create_task(hold_session(engine, waiter_started, release))
        await until(lambda: core.stats().requests_waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        await holder
        async with session_scope(session_factory(engine)) as session:  # the slot is there
            assert await session.scalar(text("SELECT 1")) == 1
        stats = core.stats()
    assert not waiter_started.is_set()
    assert stats.acquire_cancelled_total == 1
    assert (stats.requests_waiting, stats.connections_in_use) == (0, 0)


async def test_acquire_timeout_raises_pool_timeout_from_session_execute(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, pool_size=1, max_overflow=0, acquire_timeout=0.2) as core, \
            engine_on(core) as engine:
        release, started = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold_session(engine, started, release))
        await started.wait()
        with pytest.raises(PoolTimeout) as caught:  # our type: not wrapped by SQLAlchemy
            async with session_scope(session_factory(engine)) as session:
                await session.execute(text("SELECT 1"))
        assert isinstance(caught.value, TimeoutError)
        assert "in_use=1" in str(caught.value)
        release.set()
        await holder
        assert core.stats().acquire_timeouts_total == 1


async def test_a_backend_terminated_under_a_session_is_invalidated_and_removed_from_the_core(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, pool_size=2) as core, engine_on(core) as engine:
        factory = session_factory(engine)
        with pytest.raises(exc.DBAPIError) as caught:
            async with session_scope(factory) as session:
                first_pid = await session.scalar(text("SELECT pg_backend_pid()"))
                assert await terminate(pg, core.config.application_name) == 1
                await session.execute(text("SELECT 1"))
        assert caught.value.connection_invalidated

        async with session_scope(factory) as session:
            second_pid = await session.scalar(text("SELECT pg_backend_pid()"))
        stats = core.stats()
    assert second_pid != first_pid
    assert stats.connections_closed_total == {"error": 1}
    assert stats.connections_in_use == 0


async def test_a_backend_terminated_while_idle_never_reaches_a_session(
    pg: EmbeddedPostgres,
) -> None:
    async with open_pool(pg, pool_size=2) as core, engine_on(core) as engine:
        factory = session_factory(engine)
        async with session_scope(factory) as session:
            first_pid = await session.scalar(text("SELECT pg_backend_pid()"))
        assert await terminate(pg, core.config.application_name) == 1
        await asyncio.sleep(0.05)  # let the client see the server's goodbye
        async with session_scope(factory) as session:
            second_pid = await session.scalar(text("SELECT pg_backend_pid()"))
        stats = core.stats()
    assert second_pid != first_pid
    assert sum(stats.connections_closed_total.values()) == 1
    assert stats.connections_in_use == 0


async def test_a_session_cancelled_mid_query_in_a_transaction_hands_on_no_dirty_connection(
    pg: EmbeddedPostgres, items: Table, core: Pool
) -> None:
    async with open_pool(pg, pool_size=1, max_overflow=0) as small, engine_on(small) as engine:
        factory = session_factory(engine)
        in_query = asyncio.Event()

        async def victim() -> None:
            async with session_scope(factory) as session:
                await session.execute(items.insert().values(id=1, name="uncommitted"))
                in_query.set()
                await session.execute(text("SELECT pg_sleep(30)"))

        task = asyncio.create_task(victim())
        await in_query.wait()
        await asyncio.sleep(0.1)  # inside pg_sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async with session_scope(factory) as session:
            assert await session.scalar(text("SELECT pg_current_xact_id_if_assigned() IS NULL"))
            assert (await session.execute(select(items))).all() == []
        async with small.connection() as conn:
            assert not conn.is_in_transaction()
        assert small.stats().connections_in_use == 0


async def test_a_session_cancelled_between_queries_rolls_back_before_reuse(
    pg: EmbeddedPostgres, items: Table
) -> None:
    async with open_pool(pg, pool_size=1, max_overflow=0) as small, engine_on(small) as engine:
        factory = session_factory(engine)
        holding = asyncio.Event()

        async def victim() -> None:
            async with session_scope(factory) as session:
                await session.execute(items.insert().values(id=1, name="uncommitted"))
                holding.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(victim())
        await holding.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with small.connection() as conn:  # the raw path gets the same connection
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned() IS NULL")
            assert await conn.fetchval(f'SELECT count(*) FROM "{items.name}"') == 0
        assert small.stats().connections_closed_total == {}  # cleaned, not thrown away


async def test_raw_and_sqlalchemy_paths_share_the_core_concurrently(core: Pool) -> None:
    async with engine_on(core) as engine:
        factory = session_factory(engine)
        before = core.stats().acquires_total

        async def through_session(i: int) -> object:
            async with session_scope(factory) as session:
                await session.execute(text("SELECT pg_sleep(0.01)"))
                return await session.scalar(text("SELECT CAST(:i AS int)"), {"i": i})

        async def raw(i: int) -> object:
            async with core.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.01)")
                return await conn.fetchval("SELECT $1::int", i)

        results = await asyncio.gather(
            *(through_session(i) if i % 2 else raw(i) for i in range(40))
        )
        # JSON reads the same on both paths whichever path used the connection first.
        async with core.connection() as conn:
            raw_json = await conn.fetchval("""SELECT '{"k": 1}'::jsonb""")
        stats = core.stats()
    assert results == list(range(40))
    assert raw_json == '{"k": 1}'
    assert stats.acquires_total - before == 41
    assert stats.connections_in_use == 0
    assert stats.connections <= stats.max_size


async def test_dispose_leaves_the_core_open(core: Pool) -> None:
    engine = create_async_engine_on(core)
    async with session_scope(session_factory(engine)) as session:
        await session.execute(text("SELECT 1"))
    await engine.dispose()
    assert not core.stats().closed
    assert core.stats().connections_closed_total == {}
    async with session_scope(session_factory(engine)) as session:  # usable after dispose
        assert await session.scalar(text("SELECT 1")) == 1
    await engine.dispose()


async def test_pool_arguments_belong_to_the_core_and_are_refused(core: Pool) -> None:
    with pytest.raises(exc.ArgumentError, match="pool_pre_ping, pool_size"):
        create_async_engine_on(core, pool_size=20, pool_pre_ping=True)


async def test_the_async_engine_never_shows_the_password(pg: EmbeddedPostgres, core: Pool) -> None:
    async with engine_on(core) as engine:
        shown = [repr(engine.sync_engine), str(engine.url), repr(engine.url),
                 engine.url.render_as_string(hide_password=False)]
    for text_shown in shown:
        assert pg.password not in text_shown
    assert engine.url.host == pg.host


def test_the_sync_engine_carries_the_settings_and_masks_the_password(
    pg: EmbeddedPostgres,
) -> None:
    config = PoolConfig(pg.dsn, pool_size=2, max_overflow=1, acquire_timeout=3,
                        statement_timeout=7, lock_timeout=2.5, application_name="pw sync test")
    engine = create_sync_engine(config)
    try:
        with engine.connect() as conn:
            settings = conn.execute(text(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                " current_setting('TimeZone'), current_setting('application_name')"
            )).one()
        assert tuple(settings) == ("7s", "2500ms", "UTC", "pw sync test")
        assert (engine.pool.size(), engine.pool.timeout()) == (2, 3)  # type: ignore[attr-defined]
        for shown in (repr(engine), str(engine.url), repr(engine.url)):
            assert pg.password not in shown
    finally:
        engine.dispose()
