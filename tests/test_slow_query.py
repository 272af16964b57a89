"""The slow-query log and statement observation, on real PostgreSQL: one WARNING record per
slow statement with the expected fields and no parameters (unless enabled), the same on the
raw asyncpg path and the SQLAlchemy path, each SQLAlchemy statement observed exactly once,
and no password in any log record or event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text
from sqlalchemy.exc import DBAPIError

from pool_helpers import config_for, engine_on, open_pool
from poolwarden import ConnectionFailed, Pool
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.events import Event, EventBus, SlowQuery
from poolwarden.pool import _driver
from poolwarden.pool._observed import (
    ObservedConnection,
    QueryObserver,
    format_statement,
    tap_queries,
)
from poolwarden.pool.histogram import Histogram
from poolwarden.sqlalchemy import session_factory, session_scope

SECRET = "s3cr3t-token-4242"  # a parameter value that must never be logged by default
SLOW = "SELECT pg_sleep(0.2), $1::text"
SLOW_SA = "SELECT pg_sleep(0.2), CAST(:p AS text)"
THRESHOLD = 0.1
EVENTS_LOGGER = "poolwarden.events"


def slow_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Every WARNING (or above) record of the events logger captured so far."""
    return [r for r in caplog.records
            if r.name == EVENTS_LOGGER and r.levelno >= logging.WARNING]


def everything_in(record: logging.LogRecord) -> str:
    """A record's message, arguments and every attribute (the structured extras), as text."""
    return " ".join([record.getMessage(), repr(record.args),
                     *(repr(value) for value in vars(record).values())])


@contextmanager
def tapped(pool: Pool) -> Iterator[list[tuple[str, str | None]]]:
    """Every statement observed on ``pool`` while inside: (statement, error class name)."""
    seen: list[tuple[str, str | None]] = []

    def tap(statement: str, elapsed_s: float, error: BaseException | None, /) -> None:
        seen.append((statement, None if error is None else type(error).__name__))

    untap = tap_queries(pool.events, tap)
    try:
        yield seen
    finally:
        untap()


def query_count(pool: Pool) -> int:
    return pool.stats().histograms["query"].count


# ---------------------------------------------------------------- raw asyncpg path


async def test_a_slow_raw_query_logs_one_warning_with_its_fields_and_no_parameters(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_sleep(0.2) over a 0.1 s threshold: exactly one WARNING on poolwarden.events with
    event/node/duration_s/statement, and the $1 value nowhere in the record."""
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD) as pool, \
            pool.connection() as conn:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=EVENTS_LOGGER):
            await conn.fetchrow(SLOW, SECRET)
    records = slow_records(caplog)
    assert len(records) == 1
    record: Any = records[0]
    assert record.levelno == logging.WARNING
    assert record.event == "slow_query"
    assert record.node == unique_name
    assert record.duration_s > THRESHOLD
    assert record.statement == SLOW
    assert record.params is None
    assert record.error is None
    assert SECRET not in everything_in(record)


async def test_parameters_are_logged_only_when_enabled(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With log_query_params=True the slow-query record carries the parameters' repr."""
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD,
                         log_query_params=True) as pool, pool.connection() as conn:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=EVENTS_LOGGER):
            await conn.fetchval(SLOW, SECRET)
    (record,) = slow_records(caplog)
    assert record.params == repr((SECRET,))  # type: ignore[attr-defined]
    assert SECRET in record.getMessage()


async def test_a_slow_executemany_shows_its_rows_only_when_enabled_and_given_as_a_list(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """executemany is timed as one statement (in asyncpg's statement section); with
    log_query_params its rows are in the record when they were a list, and not at all
    when they were an iterator (the call consumed it)."""
    rows = [(0.06, SECRET), (0.06, SECRET)]
    statement = "SELECT pg_sleep($1), $2::text"
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD,
                         log_query_params=True) as pool, pool.connection() as conn:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=EVENTS_LOGGER):
            await conn.executemany(statement, rows)
            await conn.executemany(statement, iter(rows))
    listed, iterated = slow_records(caplog)
    assert listed.statement == iterated.statement == statement  # type: ignore[attr-defined]
    assert listed.params == repr(rows)  # type: ignore[attr-defined]
    assert iterated.params is None  # type: ignore[attr-defined]
    assert SECRET not in everything_in(iterated)


async def test_a_fast_query_logs_nothing_but_is_counted(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement under the threshold produces no record; the query histogram counts it."""
    async with open_pool(pg, name=unique_name, slow_query_threshold=5.0, pre_ping=False) as pool:
        before = query_count(pool)
        async with pool.connection() as conn:
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger=EVENTS_LOGGER):
                assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        assert query_count(pool) == before + 1
    assert not [r for r in caplog.records if getattr(r, "event", None) == "slow_query"]


async def test_a_slow_failing_query_reports_its_error_class(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement that fails after the threshold is logged with the error's class name and
    counted; the error reaches the caller unchanged."""
    failing = "SELECT 1 / (count(*) - 1)::int FROM pg_sleep(0.2)"
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD,
                         pre_ping=False) as pool:
        before = query_count(pool)
        async with pool.connection() as conn:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger=EVENTS_LOGGER), pytest.raises(
                asyncpg.DivisionByZeroError
            ):
                await conn.fetchval(failing)
        assert query_count(pool) == before + 1
    (record,) = slow_records(caplog)
    assert record.error == "DivisionByZeroError"  # type: ignore[attr-defined]
    assert record.statement == failing  # type: ignore[attr-defined]


async def test_a_long_statement_is_collapsed_and_truncated(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The logged statement has its whitespace collapsed and is cut to 300 characters,
    ending with an ellipsis."""
    long = "SELECT\n    pg_sleep(0.2),\n\t" + " + ".join(["1"] * 400)
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD) as pool, \
            pool.connection() as conn:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=EVENTS_LOGGER):
            await conn.execute(long)
    (record,) = slow_records(caplog)
    statement: str = record.statement  # type: ignore[attr-defined]
    assert len(statement) == 300
    assert statement.endswith("…")
    assert statement.startswith("SELECT pg_sleep(0.2), 1 + 1 + ")
    assert "\n" not in statement
    assert "\t" not in statement


def test_statement_formatting_masks_password_literals_and_dsns() -> None:
    """A password literal or a DSN password inside a statement is masked before logging."""
    assert (format_statement("ALTER ROLE app  PASSWORD 'hunter''2'")
            == "ALTER ROLE app PASSWORD '***'")
    shown = format_statement("SELECT dblink_connect('postgresql://u:pw%40x@db/app')")
    assert "pw%40x" not in shown
    assert format_statement("SELECT 1", 5) == "SELECT 1"[:4] + "…"


async def test_an_observed_connection_reports_every_statement_method(
    pg: EmbeddedPostgres,
) -> None:
    """execute (with and without arguments), executemany, fetch, fetchrow and fetchval each
    report one observation, also when they raise; with no observer nothing is reported."""
    histogram = Histogram()
    seen: list[Event] = []
    events = EventBus()
    events.subscribe(seen.append)
    conn = await _driver.open_connection(config_for(pg), connection_class=ObservedConnection,
                                          observed=True)
    try:
        assert isinstance(conn, ObservedConnection)
        await conn.execute("SELECT 1")  # not observed: no observer yet
        conn._pw_observer = QueryObserver(node="n", events=events, histogram=histogram,
                                          slow_threshold_s=None, log_params=False)
        await conn.execute("SELECT 1")
        await conn.execute("SELECT $1::int", 1)
        await conn.executemany("SELECT $1::int", [(1,), (2,)])
        await conn.fetch("SELECT 1")
        await conn.fetchrow("SELECT 1")
        await conn.fetchval("SELECT 1")
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.fetchval("SELEC 1")
        async with conn.transaction():  # BEGIN and COMMIT: two round trips, two statements
            pass
        await conn.reset()  # the pool's housekeeping: not the application's statements
        assert histogram.count == 9
        assert not [e for e in seen if isinstance(e, SlowQuery)]  # no threshold: never slow
    finally:
        await conn.close()


async def test_the_pools_own_statements_are_not_observed(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """Pre-pings, the rollback of a transaction left open, the full session reset and the
    restart check of a new connection are the pool's, not the application's: only the
    application's statements (here BEGIN and one SELECT) reach the query histogram."""
    async with open_pool(pg, name=unique_name, pre_ping=True, ping_after_idle=0.0,
                         min_size=1, pool_size=2) as pool:
        before = pool.stats()
        with tapped(pool) as seen:
            async with pool.connection(reset=True) as conn:  # pinged; full reset at release
                await conn.fetchval("SELECT 1")
            async with pool.connection() as conn:  # pinged; rolled back at release
                tr = conn.transaction()
                await tr.start()
            held = [await pool.acquire() for _ in range(2)]  # one new connection opened
            for conn in held:
                await pool.release(conn)
        after = pool.stats()
    assert after.pings_total > before.pings_total
    assert after.restores_total - before.restores_total == 2
    assert after.connections_created_total > before.connections_created_total
    assert [statement for statement, _ in seen] == ["SELECT 1", "BEGIN;"]
    assert after.histograms["query"].count - before.histograms["query"].count == 2


async def test_a_cancelled_statement_is_reported_and_the_cancellation_propagates(
    pg: EmbeddedPostgres,
) -> None:
    """A statement cancelled while running is observed with CancelledError as its error."""
    histogram = Histogram()
    conn = await _driver.open_connection(config_for(pg), connection_class=ObservedConnection,
                                          observed=True)
    errors: list[str | None] = []
    events = EventBus()
    untap = tap_queries(events, lambda s, t, e: errors.append(type(e).__name__ if e else None))
    try:
        conn._pw_observer = QueryObserver(node="n", events=events, histogram=histogram,
                                          slow_threshold_s=None, log_params=False)
        task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert errors == ["CancelledError"]
        assert histogram.count == 1
    finally:
        untap()
        conn.terminate()


# ---------------------------------------------------------------- SQLAlchemy path


async def test_a_slow_sqlalchemy_query_logs_one_warning_without_parameters(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """session.execute(text(...)) over the threshold: one WARNING record with the same
    fields as on the raw path, and the bound parameter nowhere in it."""
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD) as pool, \
            engine_on(pool) as engine, session_scope(session_factory(engine)) as session:
        await session.execute(text("SELECT 1"))  # warm: connect-time setup done
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=EVENTS_LOGGER):
            await session.execute(text(SLOW_SA), {"p": SECRET})
    records = slow_records(caplog)
    assert len(records) == 1
    record: Any = records[0]
    assert record.event == "slow_query"
    assert record.node == unique_name
    assert record.duration_s > THRESHOLD
    assert record.statement == "SELECT pg_sleep(0.2), CAST($1 AS text)"
    assert record.params is None
    assert SECRET not in everything_in(record)


async def test_sqlalchemy_parameters_are_logged_only_when_enabled(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With log_query_params=True the SQLAlchemy slow-query record has the parameters."""
    async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD,
                         log_query_params=True) as pool, engine_on(pool) as engine, \
            engine.connect() as conn:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=EVENTS_LOGGER):
            await conn.execute(text(SLOW_SA), {"p": SECRET})
    (record,) = slow_records(caplog)
    assert SECRET in record.params  # type: ignore[attr-defined]


async def test_one_sqlalchemy_statement_is_one_observation(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """Each statement SQLAlchemy runs is observed exactly once (its prepared statement is
    not seen by the raw overrides): a Core select once, and a multi-row Core insert and a
    text() insert with many parameter sets once each (asyncpg's executemany, observed by
    the raw path, not again by the engine); BEGIN and COMMIT are observed as statements of
    their own, as on the raw path."""
    table = Table(unique_name, MetaData(), Column("v", Integer))
    async with open_pool(pg, name=unique_name, pre_ping=False) as pool, \
            engine_on(pool) as engine:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        before = query_count(pool)
        with tapped(pool) as seen:
            async with session_scope(session_factory(engine)) as session:
                await session.execute(insert(table), [{"v": 1}, {"v": 2}])
                await session.execute(text(f"INSERT INTO {unique_name} VALUES (:v)"),
                                      [{"v": 3}, {"v": 4}, {"v": 5}])
                total = await session.scalar(select(func.sum(table.c.v)))
        assert total == 15
        assert [statement for statement, _ in seen] == [
            "BEGIN;",
            f"INSERT INTO {unique_name} (v) VALUES ($1::INTEGER)",
            f"INSERT INTO {unique_name} VALUES ($1)",
            f"SELECT sum({unique_name}.v) AS sum_1 \nFROM {unique_name}",
            "COMMIT;",
        ]
        assert query_count(pool) == before + len(seen)
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)
    # timed by the dialect: no engine event listener, which would slow every statement
    assert len(engine.sync_engine.dispatch.before_cursor_execute) == 0
    assert len(engine.sync_engine.dispatch.after_cursor_execute) == 0


async def test_a_sqlalchemy_statement_sent_without_parameters_is_observed(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """``no_parameters`` sends the statement with no parameter list at all (the dialect's
    other cursor call): observed once too."""
    async with open_pool(pg, name=unique_name, pre_ping=False) as pool, \
            engine_on(pool) as engine, engine.connect() as conn:
        with tapped(pool) as seen:
            result = await conn.exec_driver_sql(
                "SELECT 41 + 1", execution_options={"no_parameters": True})
            assert result.scalar() == 42
    assert [s for s, _ in seen if "41" in s] == ["SELECT 41 + 1"]


async def test_a_failing_sqlalchemy_statement_is_observed_once_with_its_error(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """A statement that fails on the SQLAlchemy path is observed once, with the driver's
    error class (the dialect's DBAPI error is unwrapped to asyncpg's)."""
    async with open_pool(pg, name=unique_name, pre_ping=False) as pool, \
            engine_on(pool) as engine, engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await conn.rollback()
        with tapped(pool) as seen, pytest.raises(DBAPIError):
            await conn.execute(text("SELECT 1 / 0"))
    statements = [s for s, _ in seen if s == "SELECT 1 / 0"]
    assert len(statements) == 1
    assert ("SELECT 1 / 0", "DivisionByZeroError") in seen


# ---------------------------------------------------------------- no password anywhere


async def test_no_password_in_any_log_record_or_event(
    pg: EmbeddedPostgres, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With every event logged (echo_pool) and a hook on the bus, a workload with slow
    queries on both paths, a failing statement and a refused login puts the password
    (which contains @ : / %) in no record and no event field."""
    assert any(ch in pg.password for ch in "@:/%")
    events: list[Event] = []
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="poolwarden"):
        async with open_pool(pg, name=unique_name, slow_query_threshold=THRESHOLD,
                             echo_pool=True) as pool, engine_on(pool) as engine:
            pool.events.subscribe(events.append)
            async with pool.connection() as conn:
                await conn.fetchval(SLOW, SECRET)
                with pytest.raises(asyncpg.PostgresError):
                    await conn.fetchval("SELECT 1 / 0")
            async with engine.connect() as sa_conn:
                await sa_conn.execute(text(SLOW_SA), {"p": SECRET})
        wrong = pg.dsn.replace(quote(pg.password, safe=""), quote(pg.password + "x", safe=""))
        bad = Pool(config_for(wrong, name=f"{unique_name}_bad", min_size=1))
        with pytest.raises(ConnectionFailed):
            await bad.open()
    assert any(isinstance(e, SlowQuery) for e in events)
    # the two pg_sleep statements; a loaded machine may make `1 / 0` slow too
    slow = [r for r in caplog.records if getattr(r, "event", None) == "slow_query"]
    assert sum("pg_sleep" in r.statement for r in slow) == 2
    secrets = {pg.password, quote(pg.password, safe=""), SECRET}
    for record in caplog.records:
        dump = everything_in(record)
        for secret in secrets:
            assert secret not in dump, record.getMessage()
    for event in events:
        dump = repr(event.fields()) + event.describe()
        for secret in secrets:
            assert secret not in dump
