"""Retryable transactions against a real PostgreSQL, on the raw asyncpg path and the
SQLAlchemy path: conflicts and lost connections before COMMIT are retried, a COMMIT whose
answer never came is reported as CommitOutcomeUnknown and never retried, other errors are
final; and under random connection resets no write is lost, duplicated or left unreported."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pool_helpers import open_pool
from poolwarden import (
    CommitOutcomeUnknown,
    DeadlineExceeded,
    Pool,
    PooledConnection,
    PoolwardenError,
    deadline,
)
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.pool._driver import is_connection_lost
from poolwarden.protect.retry import RetryPolicy
from poolwarden.protect.sa_transactions import run_session
from poolwarden.protect.transactions import run_transaction
from poolwarden.sqlalchemy import create_async_engine_on, session_factory
from poolwarden.testing import FaultProxy

FAST = RetryPolicy(attempts=5, initial_backoff_s=0.005, max_backoff_s=0.05)
RETRY_LOG = "poolwarden.protect.retry"


@pytest.fixture
async def table(pg: EmbeddedPostgres, unique_name: str) -> AsyncIterator[str]:
    """A table ``(id PRIMARY KEY, grp, v)`` unique to the test, dropped afterwards."""
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f"CREATE TABLE {unique_name} "
                           "(id int PRIMARY KEY, grp int NOT NULL DEFAULT 0, v int NOT NULL)")
        yield unique_name
        await conn.execute(f"DROP TABLE {unique_name} CASCADE")
        await conn.execute(f"DROP FUNCTION IF EXISTS {unique_name}_slow()")
    finally:
        await conn.close()


async def rows(pg: EmbeddedPostgres, table: str) -> dict[int, int]:
    """id -> v, read on a connection of its own (never through the proxy)."""
    conn = await asyncpg.connect(pg.dsn)
    try:
        return {r["id"]: r["v"] for r in await conn.fetch(f"SELECT id, v FROM {table}")}
    finally:
        await conn.close()


async def admin(pg: EmbeddedPostgres, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(pg.dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def slow_commit(pg: EmbeddedPostgres, table: str) -> None:
    """A deferred constraint trigger that sleeps 3 s in every COMMIT that inserted rows:
    COMMIT stays in flight long enough to kill its connection on purpose."""
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f"""
            CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER {table}_slow AFTER INSERT ON {table}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_slow();
        """)
    finally:
        await conn.close()


async def commit_in_flight(pg: EmbeddedPostgres, application_name: str) -> int:
    """The pid of the session of ``application_name`` that is running COMMIT (waits)."""
    for _ in range(500):
        pid = await admin(pg, "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                              "AND state = 'active' AND query ILIKE 'COMMIT%'", application_name)
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    pytest.fail("no COMMIT in flight")


async def terminate_pid(pg: EmbeddedPostgres, pid: int) -> None:
    assert await admin(pg, "SELECT pg_terminate_backend($1)", pid)


def insert(table: str, row_id: int, attempts: Counter[int],
           then: Callable[[PooledConnection, int], Awaitable[None]] | None = None,
           ) -> Callable[[PooledConnection], Awaitable[int]]:
    """Work that inserts ``row_id`` with ``v`` = the attempt number (so the table tells
    which attempt committed), then runs ``then(conn, attempt)``."""
    async def work(conn: PooledConnection) -> int:
        attempts[row_id] += 1
        attempt = attempts[row_id]
        await conn.execute(f"INSERT INTO {table} (id, v) VALUES ($1, $2)", row_id, attempt)
        if then is not None:
            await then(conn, attempt)
        return attempt
    return work


async def kill_own_backend(conn: PooledConnection) -> None:
    """The server ends this session (57P01), as pg_terminate_backend from elsewhere would."""
    with contextlib.suppress(asyncpg.AdminShutdownError):
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    await conn.execute("SELECT 1")  # fails: the session is gone


# ------------------------------------------------------------------ conflicts


async def write_skew(pool: Pool, table: str, grp: int, policy: RetryPolicy | None,
                     attempts: Counter[int]) -> list[Any]:
    """Two SERIALIZABLE transactions each count group ``grp`` and insert into it, both
    reading before either writes (on their first attempt): one must fail with 40001."""
    both_read = asyncio.Barrier(2)

    def work_for(row_id: int) -> Callable[[PooledConnection], Awaitable[int]]:
        async def work(conn: PooledConnection) -> int:
            attempts[row_id] += 1
            seen = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE grp = $1", grp))
            if attempts[row_id] == 1:
                await both_read.wait()
            await conn.execute(f"INSERT INTO {table} (id, grp, v) VALUES ($1, $2, $3)",
                               row_id, grp, seen)
            return seen
        return work

    return await asyncio.gather(
        *(run_transaction(pool, work_for(row_id), isolation="serializable", policy=policy)
          for row_id in (grp * 10 + 1, grp * 10 + 2)),
        return_exceptions=True,
    )


async def test_serialization_failure_is_retried_and_both_transactions_commit_once(
    pg: EmbeddedPostgres, table: str
) -> None:
    """Write skew under SERIALIZABLE: without retry one transaction fails with 40001; with
    retry it runs again, sees the other's row, and both commit exactly once."""
    async with open_pool(pg, pool_size=4) as pool:
        once: Counter[int] = Counter()
        results = await write_skew(pool, table, 1, None, once)
        assert sum(isinstance(r, asyncpg.SerializationError) for r in results) == 1, results
        assert sum(isinstance(r, int) for r in results) == 1, results
        assert sorted(once.values()) == [1, 1]

        attempts: Counter[int] = Counter()
        results = await write_skew(pool, table, 2, FAST, attempts)
        assert sorted(results) == [0, 1]  # the retried one saw the other's row
        assert sorted(attempts.values()) == [1, 2]
        assert pool.stats().connections_in_use == 0
    stored = await rows(pg, table)
    retried = next(row_id for row_id, n in attempts.items() if n == 2)
    assert sorted(stored[row_id] for row_id in (21, 22)) == [0, 1]
    assert stored[retried] == 1


@pytest.mark.slow
async def test_deadlock_is_retried_and_both_transactions_commit_once(
    pg: EmbeddedPostgres, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two transactions lock rows 1 and 2 in opposite orders: the server breaks the
    deadlock (40P01, after deadlock_timeout = 1 s); the victim is retried; each transaction's
    increment lands exactly once on each row."""
    caplog.set_level(logging.DEBUG, logger=RETRY_LOG)
    conn = await asyncpg.connect(pg.dsn)
    await conn.execute(f"INSERT INTO {table} (id, v) VALUES (1, 0), (2, 0)")
    await conn.close()
    first_locks = asyncio.Barrier(2)
    attempts: Counter[str] = Counter()

    def work_for(name: str, order: tuple[int, int]) -> Callable[[PooledConnection],
                                                                 Awaitable[None]]:
        async def work(conn: PooledConnection) -> None:
            attempts[name] += 1
            await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = $1", order[0])
            if attempts[name] == 1:
                await first_locks.wait()
            await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = $1", order[1])
        return work

    async with open_pool(pg, pool_size=4) as pool:
        await asyncio.gather(run_transaction(pool, work_for("a", (1, 2)), policy=FAST),
                             run_transaction(pool, work_for("b", (2, 1)), policy=FAST))
    assert sorted(attempts.values()) == [1, 2]
    assert await rows(pg, table) == {1: 2, 2: 2}
    assert "DeadlockDetectedError" in caplog.text


# ------------------------------------------------------------------ lost before COMMIT


async def test_reset_before_commit_is_retried_and_the_row_is_written_once(
    pg: EmbeddedPostgres, proxy: FaultProxy, table: str
) -> None:
    """The network resets in the middle of a write transaction: nothing was committed, so
    the transaction runs again on a new connection; the dead one is discarded."""
    attempts: Counter[int] = Counter()

    async def reset_on_first(conn: PooledConnection, attempt: int) -> None:
        if attempt == 1:
            proxy.reset_all()
            await conn.execute("SELECT 1")

    async with open_pool(proxy.dsn_for(pg.dsn), pool_size=2) as pool:
        result = await run_transaction(pool, insert(table, 7, attempts, reset_on_first),
                                       policy=FAST)
        stats = pool.stats()
    assert (result, attempts[7]) == (2, 2)
    assert await rows(pg, table) == {7: 2}
    assert stats.connections_closed_total.get("error", 0) >= 1
    assert stats.connections_in_use == 0


async def test_backend_terminated_before_commit_is_retried_and_the_row_is_written_once(
    pg: EmbeddedPostgres, table: str
) -> None:
    """The server ends the session (pg_terminate_backend, 57P01) mid-transaction: retried."""
    attempts: Counter[int] = Counter()

    async def terminate_on_first(conn: PooledConnection, attempt: int) -> None:
        if attempt == 1:
            await kill_own_backend(conn)

    async with open_pool(pg, pool_size=2) as pool:
        assert await run_transaction(pool, insert(table, 8, attempts, terminate_on_first),
                                     policy=FAST) == 2
    assert await rows(pg, table) == {8: 2}


# ------------------------------------------------------------------ COMMIT in flight


async def test_backend_killed_while_commit_is_in_flight_is_reported_and_not_retried(
    pg: EmbeddedPostgres, table: str
) -> None:
    """COMMIT is running (a deferred trigger sleeps) when its backend is terminated: the
    caller gets CommitOutcomeUnknown chained from the driver error, after exactly one
    attempt. (Here the server died before committing: the row is absent.)"""
    await slow_commit(pg, table)
    attempts: Counter[int] = Counter()
    async with open_pool(pg, pool_size=2) as pool:
        task = asyncio.create_task(run_transaction(pool, insert(table, 9, attempts), policy=FAST))
        await terminate_pid(pg, await commit_in_flight(pg, pool.config.application_name))
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await task
        stats = pool.stats()
    assert attempts[9] == 1
    assert unknown.value.node == pool.name
    assert unknown.value.__cause__ is not None
    assert is_connection_lost(unknown.value.__cause__)
    assert stats.connections_in_use == 0
    assert await rows(pg, table) == {}


async def test_deadline_running_out_with_commit_in_flight_is_an_unknown_outcome(
    pg: EmbeddedPostgres, table: str
) -> None:
    """The caller's deadline expires while COMMIT runs: the client cannot know whether the
    server committed, so it is CommitOutcomeUnknown (caused by the pool's DeadlineExceeded),
    not a plain timeout and not a retry. The connection goes back to the pool clean."""
    await slow_commit(pg, table)
    attempts: Counter[int] = Counter()
    async with open_pool(pg, pool_size=1) as pool:
        started = time.monotonic()
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            async with deadline(0.3):
                await run_transaction(pool, insert(table, 14, attempts), policy=FAST)
        assert time.monotonic() - started < 2.0
        assert isinstance(unknown.value.__cause__, DeadlineExceeded)
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert pool.stats().connections_in_use == 0
    assert attempts[14] == 1
    assert await rows(pg, table) == {}  # the cancel reached the trigger: rolled back


async def test_answer_to_a_committed_commit_lost_on_the_way_back_is_reported_not_retried(
    pg: EmbeddedPostgres, proxy: FaultProxy, table: str
) -> None:
    """The server commits, the network drops the answer (held 0.6 s by the proxy, then
    reset): CommitOutcomeUnknown after one attempt — and the row is there, which is why the
    write must not run again."""
    attempts: Counter[int] = Counter()

    async def slow_network(conn: PooledConnection, attempt: int) -> None:
        proxy.delay(0.6)  # COMMIT reaches the server in 0.6 s, its answer 0.6 s later

    async with open_pool(proxy.dsn_for(pg.dsn), pool_size=2) as pool:
        task = asyncio.create_task(
            run_transaction(pool, insert(table, 10, attempts, slow_network), policy=FAST))
        for _ in range(500):
            if await rows(pg, table):
                break
            await asyncio.sleep(0.01)
        proxy.reset_all()  # committed; the answer is still in the proxy
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await task
        proxy.heal()
    assert attempts[10] == 1
    assert isinstance(unknown.value.__cause__, Exception)
    assert is_connection_lost(unknown.value.__cause__)
    assert await rows(pg, table) == {10: 1}


async def test_read_only_transaction_lost_during_commit_is_simply_retried(
    pg: EmbeddedPostgres, proxy: FaultProxy, table: str
) -> None:
    """A read-only transaction wrote nothing: when its connection is cut with COMMIT in
    flight (held 0.5 s by the proxy, reset after 0.2 s) it runs again instead of raising
    CommitOutcomeUnknown. The same cut of a writing transaction raises it."""
    attempts: Counter[int] = Counter()

    def cut_during_next_commit() -> None:
        proxy.delay(0.5)

        def cut() -> None:
            proxy.reset_all()
            proxy.heal()

        asyncio.get_running_loop().call_later(0.2, cut)

    async def read(conn: PooledConnection) -> int:
        attempts[0] += 1
        count = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        if attempts[0] == 1:
            cut_during_next_commit()
        return count

    async def write_once(conn: PooledConnection, attempt: int) -> None:
        cut_during_next_commit()

    async with open_pool(proxy.dsn_for(pg.dsn), pool_size=2) as pool:
        assert await run_transaction(pool, read, readonly=True, policy=FAST) == 0
        assert attempts[0] == 2
        with pytest.raises(CommitOutcomeUnknown):
            await run_transaction(pool, insert(table, 13, attempts, write_once), policy=FAST)
    assert attempts[13] == 1
    assert await rows(pg, table) == {}  # this COMMIT never reached the server


# ------------------------------------------------------------------ final errors and bounds


@pytest.mark.parametrize(("statement", "error"), [
    ("INSERT INTO {table} (id, v) VALUES (1, 1)", asyncpg.UniqueViolationError),
    ("SELEC 1", asyncpg.PostgresSyntaxError),
])
async def test_non_retryable_sql_errors_are_raised_at_once(
    pg: EmbeddedPostgres, table: str, statement: str, error: type[Exception]
) -> None:
    """A constraint violation or a syntax error would fail again: one attempt, rolled back,
    raised as asyncpg raised it, the connection clean and back in the pool."""
    await admin(pg, f"INSERT INTO {table} (id, v) VALUES (1, 0)")
    attempts = 0

    async def work(conn: PooledConnection) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute(f"INSERT INTO {table} (id, v) VALUES (2, 0)")
        await conn.execute(statement.format(table=table))

    async with open_pool(pg, pool_size=2) as pool:
        with pytest.raises(error):
            await run_transaction(pool, work, policy=FAST)
        stats = pool.stats()
    assert attempts == 1
    assert await rows(pg, table) == {1: 0}
    assert stats.connections_in_use == 0
    assert stats.connections_closed_total.get("error", 0) == 0


async def test_the_attempt_cap_bounds_retries_of_a_connection_that_keeps_dying(
    pg: EmbeddedPostgres, table: str
) -> None:
    """Every attempt loses its connection before COMMIT: exactly ``attempts`` runs, then the
    last driver error (nothing committed)."""
    attempts: Counter[int] = Counter()

    async def always_terminate(conn: PooledConnection, attempt: int) -> None:
        await kill_own_backend(conn)

    policy = RetryPolicy(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.01)
    async with open_pool(pg, pool_size=2) as pool:
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)) as failed:
            await run_transaction(pool, insert(table, 11, attempts, always_terminate),
                                  policy=policy)
    assert is_connection_lost(failed.value) or isinstance(failed.value, asyncpg.InterfaceError)
    assert not isinstance(failed.value, CommitOutcomeUnknown)
    assert attempts[11] == 3
    assert await rows(pg, table) == {}


async def test_the_callers_deadline_bounds_retries(pg: EmbeddedPostgres, table: str) -> None:
    """A generous cap (50) but a 0.3 s deadline: the retries stop before the deadline."""
    attempts: Counter[int] = Counter()

    async def always_terminate(conn: PooledConnection, attempt: int) -> None:
        await kill_own_backend(conn)

    policy = RetryPolicy(attempts=50, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with open_pool(pg, pool_size=2) as pool:
        started = time.monotonic()
        with pytest.raises((PoolwardenError, asyncpg.PostgresError, asyncpg.InterfaceError,
                            OSError)) as failed:
            async with deadline(0.3):
                await run_transaction(pool, insert(table, 12, attempts, always_terminate),
                                      policy=policy)
        elapsed = time.monotonic() - started
    assert not isinstance(failed.value, CommitOutcomeUnknown)
    assert elapsed < 0.3 + 0.2
    assert 2 <= attempts[12] < 50
    assert await rows(pg, table) == {}


# ------------------------------------------------------------------ the fault workload


@pytest.mark.slow
async def test_under_random_resets_no_write_is_lost_duplicated_or_unreported(
    pg: EmbeddedPostgres, proxy: FaultProxy, table: str
) -> None:
    """200 writes with unique ids through the proxy (2 ms latency each way) while a chaos
    task resets every proxied connection or terminates a random backend every 30-120 ms.

    Afterwards: every acknowledged write is in the table, written by its last attempt;
    every write that raised anything but CommitOutcomeUnknown is absent (a write retried
    after its COMMIT landed would have hit the primary key and been reported as such);
    CommitOutcomeUnknown writes are present once or absent (both counted)."""
    n_writes, n_workers = 200, 12
    policy = RetryPolicy(attempts=8, initial_backoff_s=0.005, max_backoff_s=0.1)
    attempts: Counter[int] = Counter()
    acked: set[int] = set()
    unknown: set[int] = set()
    failed: dict[int, Exception] = {}
    ids = list(range(1, n_writes + 1))
    done = asyncio.Event()
    chaos_counts = Counter[str]()

    async def then(conn: PooledConnection, attempt: int) -> None:
        await conn.execute("SELECT 1")  # one more round trip inside the transaction

    async def worker() -> None:
        while ids:
            row_id = ids.pop()
            try:
                await run_transaction(pool, insert(table, row_id, attempts, then),
                                      policy=policy)
                acked.add(row_id)
            except CommitOutcomeUnknown:
                unknown.add(row_id)
            except Exception as exc:  # every other error is recorded and checked below
                failed[row_id] = exc

    async def chaos(application_name: str) -> None:
        rng = random.Random(20240607)
        while not done.is_set():
            await asyncio.sleep(rng.uniform(0.03, 0.12))
            if rng.random() < 0.5:
                chaos_counts["connections reset"] += proxy.reset_all()
            else:
                chaos_counts["backends terminated"] += int(await admin(
                    pg, "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM "
                        "pg_stat_activity WHERE application_name = $1 ORDER BY random() "
                        "LIMIT 1) AS victim", application_name))

    proxy.delay(0.002)
    # No circuit breaker: it would rightly refuse work during this much chaos, and the
    # subject here is what retries do to the data, on every write.
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=4, pool_size=8, acquire_timeout=10,
                         connect_timeout=2, command_timeout=5, max_concurrent_connects=4,
                         reconnect_initial_delay=0.01, reconnect_max_delay=0.1,
                         breaker=None) as pool:
        chaos_task = asyncio.create_task(chaos(pool.config.application_name))
        await asyncio.gather(*(worker() for _ in range(n_workers)))
        done.set()
        await chaos_task
        proxy.heal()
        stats = pool.stats()
    stored = await rows(pg, table)

    unknown_present = unknown & stored.keys()
    summary = (f"acked={len(acked)} unknown={len(unknown)} (present={len(unknown_present)}, "
               f"absent={len(unknown - unknown_present)}) failed={len(failed)} "
               f"{Counter(type(e).__name__ for e in failed.values())} attempts="
               f"{sum(attempts.values())} chaos={dict(chaos_counts)} "
               f"closed={stats.connections_closed_total}")
    print(f"\nfault workload: {summary}")
    assert acked | unknown | failed.keys() == set(range(1, n_writes + 1)), summary
    assert acked <= stored.keys(), summary  # nothing acknowledged is lost
    assert not failed.keys() & stored.keys(), summary  # a reported failure wrote nothing
    assert stored.keys() <= acked | unknown, summary
    assert all(stored[i] == attempts[i] for i in acked | unknown_present), summary
    assert all(isinstance(e, PoolwardenError | asyncpg.PostgresError | asyncpg.InterfaceError
                          | OSError) for e in failed.values()), summary
    assert sum(chaos_counts.values()) > 0, summary
    assert sum(attempts.values()) > n_writes, summary  # faults did hit transactions
    assert len(acked) > n_writes // 2, summary


# ------------------------------------------------------------------ SQLAlchemy


@contextlib.asynccontextmanager
async def sessions_on(pool: Pool) -> AsyncIterator[Any]:
    engine = create_async_engine_on(pool)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


def sa_insert(table: str, row_id: int, attempts: Counter[int],
              then: Callable[[AsyncSession, int], Awaitable[None]] | None = None,
              ) -> Callable[[AsyncSession], Awaitable[int]]:
    async def work(session: AsyncSession) -> int:
        attempts[row_id] += 1
        attempt = attempts[row_id]
        await session.execute(text(f"INSERT INTO {table} (id, v) VALUES (:id, :v)"),
                              {"id": row_id, "v": attempt})
        if then is not None:
            await then(session, attempt)
        return attempt
    return work


async def test_sqlalchemy_serialization_failure_is_retried(
    pg: EmbeddedPostgres, table: str
) -> None:
    """The write skew again, through AsyncSession: the 40001 under SQLAlchemy's wrappers
    is recognised, the loser runs again in a new session, both commit once."""
    both_read = asyncio.Barrier(2)
    attempts: Counter[int] = Counter()

    def work_for(row_id: int) -> Callable[[AsyncSession], Awaitable[int]]:
        async def work(session: AsyncSession) -> int:
            attempts[row_id] += 1
            seen = int((await session.execute(
                text(f"SELECT count(*) FROM {table} WHERE grp = 3"))).scalar_one())
            if attempts[row_id] == 1:
                await both_read.wait()
            await session.execute(text(f"INSERT INTO {table} (id, grp, v) VALUES (:id, 3, :v)"),
                                  {"id": row_id, "v": seen})
            return seen
        return work

    async with open_pool(pg, pool_size=4) as pool, sessions_on(pool) as sessions:
        results = await asyncio.gather(
            *(run_session(sessions, work_for(i), isolation="serializable", policy=FAST)
              for i in (31, 32)))
        assert pool.stats().connections_in_use == 0
    assert sorted(results) == [0, 1]
    assert sorted(attempts.values()) == [1, 2]
    assert sorted((await rows(pg, table)).values()) == [0, 1]


async def test_sqlalchemy_reset_before_commit_is_retried(
    pg: EmbeddedPostgres, proxy: FaultProxy, table: str
) -> None:
    """A reset mid-session (SQLAlchemy invalidates the connection) is retried in a new
    session; the row is written once; the dead connection is not handed out again."""
    attempts: Counter[int] = Counter()

    async def reset_on_first(session: AsyncSession, attempt: int) -> None:
        if attempt == 1:
            proxy.reset_all()
            await session.execute(text("SELECT 1"))

    async with open_pool(proxy.dsn_for(pg.dsn), pool_size=2) as pool, \
            sessions_on(pool) as sessions:
        assert await run_session(sessions, sa_insert(table, 33, attempts, reset_on_first),
                                 policy=FAST) == 2
        stats = pool.stats()
    assert await rows(pg, table) == {33: 2}
    assert stats.connections_in_use == 0
    assert stats.connections_closed_total.get("error", 0) >= 1


async def test_sqlalchemy_commit_in_flight_raises_commit_outcome_unknown(
    pg: EmbeddedPostgres, table: str
) -> None:
    """The backend dies while session.commit() waits for COMMIT: CommitOutcomeUnknown
    (chained from asyncpg's error, not SQLAlchemy's wrapper), one attempt only."""
    await slow_commit(pg, table)
    attempts: Counter[int] = Counter()
    async with open_pool(pg, pool_size=2) as pool, sessions_on(pool) as sessions:
        task = asyncio.create_task(run_session(sessions, sa_insert(table, 34, attempts),
                                               policy=FAST))
        await terminate_pid(pg, await commit_in_flight(pg, pool.config.application_name))
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await task
        assert pool.stats().connections_in_use == 0
    assert attempts[34] == 1
    assert unknown.value.node == pool.name
    cause = unknown.value.__cause__
    assert cause is not None
    assert type(cause).__module__.startswith("asyncpg")
    assert is_connection_lost(cause)
    assert await rows(pg, table) == {}


async def test_transaction_characteristics_are_applied_on_both_paths(
    pg: EmbeddedPostgres,
) -> None:
    """``isolation``, ``readonly`` and ``deferrable`` reach the server's transaction, in
    asyncpg's spelling on the raw path and in either spelling on the SQLAlchemy path."""
    show = ("SELECT current_setting('transaction_isolation'), "
            "current_setting('transaction_read_only'), "
            "current_setting('transaction_deferrable')")

    async def raw(conn: PooledConnection) -> tuple[str, ...]:
        return tuple(await conn.fetchrow(show))

    async def orm(session: AsyncSession) -> tuple[str, ...]:
        return tuple((await session.execute(text(show))).one())

    expected = ("serializable", "on", "on")
    async with open_pool(pg, pool_size=2) as pool, sessions_on(pool) as sessions:
        assert await run_transaction(pool, raw, isolation="serializable", readonly=True,
                                     deferrable=True) == expected
        assert await run_session(sessions, orm, isolation="serializable", readonly=True,
                                 deferrable=True) == expected
        assert await run_session(sessions, orm, isolation="REPEATABLE READ") == (
            "repeatable read", "off", "off")
        assert await run_session(sessions, orm) == ("read committed", "off", "off")
