"""The pool's own observability on a real server: typed events to hooks and logging,
duration histograms in the stats, leak detection and the report of connections held at
close. (Slow queries, Prometheus and OpenTelemetry have their own test files.)"""

from __future__ import annotations

import asyncio
import logging

import pytest

from pool_helpers import config_for, open_pool
from poolwarden import Pool, PoolExhausted, PoolTimeout
from poolwarden import events as ev
from poolwarden.embedded import EmbeddedPostgres


def _records(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == kind]


async def test_hooks_receive_typed_events_for_a_known_workload(pg: EmbeddedPostgres) -> None:
    """A subscribed hook sees one Acquired and one Released per checkout, the connects,
    the refusal and the timeout — each a typed event naming the node."""
    seen: list[ev.Event] = []
    async with open_pool(pg, pool_size=1, max_waiting=1) as pool:
        unsubscribe = pool.events.subscribe(seen.append)
        for _ in range(3):
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        held = await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire(timeout=0.1))
        await asyncio.sleep(0.01)
        with pytest.raises(PoolExhausted):
            await pool.acquire()
        with pytest.raises(PoolTimeout):
            await waiter
        await pool.release(held)
        unsubscribe()
        async with pool.connection():
            pass  # not seen: unsubscribed
    kinds = [type(e) for e in seen]
    assert kinds.count(ev.Acquired) == 4
    assert kinds.count(ev.Released) == 4
    assert kinds.count(ev.Refused) == 1
    assert kinds.count(ev.TimedOut) == 1
    refused = next(e for e in seen if isinstance(e, ev.Refused))
    assert refused.reason == "queue_full"
    assert refused.waiting == 1
    timed_out = next(e for e in seen if isinstance(e, ev.TimedOut))
    assert timed_out.reason == "acquire_timeout"
    assert timed_out.waited_s > 0
    assert all(e.node == "test" for e in seen)
    released = [e for e in seen if isinstance(e, ev.Released)]
    assert all(e.hold_s >= 0 for e in released)


async def test_connect_and_close_events_carry_reason_and_no_password(
    pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening and closing connections are events (close with its reason); with
    echo_pool every event is logged at INFO with structured fields and no password."""
    caplog.set_level(logging.INFO, logger="poolwarden.events")
    seen: list[ev.Event] = []
    pool = Pool(config_for(pg, echo_pool=True, min_size=2, pool_size=2))
    pool.events.subscribe(seen.append)
    await pool.open()
    async with pool.connection() as conn:
        await pool.release(conn, discard=True)  # closed with reason "discarded"
        await pool.acquire()  # held: cut off (and closed) by close() below
    await pool.close(timeout=0.1)
    opened = [e for e in seen if isinstance(e, ev.ConnectionOpened)]
    closed = [e for e in seen if isinstance(e, ev.ConnectionClosed)]
    assert len(opened) >= 2
    assert all(e.pid > 0 and e.duration_s > 0 for e in opened)
    assert {"discarded", "pool_closed"} <= {e.reason for e in closed}
    logged = _records(caplog, "close")
    assert logged
    assert all(r.levelno == logging.INFO for r in logged)
    assert all(hasattr(r, "reason") and r.node == "test" for r in logged)
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert pg.password not in text


async def test_a_raising_hook_is_logged_once_and_never_breaks_the_pool(
    pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def broken(event: ev.Event) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("hook bug")

    async with open_pool(pg) as pool:
        pool.events.subscribe(broken)
        for _ in range(3):
            async with pool.connection() as conn:
                assert await conn.fetchval("SELECT 1") == 1
    assert calls >= 6
    assert len([r for r in caplog.records if "hook" in r.getMessage()]) == 1


async def test_histograms_count_every_acquire_hold_and_connect(pg: EmbeddedPostgres) -> None:
    """wait/use/create histograms have exactly as many observations as acquires, releases
    and connections created; waits that queued land above the zero bucket."""
    async with open_pool(pg, min_size=1, pool_size=2) as pool:
        async def user() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.02)")

        await asyncio.gather(*(user() for _ in range(8)))
        stats = pool.stats()
    hist = stats.histograms
    assert hist["wait"].count == stats.acquires_total == 8
    assert hist["use"].count == 8
    assert hist["use"].quantile(0.5) >= 0.01
    assert hist["create"].count == stats.connections_created_total
    assert sum(hist["wait"].counts[1:]) >= stats.acquires_waited_total - hist["wait"].counts[0]
    assert stats.as_dict()["histograms"]["use"]["counts"] == list(hist["use"].counts)


async def test_leak_is_reported_once_with_the_acquiring_stack(
    pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection held past leak_threshold gives exactly one WARNING with the stack of
    the code that acquired it, and leaks_total counts it; a short checkout gives none."""
    caplog.set_level(logging.WARNING, logger="poolwarden.events")
    async with open_pool(pg, leak_threshold=0.1, maintenance_interval=0.02) as pool:
        async with pool.connection():
            await asyncio.sleep(0.02)  # short: not a leak
        conn = await _forgetful_handler(pool)
        await asyncio.sleep(0.4)  # several maintenance passes
        leaks = _records(caplog, "leak")
        assert len(leaks) == 1
        record = leaks[0]
        assert record.levelno == logging.WARNING
        assert record.held_s >= 0.1
        assert record.pid == conn.get_server_pid()
        assert "acquired at" in record.getMessage()
        assert "_forgetful_handler" in record.getMessage()  # where it was acquired
        # and where the task holding it (here: in its local `conn`) is now
        assert "held by task" in record.getMessage()
        assert "test_leak_is_reported_once" in record.getMessage().split("held by task")[1]
        assert pool.stats().leaks_total == 1
        await pool.release(conn)


async def test_a_block_held_too_long_is_reported_with_where_its_task_is_now(
    pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """``async with pool.connection()`` captures no stack at checkout: the report shows the
    holding task's stack, which is inside the block that holds the connection."""
    caplog.set_level(logging.WARNING, logger="poolwarden.events")
    async with open_pool(pg, leak_threshold=0.1, maintenance_interval=0.02) as pool:
        task = asyncio.create_task(_slow_block(pool), name="slow-block")
        await task
    (record,) = _records(caplog, "leak")
    message = record.getMessage()
    assert "acquired at" not in message
    assert "held by task 'slow-block'" in message
    assert "_slow_block" in message.split("held by task")[1]


async def _slow_block(pool: Pool) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
        await asyncio.sleep(0.4)


async def _forgetful_handler(pool: Pool) -> object:
    return await pool.acquire()


async def test_connections_held_at_close_are_reported_by_node_and_age(
    pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """After the drain timeout, each connection still held is reported (node, pid, age)
    before it is cut off."""
    caplog.set_level(logging.WARNING, logger="poolwarden.events")
    pool = Pool(config_for(pg, leak_threshold=60))
    await pool.open()
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    await pool.close(timeout=0.05)
    held = _records(caplog, "held_at_close")
    assert len(held) == 1
    assert held[0].node == "test"
    assert held[0].pid == pid
    assert held[0].held_s > 0
    assert "test_connections_held_at_close" in held[0].getMessage()
