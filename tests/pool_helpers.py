"""Helpers shared by the pool tests: pools with a test-unique application_name, and the
server's own view of those pools' connections (pg_stat_activity)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from poolwarden import Pool, PoolConfig
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.sqlalchemy import create_async_engine_on


def config_for(server: EmbeddedPostgres | str, **overrides: Any) -> PoolConfig:
    """A PoolConfig for ``server`` (or a DSN) whose application_name is unique to the call."""
    dsn = server if isinstance(server, str) else server.dsn
    options: dict[str, Any] = {
        "name": "test",
        "application_name": f"pw_test_{secrets.token_hex(4)}",
        "min_size": 1,
        "pool_size": 5,
        "max_overflow": 0,
        "acquire_timeout": 10.0,
        "maintenance_interval": 0.05,
    }
    options.update(overrides)
    return PoolConfig(dsn=dsn, **options)


@asynccontextmanager
async def open_pool(server: EmbeddedPostgres | str, **overrides: Any) -> AsyncIterator[Pool]:
    pool = Pool(config_for(server, **overrides))
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close(timeout=5)


async def server_sessions(server: EmbeddedPostgres, application_name: str) -> list[asyncpg.Record]:
    """The server's sessions for one application_name: pid, state, xact_start."""
    conn = await asyncpg.connect(server.dsn)
    try:
        return list(
            await conn.fetch(
                "SELECT pid, state, xact_start FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
        )
    finally:
        await conn.close()


async def settled(pool: Pool, timeout: float = 5.0) -> None:
    """Wait (bounded) until no connection of ``pool`` is in use: a SQLAlchemy block's
    rollback runs behind its release, holding the slot until the server answers."""
    deadline = asyncio.get_running_loop().time() + timeout
    while pool.stats().connections_in_use:
        assert asyncio.get_running_loop().time() < deadline, pool.stats()
        await asyncio.sleep(0.01)


async def terminate(server: EmbeddedPostgres, application_name: str) -> int:
    """pg_terminate_backend every session of ``application_name``; returns how many."""
    conn = await asyncpg.connect(server.dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                application_name,
            )
        )
    finally:
        await conn.close()


async def assert_clean(conn: asyncpg.Connection) -> None:
    """The connection is usable and carries no transaction from a previous user."""
    assert not conn.is_in_transaction()
    assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned() IS NULL")


@asynccontextmanager
async def engine_on(pool: Pool) -> AsyncIterator[AsyncEngine]:
    """A SQLAlchemy ``AsyncEngine`` on ``pool``, disposed of afterwards (the pool stays open)."""
    engine = create_async_engine_on(pool)
    try:
        yield engine
    finally:
        await engine.dispose()
