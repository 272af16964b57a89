"""command_timeout enforced by the pool's statement watchdog instead of a timer per statement.

The decision (:class:`StatementWatchdog.scan`) is checked on its own with stand-in
connections; the rest on a real server: a long statement is cancelled on the server and
reported as :class:`StatementTimeout`, a blackholed one is cut off, statements outside the
watched path keep asyncpg's exact timer, and short statements are never touched.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import pytest

from pool_helpers import open_pool, server_sessions
from poolwarden import StatementTimeout, deadline
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.events import Event, StatementStopped
from poolwarden.pool._driver import StatementSection
from poolwarden.pool._record import ConnState
from poolwarden.pool._watchdog import MAX_INTERVAL_S, MIN_INTERVAL_S, StatementWatchdog
from poolwarden.testing.proxy import FaultProxy

# ------------------------------------------------------------------ the decision, no server


def _section(acquired: int = 0, *, relied: bool = True) -> StatementSection:
    """The real section, on no connection; ``relied``: the statement running in it took
    its timeout from the watchdog (asyncpg read ``command_timeout`` and got none)."""
    section = StatementSection(cast(Any, None))
    section._acquired, section.relied = acquired, relied
    return section


@dataclass
class _Protocol:
    queries_count: int = 0


@dataclass
class _Conn:
    _stmt_exclusive_section: StatementSection = field(default_factory=_section)
    _protocol: _Protocol = field(default_factory=_Protocol)


@dataclass
class _Record:
    conn: _Conn = field(default_factory=_Conn)
    state: ConnState = ConnState.IN_USE
    stmt_mark: int = -1
    stmt_since: float = 0.0
    stmt_stage: int = 0


def _scan(dog: StatementWatchdog, record: _Record, now: float) -> list[tuple[str, float]]:
    return [(action, running) for _, action, running in dog.scan([record], now)]  # type: ignore[list-item]


def test_interval_is_a_tenth_of_the_timeout_within_bounds() -> None:
    assert StatementWatchdog(2.0).interval_s == pytest.approx(0.2)
    assert StatementWatchdog(0.01).interval_s == MIN_INTERVAL_S
    assert StatementWatchdog(600).interval_s == MAX_INTERVAL_S
    with pytest.raises(ValueError, match="timeout_s"):
        StatementWatchdog(0)


def test_a_running_statement_is_cancelled_once_then_terminated_once() -> None:
    dog = StatementWatchdog(1.0)
    record = _Record()
    record.conn._stmt_exclusive_section._acquired = 1
    record.conn._protocol.queries_count = 7
    assert _scan(dog, record, 10.0) == []  # first seen: the clock starts
    assert _scan(dog, record, 10.9) == []
    assert _scan(dog, record, 11.0) == [("cancel", 1.0)]
    assert _scan(dog, record, 11.5) == []  # cancelled already: not twice
    assert _scan(dog, record, 12.0) == [("terminate", 2.0)]
    assert _scan(dog, record, 30.0) == []  # terminated already


def test_progress_or_the_end_of_the_statement_restarts_the_clock() -> None:
    dog = StatementWatchdog(1.0)
    record = _Record()
    section, protocol = record.conn._stmt_exclusive_section, record.conn._protocol
    section._acquired = 1
    assert _scan(dog, record, 0.0) == []
    protocol.queries_count += 1  # the next message of the statement (prepare → execute)
    assert _scan(dog, record, 0.9) == []
    assert _scan(dog, record, 1.8) == []  # 0.9 s since the last progress
    section._acquired = 0  # the statement ended; the holder thinks
    assert _scan(dog, record, 5.0) == []
    section._acquired = 1  # a new statement with the same count cannot inherit the old clock
    assert _scan(dog, record, 5.1) == []
    assert _scan(dog, record, 6.0) == []
    assert _scan(dog, record, 6.1) == [("cancel", pytest.approx(1.0))]


def test_a_statement_with_its_own_timeout_is_left_alone() -> None:
    dog = StatementWatchdog(0.1)
    record = _Record()
    record.conn._stmt_exclusive_section = _section(1, relied=False)
    assert [_scan(dog, record, t) for t in (0.0, 1.0, 2.0)] == [[], [], []]


def test_statements_outside_the_section_are_watched_while_lent() -> None:
    """The SQLAlchemy dialect puts its cursor calls and transaction control (prepared
    statements and simple queries, outside asyncpg's section) under the watchdog: watched
    while lent, and only once asyncpg took its timeout from the watchdog."""
    dog = StatementWatchdog(1.0)
    record = _Record()
    section = record.conn._stmt_exclusive_section
    section.relied = False
    section.watch_outside()
    section.watch_outside()  # nested (a rollback inside an execute's error handling)
    assert _scan(dog, record, 0.0) == []  # lent, but no statement has asked for a timeout
    section.relied = True  # asyncpg read command_timeout (see bind_deadline)
    assert _scan(dog, record, 0.1) == []
    assert _scan(dog, record, 1.1) == [("cancel", pytest.approx(1.0))]
    section.unwatch_outside()
    assert section.busy
    section.unwatch_outside()
    assert not section.busy
    assert _scan(dog, record, 5.0) == []


def test_idle_and_closed_connections_are_ignored() -> None:
    dog = StatementWatchdog(0.1)
    for state in (ConnState.IDLE, ConnState.CLOSED):
        record = _Record(state=state)
        record.conn._stmt_exclusive_section._acquired = 1
        assert [_scan(dog, record, t) for t in (0.0, 1.0, 2.0)] == [[], [], []]


# ------------------------------------------------------------------ real server


async def test_a_long_statement_is_cancelled_on_the_server_and_reported_typed(
    pg: EmbeddedPostgres,
) -> None:
    """pg_sleep(30) with command_timeout 0.3 s and no deadline: StatementTimeout (a
    TimeoutError) within about the timeout, one StatementStopped event, nothing left running
    on the server, the connection replaced and the pool back to idle."""
    events: list[Event] = []
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=0.3) as pool:
        pool.events.subscribe(events.append)
        started = time.monotonic()
        with pytest.raises(StatementTimeout) as caught:
            async with pool.connection() as conn:
                await conn.fetchval("SELECT pg_sleep(30)::text || $1::text", "x")
        elapsed = time.monotonic() - started
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value.__cause__, asyncpg.QueryCanceledError)
        assert caught.value.running_s >= 0.3
        assert elapsed < 5
        stopped = [e for e in events if isinstance(e, StatementStopped)]
        assert [e.action for e in stopped] == ["cancel"]
        assert pool.stats().connections_closed_total.get("discarded") == 1
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert pool.stats().connections_in_use == 0
        sessions = await server_sessions(pg, pool.config.application_name)
        assert all(row["state"] == "idle" for row in sessions), sessions


async def test_a_blackholed_statement_is_cut_off(pg: EmbeddedPostgres, proxy: FaultProxy) -> None:
    """The server stops answering mid-statement: the CancelRequest cannot get through
    either, so the connection is closed; the caller gets StatementTimeout within a few
    timeouts, and the pool does not hand the dead connection on."""
    async with open_pool(proxy.dsn_for(pg.dsn), min_size=1, pool_size=1, command_timeout=0.3,
                         connect_timeout=0.5, acquire_timeout=1.0,
                         release_timeout=0.3) as pool:
        started = time.monotonic()
        with pytest.raises(StatementTimeout):
            async with pool.connection() as conn:
                proxy.blackhole()
                await conn.fetchval("SELECT $1::int", 1)
        assert time.monotonic() - started < 5
        assert pool.stats().connections_in_use == 0
        proxy.heal()
        async with pool.connection(timeout=5) as conn:
            assert await conn.fetchval("SELECT 1") == 1


async def test_statements_outside_the_watched_path_keep_asyncpgs_timer(
    pg: EmbeddedPostgres,
) -> None:
    """``execute`` without arguments and prepared statements are not watched: asyncpg's own
    timer stops them with its TimeoutError; the watchdog stops nothing."""
    events: list[Event] = []
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=0.3) as pool:
        pool.events.subscribe(events.append)
        with pytest.raises(TimeoutError) as simple:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")
        with pytest.raises(TimeoutError) as prepared:
            async with pool.connection() as conn:
                statement = await conn.prepare("SELECT pg_sleep(30)")
                await statement.fetchval()
        assert not isinstance(simple.value, StatementTimeout)
        assert not isinstance(prepared.value, StatementTimeout)
        assert not [e for e in events if isinstance(e, StatementStopped)]


async def test_an_explicit_timeout_longer_than_command_timeout_is_honoured(
    pg: EmbeddedPostgres,
) -> None:
    """``timeout=`` given to the statement overrides command_timeout, as in asyncpg: the
    watchdog does not stop it."""
    events: list[Event] = []
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=0.2) as pool:
        pool.events.subscribe(events.append)
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT $1::int FROM pg_sleep(0.7)", 7, timeout=10) == 7
        assert not [e for e in events if isinstance(e, StatementStopped)]


async def test_a_deadline_still_cuts_a_watched_statement_exactly(pg: EmbeddedPostgres) -> None:
    """With a deadline the statement gets asyncpg's timer set to the time left: it stops at
    the deadline (DeadlineExceeded), well before the 30 s command_timeout."""
    async with open_pool(pg, min_size=1, pool_size=1, command_timeout=30) as pool:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with deadline(0.3), pool.connection() as conn:
                await conn.fetchval("SELECT pg_sleep(30)::text || $1::text", "x")
        assert time.monotonic() - started < 3


async def test_statements_shorter_than_the_timeout_are_never_touched(
    pg: EmbeddedPostgres,
) -> None:
    """Many quick statements and some that take most of the timeout, from several tasks:
    none is stopped."""
    events: list[Event] = []
    async with open_pool(pg, min_size=2, pool_size=4, command_timeout=0.5) as pool:
        pool.events.subscribe(events.append)

        async def work(i: int) -> int:
            total = 0
            for j in range(30):
                async with pool.connection() as conn:
                    sleep = 0.2 if j % 10 == 0 else 0.0
                    total += await conn.fetchval("SELECT $1::int FROM pg_sleep($2)", i, sleep)
            return total

        results = await asyncio.gather(*(work(i) for i in range(6)))
        assert results == [30 * i for i in range(6)]
        assert not [e for e in events if isinstance(e, StatementStopped)]
        assert pool.stats().connections_closed_total.get("discarded", 0) == 0
