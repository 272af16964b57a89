"""The AsyncEngine built on a core, against a real PostgreSQL: its connections and
transactions run their calls on kept greenlets (none created per checkout), and option
engines and ``engine.begin()`` are of the same kind. (How a block's exit rolls back:
``test_sqlalchemy_release``.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from greenlet import getcurrent  # type: ignore[import-untyped]
from sqlalchemy import Integer, String, event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pool_helpers import engine_on, open_pool
from poolwarden import Pool
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.sqlalchemy import session_factory
from poolwarden.sqlalchemy._engine import (
    CoreAsyncConnection,
    CoreAsyncEngine,
    CoreAsyncTransaction,
)
from poolwarden.sqlalchemy._session import CoreAsyncSession, CoreAsyncSessionTransaction


class _Base(DeclarativeBase):
    pass


class Note(_Base):
    __tablename__ = "kept_greenlet_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(40))


@pytest.fixture
async def core(pg: EmbeddedPostgres) -> AsyncIterator[Pool]:
    async with open_pool(pg, min_size=1, pool_size=2) as pool:
        yield pool


class _Greenlets:
    """The greenlets SQLAlchemy's statements run on, from :meth:`watch` on (kept alive here,
    so that two of them are never the same object)."""

    def __init__(self) -> None:
        self.seen: set[Any] = set()

    def watch(self, engine: AsyncEngine) -> None:
        def seen(*args: Any) -> None:
            self.seen.add(getcurrent())

        event.listen(engine.sync_engine, "before_cursor_execute", seen)


@pytest.fixture
def statement_greenlets() -> _Greenlets:
    return _Greenlets()


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


async def test_sessions_do_their_orm_work_on_kept_greenlets(
    engine: AsyncEngine, statement_greenlets: _Greenlets
) -> None:
    """Every overridden call of the session and its transactions, through the ORM: add,
    flush, get, refresh, merge, scalar(s), a savepoint rolled back inside a committed
    transaction, delete. What it does is the ORM's; no greenlet is created for it."""
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.drop_all)
        await conn.run_sync(_Base.metadata.create_all)
    statement_greenlets.watch(engine)
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            assert isinstance(session, CoreAsyncSession)
            async with session.begin() as transaction:
                assert isinstance(transaction, CoreAsyncSessionTransaction)
                session.add(Note(id=1, text="one"))
                await session.flush()
                savepoint = await session.begin_nested()
                assert isinstance(savepoint, CoreAsyncSessionTransaction)
                session.add(Note(id=2, text="two"))
                await session.flush()
                await savepoint.rollback()
        async with sessions() as session:
            note = await session.get(Note, 1)
            assert note is not None
            assert note.text == "one"
            await session.execute(text(f"UPDATE {Note.__tablename__} SET text = 'uno'"))
            await session.refresh(note)
            assert note.text == "uno"
            merged = await session.merge(Note(id=3, text="three"))
            await session.commit()
            assert merged.id == 3
            ids = (await session.scalars(select(Note.id).order_by(Note.id))).all()
            assert ids == [1, 3]  # the savepoint's row rolled back, the rest committed
            assert await session.scalar(select(Note.text).where(Note.id == 3)) == "three"
            await session.delete(await session.get_one(Note, 3))
            await session.commit()
            assert await session.run_sync(lambda s: s.query(Note).count()) == 1
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(_Base.metadata.drop_all)
    assert len(statement_greenlets.seen) == 1


async def test_checkouts_create_no_greenlet_per_call(
    engine: AsyncEngine, statement_greenlets: _Greenlets
) -> None:
    """A hundred checkouts, each connect, execute, commit and close: SQLAlchemy's
    greenlet_spawn would make four hundred greenlets (a hundred statements on a hundred
    of them); one kept greenlet serves them all."""
    async with engine.connect() as conn:  # a first checkout sets the dialect up
        await conn.execute(text("SELECT 1"))
    statement_greenlets.watch(engine)
    for n in range(100):
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT CAST(:n AS int)"), {"n": n})).scalar() == n
            await conn.commit()
    assert len(statement_greenlets.seen) == 1
