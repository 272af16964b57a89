"""command_timeout on the SQLAlchemy path, against a real PostgreSQL.

The dialect puts its statements (prepared statements, ``BEGIN``) and the transaction's
``COMMIT``/``ROLLBACK`` under the core's statement watchdog instead of one asyncpg timer
each. What a SQLAlchemy caller sees when a statement runs too long is what the raw path
sees: :class:`StatementTimeout` (a ``TimeoutError``), the connection closed rather than
handed on, nothing left running on the server, and the engine usable afterwards.
"""

from __future__ import annotations

import logging
import time

import asyncpg
import pytest
from sqlalchemy import text

from pool_helpers import engine_on, open_pool, server_sessions, settled
from poolwarden import StatementTimeout, deadline
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.events import Event, StatementStopped
from poolwarden.sqlalchemy import session_factory, session_scope
from poolwarden.testing.proxy import FaultProxy


def _stopped(events: list[Event]) -> list[str]:
    return [e.action for e in events if isinstance(e, StatementStopped)]


def _causes(error: BaseException) -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    cause: BaseException | None = error
    while cause is not None:
        found.append(type(cause))
        cause = cause.__cause__
    return found


async def test_a_long_statement_is_stopped_by_the_watchdog_and_reported_typed(
    pg: EmbeddedPostgres,
) -> None:
    """pg_sleep(30) through the engine with command_timeout 0.3 s: the watchdog (not an
    asyncpg timer: a StatementStopped event) cancels it on the server; the caller gets
    StatementTimeout caused by the server's cancel; the connection is discarded and the
    engine goes on working."""
    events: list[Event] = []
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=0.3) as core, \
            engine_on(core) as engine:
        core.events.subscribe(events.append)
        started = time.monotonic()
        with pytest.raises(StatementTimeout) as caught:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(30)"))
        assert time.monotonic() - started < 5
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.running_s >= 0.3
        assert asyncpg.QueryCanceledError in _causes(caught.value)
        assert _stopped(events) == ["cancel"]
        assert core.stats().connections_closed_total.get("discarded") == 1
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        await settled(core)  # (that block's rollback runs behind its release)
        sessions = await server_sessions(pg, core.config.application_name)
        assert all(row["state"] == "idle" for row in sessions), sessions


async def test_a_session_scope_sees_the_same_typed_timeout(pg: EmbeddedPostgres) -> None:
    """Through an ORM session scope (autobegin, then a rollback on the way out): the same
    StatementTimeout, no error logged by SQLAlchemy's reset on return, no slot lost."""
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=0.3) as core, \
            engine_on(core) as engine:
        sessions = session_factory(engine)
        with pytest.raises(StatementTimeout):
            async with session_scope(sessions) as session:
                await session.execute(text("SELECT 1"))
                await session.execute(text("SELECT pg_sleep(30)"))
        assert core.stats().connections_in_use == 0
        async with session_scope(sessions) as session:
            assert (await session.execute(text("SELECT 2"))).scalar() == 2


async def test_a_blackholed_commit_is_cut_off(
    pg: EmbeddedPostgres, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops answering just before COMMIT: no cancel can get through, so the
    watchdog closes the connection after twice the timeout; the caller gets
    StatementTimeout within a few timeouts, and the dead connection is not handed on."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1, command_timeout=0.3,
                         connect_timeout=0.5, acquire_timeout=1.0,
                         release_timeout=0.3) as core, engine_on(core) as engine:
        events: list[Event] = []
        core.events.subscribe(events.append)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="sqlalchemy"), \
                pytest.raises(StatementTimeout):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                proxy.blackhole()
                await conn.commit()
        assert time.monotonic() - started < 5
        assert _stopped(events) == ["cancel", "terminate"]
        assert core.stats().connections_in_use == 0
        assert not [r for r in caplog.records if r.name.startswith("sqlalchemy")]
        proxy.heal()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1


async def test_a_blackholed_rollback_behind_the_release_is_cut_off_quietly(
    pg: EmbeddedPostgres, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The block ends normally but the server stops answering: the block's exit does not
    wait (its rollback runs behind the release), and the rollback hangs until the watchdog
    closes the connection. Nothing is raised or logged (the work is over; only the
    connection is lost), and the core counts the connection out and opens another."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1, command_timeout=0.3,
                         connect_timeout=0.5, acquire_timeout=1.0,
                         release_timeout=0.3) as core, engine_on(core) as engine:
        events: list[Event] = []
        core.events.subscribe(events.append)
        with caplog.at_level(logging.ERROR, logger="sqlalchemy"):
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 7"))).scalar() == 7
                proxy.blackhole()
            assert core.stats().connections_in_use == 1  # the ROLLBACK hangs
            await settled(core)
        assert _stopped(events) == ["cancel", "terminate"]
        assert core.stats().connections_closed_total == {"error": 1}
        assert not [r for r in caplog.records if r.name.startswith("sqlalchemy")]
        proxy.heal()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1


async def test_quick_statements_and_transactions_are_never_touched(
    pg: EmbeddedPostgres,
) -> None:
    """Statements, commits and rollbacks well inside the timeout, some taking most of it:
    none is stopped, no connection discarded."""
    events: list[Event] = []
    async with open_pool(pg, min_size=1, pool_size=2, command_timeout=0.5) as core, \
            engine_on(core) as engine:
        core.events.subscribe(events.append)
        for i in range(20):
            async with engine.connect() as conn:
                pause = 0.2 if i % 5 == 0 else 0.0
                value = (await conn.execute(
                    text("SELECT CAST(:i AS int) FROM pg_sleep(:s)"), {"i": i, "s": pause}
                )).scalar()
                assert value == i
                if i % 2:
                    await conn.commit()
        assert _stopped(events) == []
        assert core.stats().connections_closed_total.get("discarded", 0) == 0


async def test_a_deadline_cuts_a_sqlalchemy_statement_exactly(pg: EmbeddedPostgres) -> None:
    """With a deadline the statement keeps asyncpg's timer, set to the time left: it stops
    at the deadline, long before the 30 s command_timeout, and the watchdog stops nothing."""
    events: list[Event] = []
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=30) as core, \
            engine_on(core) as engine:
        core.events.subscribe(events.append)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with deadline(0.3), engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(30)"))
        assert time.monotonic() - started < 3
        assert _stopped(events) == []

