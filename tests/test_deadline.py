"""The caller's deadline: pure semantics, then what it bounds on a real server — the wait
for a connection, each statement (client side) and transactions (server side)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from pool_helpers import assert_clean, config_for, open_pool, server_sessions
from poolwarden import Database, DeadlineExceeded, PoolTimeout
from poolwarden.deadline import bounded, current_deadline, deadline, no_deadline, remaining
from poolwarden.embedded import EmbeddedPostgres

# ---------------------------------------------------------------- pure semantics


def test_no_deadline_by_default() -> None:
    """Outside any block nothing is bounded."""
    assert current_deadline() is None
    assert remaining() is None
    assert bounded(3.0) == 3.0
    assert bounded(None) is None


def test_nested_deadlines_only_shorten_and_are_restored_on_exit() -> None:
    """An inner block cannot extend the outer budget; leaving a block restores the outer."""
    with deadline(10) as outer:
        assert current_deadline() == outer.at
        with deadline(60) as inner:
            assert inner.at == outer.at  # longer inner budget: the outer one stays
        with deadline(0.5) as short:
            assert short.at < outer.at
            assert current_deadline() == short.at
            left = bounded(30.0)
            assert left is not None
            assert left <= 0.5
        assert current_deadline() == outer.at
    assert current_deadline() is None


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True, None])
def test_bad_budgets_are_refused_with_a_clear_error(bad: object) -> None:
    """A negative, NaN or non-numeric budget is a ValueError naming the value."""
    with pytest.raises(ValueError, match="deadline"):
        deadline(bad)  # type: ignore[arg-type]


def test_a_block_cannot_be_entered_twice() -> None:
    block = deadline(1)
    with block, pytest.raises(RuntimeError, match="already entered"), block:
        pass


async def test_tasks_created_inside_inherit_the_deadline() -> None:
    """Context variables are copied into new tasks: spawned work is bounded too."""
    async with deadline(5) as block:
        seen = await asyncio.create_task(asyncio.sleep(0, result=current_deadline()))
    assert seen == block.at


def test_a_replacing_deadline_may_be_later_than_the_outer_one_and_nests_as_usual() -> None:
    """replace=True puts exactly this deadline in force, even a later one; blocks nested
    inside it shorten it as usual; leaving it restores the outer deadline."""
    with deadline(1) as outer:
        with deadline(60, replace=True) as own:
            assert own.at > outer.at
            assert current_deadline() == own.at
            with deadline(120) as longer:
                assert longer.at == own.at
            with deadline(0.5) as shorter:
                assert current_deadline() == shorter.at < outer.at
            assert current_deadline() == own.at
        assert current_deadline() == outer.at
        at = outer.at + 30
        with deadline(at=at, replace=True) as instant:
            assert instant.at == current_deadline() == at
        with deadline(0.1, replace=True) as earlier:  # replacing by an earlier one: as nesting
            assert current_deadline() == earlier.at < outer.at
        assert current_deadline() == outer.at
    assert current_deadline() is None


def test_no_deadline_drops_the_budget_for_the_block_only() -> None:
    """Inside no_deadline() nothing is bounded until a nested deadline bounds it again;
    the outer deadline is back when the block ends. Outside any deadline it changes nothing."""
    with deadline(1) as outer:
        with no_deadline():
            assert current_deadline() is None
            assert remaining() is None
            assert bounded(30.0) == 30.0
            with deadline(60) as inner:  # nothing to shorten it against: 60 s holds
                assert current_deadline() == inner.at > outer.at
            assert current_deadline() is None
        assert current_deadline() == outer.at
    with no_deadline():
        assert current_deadline() is None
    assert current_deadline() is None


@pytest.mark.parametrize(
    "make_block",
    [lambda: deadline(0.5), lambda: deadline(60, replace=True), no_deadline],
    ids=["nested", "replacing", "none"],
)
async def test_leaving_a_block_by_an_exception_restores_the_outer_deadline(
    make_block: Callable[[], deadline | no_deadline],
) -> None:
    """The exception propagates (a block never swallows it) and the deadline in force
    before the block is back, with ``with`` and ``async with`` alike."""
    async with deadline(5) as outer:
        with pytest.raises(LookupError, match="boom"), make_block():
            raise LookupError("boom")
        assert current_deadline() == outer.at
        with pytest.raises(LookupError, match="boom"):
            async with make_block():
                raise LookupError("boom")
        assert current_deadline() == outer.at
    assert current_deadline() is None


def test_bad_arguments_are_refused_naming_the_value() -> None:
    """Each ValueError says what was wrong and with which value; the message for a missing
    budget points to no_deadline()."""
    with pytest.raises(ValueError, match=r"replace must be True or False, got 'yes'"):
        deadline(1, replace="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got seconds=1 and at=2\.0"):
        deadline(1, at=2.0)
    with pytest.raises(ValueError, match=r"got neither .*no_deadline\(\)"):
        deadline(replace=True)
    with pytest.raises(ValueError, match=r"seconds must be >= 0, got -0\.5"):
        deadline(-0.5, replace=True)


def test_a_no_deadline_block_cannot_be_entered_twice_and_shows_itself() -> None:
    block = no_deadline()
    with block, pytest.raises(RuntimeError, match="already entered"), block:
        pass
    assert repr(block) == "<no_deadline>"
    assert "replacing" in repr(deadline(1, replace=True))
    assert "replacing" not in repr(deadline(1))


# ---------------------------------------------------------------- on a real server


async def test_expired_deadline_is_refused_without_touching_the_server(
    pg: EmbeddedPostgres,
) -> None:
    """Expired before start: DeadlineExceeded at once, no acquire counted, the pool idle."""
    async with open_pool(pg) as pool:
        before = pool.stats()
        with deadline(0), pytest.raises(DeadlineExceeded) as info:
            await pool.acquire()
        assert isinstance(info.value, PoolTimeout)
        assert isinstance(info.value, TimeoutError)
        after = pool.stats()
        assert after.acquires_total == before.acquires_total
        assert after.connections_in_use == 0
        assert after.acquire_timeouts_total == before.acquire_timeouts_total + 1


async def test_deadline_bounds_the_wait_for_a_connection(pg: EmbeddedPostgres) -> None:
    """A caller queued behind a held pool gives up at its deadline, well before the
    acquire timeout, with DeadlineExceeded carrying how long it waited."""
    async with open_pool(pg, pool_size=1, acquire_timeout=30.0) as pool:
        held = await pool.acquire()
        try:
            started = time.monotonic()
            with deadline(0.2), pytest.raises(DeadlineExceeded) as info:
                await pool.acquire()
            assert time.monotonic() - started < 5.0  # not the 30 s acquire timeout
            assert info.value.waited_s > 0
            assert pool.stats().requests_waiting == 0
        finally:
            await pool.release(held)


async def test_statement_is_cancelled_at_the_deadline_and_the_connection_reused(
    pg: EmbeddedPostgres,
) -> None:
    """A statement still running at the deadline is cancelled on the server; the caller
    gets DeadlineExceeded; the connection comes back clean and is reused, not closed."""
    async with open_pool(pg, pool_size=1) as pool:
        with pytest.raises(DeadlineExceeded) as info:
            async with deadline(0.2), pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(5)")
        assert isinstance(info.value.__cause__, TimeoutError)
        async with pool.connection() as conn:
            await assert_clean(conn)
        stats = pool.stats()
        assert stats.connections_created_total == 1  # the same connection served again
        sessions = await server_sessions(pg, pool.config.application_name)
        assert [s["state"] for s in sessions] == ["idle"]


async def test_transaction_gets_the_remaining_budget_as_server_statement_timeout(
    pg: EmbeddedPostgres,
) -> None:
    """Inside db.transaction() under a deadline, the server's statement_timeout is set
    (SET LOCAL) to the remaining budget, and it reverts when the transaction ends."""
    db = Database(config_for(pg))
    async with db:
        async with deadline(2.0), db.transaction() as conn:
            inside = await conn.fetchval("SELECT current_setting('statement_timeout')")
        async with db.connection() as conn:
            after = await conn.fetchval("SELECT current_setting('statement_timeout')")
        async with db.transaction() as conn:
            unbounded = await conn.fetchval("SELECT current_setting('statement_timeout')")
    # PostgreSQL shows whole seconds as "2s", else milliseconds as "1999ms"
    value_ms = int(inside.removesuffix("ms")) if inside.endswith("ms") else (
        int(inside.removesuffix("s")) * 1000)
    assert 0 < value_ms <= 2000
    assert after == unbounded == "0"


async def test_write_past_the_deadline_is_rolled_back(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """A transaction whose statement outlives the deadline commits nothing."""
    db = Database(config_for(pg))
    async with db:
        await db.execute(f"CREATE TABLE {unique_name} (id int PRIMARY KEY)")
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.3), db.transaction() as conn:
                await conn.execute(f"INSERT INTO {unique_name} VALUES (1)")
                await conn.execute("SELECT pg_sleep(3)")
        assert await db.fetchval(f"SELECT count(*) FROM {unique_name}") == 0


async def test_session_gets_the_server_statement_timeout(pg: EmbeddedPostgres) -> None:
    """The SQLAlchemy session path is bounded the same way."""
    from sqlalchemy import text

    db = Database(config_for(pg))
    async with db:
        async with deadline(1.5), db.session() as session:
            value = (await session.execute(text("SHOW statement_timeout"))).scalar_one()
        assert value.endswith("ms") or value.endswith("s")
        async with db.session() as session:
            assert (await session.execute(text("SHOW statement_timeout"))).scalar_one() == "0"


async def test_new_connections_do_not_inherit_the_callers_deadline(pg: EmbeddedPostgres) -> None:
    """The init hook of a connection opened for a waiter runs outside the waiter's
    deadline: connection set-up is the pool's work, not the request's."""
    seen: list[float | None] = []

    async def init(conn: asyncpg.Connection) -> None:
        seen.append(current_deadline())

    async with (
        open_pool(pg, min_size=0, pool_size=2, init=init) as pool,
        deadline(5.0),
        pool.connection() as conn,
    ):
        assert await conn.fetchval("SELECT 1") == 1
    assert seen
    assert all(value is None for value in seen)


async def test_a_task_with_its_own_deadline_outlives_the_budget_of_the_code_that_spawned_it(
    pg: EmbeddedPostgres,
) -> None:
    """Background work spawned under a short deadline: with a replacing deadline, or with
    none, it still runs a statement after the spawner's deadline has passed; the same work
    left with the inherited deadline is refused with DeadlineExceeded."""
    async with open_pool(pg) as pool:
        spawner_gone = asyncio.Event()

        async def work() -> int:
            await spawner_gone.wait()
            async with pool.connection() as conn:
                value: int = await conn.fetchval("SELECT 1")
                return value

        async def with_own_deadline() -> tuple[float | None, int]:
            async with deadline(30, replace=True):
                return current_deadline(), await work()

        async def with_no_deadline() -> tuple[float | None, int]:
            async with no_deadline():
                return current_deadline(), await work()

        async with deadline(0.1) as spawner:
            own = asyncio.create_task(with_own_deadline())
            unbounded = asyncio.create_task(with_no_deadline())
            with no_deadline():  # around create_task: the task's context is copied here
                wrapped = asyncio.create_task(work())
            inherited = asyncio.create_task(work())
        await asyncio.sleep(max(0.0, spawner.remaining()) + 0.02)
        assert spawner.expired
        spawner_gone.set()

        own_deadline, own_value = await own
        assert own_value == 1
        assert own_deadline is not None
        assert own_deadline > spawner.at
        assert await unbounded == (None, 1)
        assert await wrapped == 1
        with pytest.raises(DeadlineExceeded):
            await inherited
        assert pool.stats().connections_in_use == 0
