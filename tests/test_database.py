"""The ``Database`` facade on a real PostgreSQL: from_env, raw helpers, transactions, stats."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from pool_helpers import config_for
from poolwarden import CircuitOpen, ConfigurationError, ConnectionFailed, PoolClosed, PoolTimeout
from poolwarden.database import Database
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.testing import FaultProxy


def env_for(pg: EmbeddedPostgres, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": pg.dsn, "DB_POOL_SIZE": "4", "DB_POOL_MIN_SIZE": "2", **extra}


async def test_from_env_opens_warm_pools_and_reports_stats_by_node(pg: EmbeddedPostgres) -> None:
    async with Database.from_env(env_for(pg, DB_APPLICATION_NAME="facade-test")) as db:
        stats = db.stats()
        assert list(stats) == ["primary"]
        assert stats["primary"].connections == 2
        assert await db.fetchval("SELECT current_setting('application_name')") == "facade-test"
        assert "primary" in repr(db)
        assert pg.password not in repr(db)
        assert pg.password not in repr(db.settings)


async def test_raw_helpers_execute_fetch_fetchrow_fetchval(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    async with Database.from_env(env_for(pg)) as db:
        created = await db.execute(f"CREATE TABLE {unique_name} (id int, name text)")
        assert created == "CREATE TABLE"
        inserted = await db.execute(f"INSERT INTO {unique_name} VALUES ($1, $2)", 1, "a")
        assert inserted == "INSERT 0 1"
        rows = await db.fetch(f"SELECT id, name FROM {unique_name}")
        assert [tuple(r) for r in rows] == [(1, "a")]
        row = await db.fetchrow(f"SELECT name FROM {unique_name} WHERE id = $1", 1)
        assert row is not None
        assert row["name"] == "a"
        assert await db.fetchval(f"SELECT count(*) FROM {unique_name}") == 1
        assert db.stats()["primary"].connections_in_use == 0


async def test_transaction_commits_on_success_and_rolls_back_on_error(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    async with Database.from_env(env_for(pg)) as db:
        await db.execute(f"CREATE TABLE {unique_name} (id int PRIMARY KEY)")
        async with db.transaction() as conn:
            await conn.execute(f"INSERT INTO {unique_name} VALUES (1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with db.transaction() as conn:
                await conn.execute(f"INSERT INTO {unique_name} VALUES (2)")
                await conn.execute(f"INSERT INTO {unique_name} VALUES (1)")
        assert await db.fetchval(f"SELECT array_agg(id) FROM {unique_name}") == [1]
        async with db.transaction(isolation="serializable", readonly=True) as conn:
            assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
            assert await conn.fetchval("SHOW transaction_read_only") == "on"


async def test_closed_database_refuses_work(pg: EmbeddedPostgres) -> None:
    db = Database.from_env(env_for(pg))
    await db.open()
    await db.close()
    with pytest.raises(PoolClosed):
        await db.fetchval("SELECT 1")


def test_from_env_reports_bad_configuration_with_variable_names() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Database.from_env({"DATABASE_URL": "mysql://u:topsecret@h/db", "DB_POOL_SIZE": "zero"})
    variables = {p.variable for p in caught.value.problems}
    assert {"DATABASE_URL", "DB_POOL_SIZE"} <= variables
    assert "topsecret" not in str(caught.value)


async def test_from_url_takes_pool_options(pg: EmbeddedPostgres) -> None:
    async with Database.from_url(pg.dsn, pool_size=3, min_size=1, name="orders") as db:
        assert list(db.stats()) == ["orders"]
        assert db.stats()["orders"].max_size == 3 + db.pool.config.max_overflow


async def test_session_commits_on_success_rolls_back_on_error_on_the_same_pool(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    from sqlalchemy import text

    async with Database.from_env(env_for(pg)) as db:
        await db.execute(f"CREATE TABLE {unique_name} (id int PRIMARY KEY)")
        before = db.stats()["primary"].acquires_total
        async with db.session() as session:
            await session.execute(text(f"INSERT INTO {unique_name} VALUES (1)"))
        with pytest.raises(RuntimeError):
            async with db.session() as session:
                await session.execute(text(f"INSERT INTO {unique_name} VALUES (2)"))
                raise RuntimeError("boom")
        assert await db.fetchval(f"SELECT array_agg(id) FROM {unique_name}") == [1]
        stats = db.stats()["primary"]
        assert stats.acquires_total - before >= 3  # both sessions came from the core
        assert stats.connections_in_use == 0


async def test_health_server_view_and_budget_through_the_facade(pg: EmbeddedPostgres) -> None:
    async with Database.from_env(env_for(pg, DB_APPLICATION_NAME="facade-view")) as db:
        report = await db.health(timeout=2)
        assert report.ok
        assert report.node("primary").in_recovery is False
        activity = await db.server_activity()
        assert any(g.application_name == "facade-view" for g in activity.by_application)
        budget = await db.connection_budget(processes=2)
        assert budget.used == 2 * db.pool.config.max_size
        assert budget.ok


async def test_advise_finds_a_pool_too_small_from_live_stats(pg: EmbeddedPostgres) -> None:
    import asyncio

    from poolwarden import PoolTimeout

    async with Database.from_env(env_for(pg, DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0",
                                         DB_POOL_MIN_SIZE="1", DB_POOL_TIMEOUT="0.05")) as db:
        before = db.stats()

        async def busy() -> None:
            try:
                async with db.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.1)")
            except PoolTimeout:
                pass

        await asyncio.gather(*(busy() for _ in range(8)))
        findings = db.advise(before)["primary"]
    codes = {f.code for f in findings}
    assert codes & {"acquire_timeouts", "pool_too_small"}
    assert all(pg.password not in f.message for f in findings)


async def test_run_transaction_and_run_session_commit_and_retry_a_serialization_failure(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """The facade's retryable transactions: the work function's result comes back, the
    write is committed once, and a serialization failure on the first attempt is retried
    (raw path and SQLAlchemy path)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    async with Database.from_env(env_for(pg)) as db:
        await db.execute(f"CREATE TABLE {unique_name} (id int PRIMARY KEY, path text)")
        attempts = 0

        async def write(conn: asyncpg.Connection) -> int:
            nonlocal attempts
            attempts += 1
            await conn.execute(f"INSERT INTO {unique_name} VALUES (1, 'raw')")
            if attempts == 1:  # a real 40001 raised by the server, as a conflict would
                await conn.execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            return attempts

        assert await db.run_transaction(write, isolation="serializable") == 2

        async def write_orm(session: AsyncSession) -> str:
            await session.execute(text(f"INSERT INTO {unique_name} VALUES (2, 'orm')"))
            return "done"

        assert await db.run_session(write_orm) == "done"
        rows = await db.fetch(f"SELECT id, path FROM {unique_name} ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "raw"), (2, "orm")]


# A pool that retries fast, so that a test sees it recover soon after the server is back.
FAST_RETRY = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2, "connect_timeout": 2.0,
              "acquire_timeout": 1.0}


async def first_answer(db: Database, timeout: float = 10.0) -> object:
    """``SELECT 1`` retried until the database answers: right after the server comes back,
    the breaker that opened while it was away refuses for up to its open period."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            return await db.fetchval("SELECT 1")
        except (CircuitOpen, PoolTimeout):
            assert time.monotonic() < give_up, db.stats()
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
async def test_open_without_wait_returns_at_once_and_serves_once_the_server_answers(
    pg: EmbeddedPostgres, proxy: FaultProxy, fault: str,
) -> None:
    """open(wait=False) with the server unreachable (connections reset, or a partition
    where they hang) returns at once without a connection; the pool keeps trying in the
    background, and once the network heals the database serves statements."""
    getattr(proxy, fault)()
    db = Database(config_for(proxy.dsn_for(pg.dsn), **FAST_RETRY))
    try:
        started = time.monotonic()
        await db.open(wait=False)
        assert time.monotonic() - started < 0.5
        stats = db.stats()["test"]
        assert stats.connections_created_total == 0
        assert not stats.closed
        await asyncio.sleep(0.3)  # connection attempts fail (or hang) meanwhile
        assert db.stats()["test"].connections_created_total == 0
        proxy.heal()
        assert await first_answer(db) == 1
        assert db.stats()["test"].connections_created_total >= 1
    finally:
        await db.close(timeout=1)


async def test_a_service_can_open_before_its_server_has_started(fresh_pg: EmbeddedPostgres) -> None:
    """The start-up race open(wait=False) is for: the server is down when the database is
    opened, comes up afterwards, and the database serves without being reopened."""
    fresh_pg.stop()
    db = Database(config_for(fresh_pg, **FAST_RETRY))
    try:
        started = time.monotonic()
        await db.open(wait=False)
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.3)
        assert db.stats()["test"].connection_errors_total >= 1
        await asyncio.to_thread(fresh_pg.start)
        assert await first_answer(db) == 1
    finally:
        await db.close(timeout=1)


async def test_open_with_wait_fails_fast_with_connection_failed(
    pg: EmbeddedPostgres, proxy: FaultProxy,
) -> None:
    """The default, open(wait=True), still fails at once when the server refuses, and leaves
    the database closed."""
    proxy.refuse()
    db = Database(config_for(proxy.dsn_for(pg.dsn), **FAST_RETRY))
    started = time.monotonic()
    with pytest.raises(ConnectionFailed):
        await db.open(wait=True)
    assert time.monotonic() - started < 2.0
    assert db.stats()["test"].closed
    with pytest.raises(PoolClosed):
        await db.fetchval("SELECT 1")
