"""The fault proxy really breaks the network: delay, blackhole, reset, refuse, and heal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from poolwarden.embedded import EmbeddedPostgres
from poolwarden.testing import FaultProxy, ProxyMode

# Errors asyncpg raises when the connection under it is cut (they differ by the moment of the cut).
CONNECTION_LOST = (ConnectionError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)
SHORT_S = 0.3


async def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_pass_through_forwards_queries_and_counts_connections(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    assert proxy.mode is ProxyMode.PASS
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    try:
        assert await conn.fetchval("SELECT inet_server_port()") == pg.port
        assert (proxy.connections_accepted, proxy.connections_active) == (1, 1)
    finally:
        await conn.close()
    await _wait_until(lambda: proxy.connections_active == 0)
    assert proxy.connections_accepted == 1


def test_port_is_unknown_until_started(pg: EmbeddedPostgres) -> None:
    with pytest.raises(RuntimeError):
        _ = FaultProxy(pg.host, pg.port).port


async def test_dsn_for_keeps_credentials_database_and_query(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    dsn = "postgresql://u:p%40ss%3A%2F@db.example:5432/app?sslmode=disable"
    assert proxy.dsn_for(dsn) == (
        f"postgresql://u:p%40ss%3A%2F@127.0.0.1:{proxy.port}/app?sslmode=disable"
    )
    assert pg.password not in repr(proxy)


async def test_delay_adds_latency_both_ways_and_keeps_results_in_order(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    try:
        proxy.delay(0.1)
        started = time.monotonic()
        rows = await conn.fetch("SELECT g FROM generate_series(1, 5000) AS g")
        elapsed = time.monotonic() - started
        # The request and the reply are each held at least the delay (a lower bound only).
        assert elapsed >= 0.2
        assert [r["g"] for r in rows] == list(range(1, 5001))
        proxy.heal()
        assert proxy.delay_s == 0.0
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_blackhole_makes_a_query_time_out_and_heal_delivers_held_data(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    try:
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=SHORT_S)
        assert proxy.connections_active >= 1  # held open, not closed
    finally:
        conn.terminate()


async def test_blackhole_holds_a_query_until_heal(pg: EmbeddedPostgres, proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    try:
        proxy.blackhole()
        query = asyncio.ensure_future(conn.fetchval("SELECT 41 + 1"))
        done, _ = await asyncio.wait({query}, timeout=SHORT_S)
        assert not done
        proxy.heal()
        assert await asyncio.wait_for(query, timeout=5) == 42
    finally:
        await conn.close()


async def test_blackhole_makes_new_connections_time_out(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    proxy.blackhole()
    with pytest.raises(TimeoutError):
        await asyncpg.connect(proxy.dsn_for(pg.dsn), timeout=SHORT_S)
    assert proxy.connections_accepted == 1  # the TCP connection itself was accepted
    proxy.heal()
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_reset_all_breaks_open_connections_with_a_connection_error(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    try:
        assert proxy.reset_all() == 1
        with pytest.raises(CONNECTION_LOST):
            await conn.fetchval("SELECT 1")
        assert conn.is_closed()
    finally:
        conn.terminate()
    await _wait_until(lambda: proxy.connections_active == 0)
    assert proxy.connections_reset == 1
    # A reset is one-shot: new connections work at once.
    conn = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_refuse_fails_new_connections_and_heal_restores_them(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    existing = await asyncpg.connect(proxy.dsn_for(pg.dsn))
    try:
        proxy.refuse()
        with pytest.raises(CONNECTION_LOST):
            await asyncpg.connect(proxy.dsn_for(pg.dsn), timeout=5)
        assert proxy.connections_refused == 1
        assert await existing.fetchval("SELECT 1") == 1  # refusal only affects new ones
        proxy.heal()
        fresh = await asyncpg.connect(proxy.dsn_for(pg.dsn))
        assert await fresh.fetchval("SELECT 2") == 2
        await fresh.close()
    finally:
        await existing.close()


async def test_unreachable_target_resets_the_client(pg: EmbeddedPostgres) -> None:
    async with FaultProxy("127.0.0.1", 1) as dead:
        with pytest.raises(CONNECTION_LOST):
            await asyncpg.connect(dead.dsn_for(pg.dsn), timeout=5)


async def test_close_ends_connections_and_leaves_no_tasks(pg: EmbeddedPostgres) -> None:
    before = asyncio.all_tasks()
    async with FaultProxy(pg.host, pg.port) as temp:
        conn = await asyncpg.connect(temp.dsn_for(pg.dsn))
        temp.blackhole()
        held = await asyncio.open_connection(temp.host, temp.port)  # parked, never forwarded
    with pytest.raises(CONNECTION_LOST):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    held[1].close()
    assert temp.connections_active == 0
    assert asyncio.all_tasks() <= before  # every task the proxy started has finished
