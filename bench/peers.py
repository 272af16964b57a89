"""The peers poolwarden is measured against: asyncpg's pool, SQLAlchemy's, psycopg_pool's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as SqlalchemyTimeout
from sqlalchemy.ext.asyncio import create_async_engine

from .drive import Shed
from .systems import SELECT1, SLEEP, PoolSpec, System, always_available

now = time.perf_counter_ns
ALL = frozenset("abc")


class AsyncpgPool:
    """asyncpg's ``Pool``; ``reset=None`` is its default (a reset query on every release)."""

    def __init__(self, pool: Any, spec: PoolSpec) -> None:
        self._pool = pool
        self._timeout = spec.acquire_timeout_s

    @classmethod
    async def open(cls, dsn: str, spec: PoolSpec, *, no_reset: bool = False) -> AsyncpgPool:
        extra: dict[str, Any] = {"reset": _no_reset} if no_reset else {}
        pool = await asyncpg.create_pool(dsn, min_size=spec.size, max_size=spec.size, **extra)
        return cls(pool, spec)

    async def hold(self) -> int:
        async with self._pool.acquire(timeout=self._timeout):
            t = now()
            await asyncio.sleep(0)
        return t

    async def select1(self) -> int:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            t = now()
            await conn.fetchval(SELECT1)
        return t

    async def sleep(self) -> int:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                t = now()
                await conn.execute(SLEEP)
        except TimeoutError as exc:  # only the acquire has a timeout here
            raise Shed("timeout") from exc
        return t

    async def close(self) -> None:
        await self._pool.close()


async def _no_reset(conn: Any) -> None:
    """asyncpg ``reset=`` hook that sends nothing (the default sends RESET ALL & co.)."""


class SqlalchemyEngine:
    """An ``AsyncEngine`` (any pool behind it); ``SELECT 1`` via ``conn.execute(text(...))``."""

    def __init__(self, engine: Any, *, dispose: bool = True) -> None:
        self._engine = engine
        self._select1 = text(SELECT1)
        self._sleep = text(SLEEP)
        self._dispose = dispose

    @classmethod
    async def open(cls, dsn: str, spec: PoolSpec) -> SqlalchemyEngine:
        url = make_url(dsn).set(drivername="postgresql+asyncpg")
        engine = create_async_engine(
            url, pool_size=spec.size, max_overflow=0, pool_timeout=spec.acquire_timeout_s
        )
        client = cls(engine)
        await client.warm(spec.size)
        return client

    async def warm(self, size: int) -> None:
        """Open ``size`` connections now, as the other pools do at open (QueuePool is lazy)."""
        conns = [await self._engine.connect() for _ in range(size)]
        for conn in conns:
            await conn.close()

    async def hold(self) -> int:
        async with self._engine.connect():
            t = now()
            await asyncio.sleep(0)
        return t

    async def select1(self) -> int:
        async with self._engine.connect() as conn:
            t = now()
            (await conn.execute(self._select1)).scalar()
        return t

    async def sleep(self) -> int:
        try:
            async with self._engine.connect() as conn:
                t = now()
                await conn.execute(self._sleep)
        except SqlalchemyTimeout as exc:
            raise Shed("timeout") from exc
        return t

    async def close(self) -> None:
        if self._dispose:
            await self._engine.dispose()


class PsycopgPool:
    """psycopg_pool's ``AsyncConnectionPool``; ``autocommit`` sends no BEGIN/COMMIT."""

    def __init__(self, pool: Any, spec: PoolSpec) -> None:
        self._pool = pool
        self._timeout = spec.acquire_timeout_s

    @classmethod
    async def open(cls, dsn: str, spec: PoolSpec, *, autocommit: bool = False) -> PsycopgPool:
        pool = AsyncConnectionPool(
            dsn,
            min_size=spec.size,
            max_size=spec.size,
            timeout=spec.acquire_timeout_s,
            kwargs={"autocommit": autocommit},
            open=False,
        )
        await pool.open(wait=True)
        return cls(pool, spec)

    async def hold(self) -> int:
        async with self._pool.connection(self._timeout):
            t = now()
            await asyncio.sleep(0)
        return t

    async def select1(self) -> int:
        async with self._pool.connection(self._timeout) as conn:
            t = now()
            await (await conn.execute(SELECT1)).fetchone()
        return t

    async def sleep(self) -> int:
        try:
            async with self._pool.connection(self._timeout) as conn:
                t = now()
                await conn.execute(SLEEP)
        except TooManyRequests as exc:
            raise Shed("refused") from exc
        except PoolTimeout as exc:
            raise Shed("timeout") from exc
        return t

    async def close(self) -> None:
        await self._pool.close()


async def _asyncpg_noreset(dsn: str, spec: PoolSpec) -> AsyncpgPool:
    return await AsyncpgPool.open(dsn, spec, no_reset=True)


async def _psycopg_autocommit(dsn: str, spec: PoolSpec) -> PsycopgPool:
    return await PsycopgPool.open(dsn, spec, autocommit=True)


ASYNCPG = System(
    key="asyncpg",
    label="asyncpg Pool",
    note="asyncpg.create_pool(min_size=P, max_size=P); default reset (RESET ALL & co.)",
    open=AsyncpgPool.open,
    workloads=ALL,
    missing=always_available,
)
PEERS = (
    ASYNCPG,
    System(
        key="asyncpg-noreset",
        label="asyncpg Pool, no reset",
        note="as above with reset= a no-op coroutine: no query on release",
        open=_asyncpg_noreset,
        workloads=frozenset("ab"),
        missing=always_available,
    ),
    System(
        key="sqlalchemy",
        label="SQLAlchemy QueuePool",
        note=(
            "create_async_engine(postgresql+asyncpg, pool_size=P, max_overflow=0); "
            "AsyncAdaptedQueuePool, pool_pre_ping off (its default); "
            "engine.connect() + execute(text(...)): BEGIN (implicit), query, ROLLBACK"
        ),
        open=SqlalchemyEngine.open,
        workloads=ALL,
        missing=always_available,
    ),
    System(
        key="psycopg",
        label="psycopg_pool",
        note="AsyncConnectionPool(min_size=P, max_size=P); pool.connection() commits on exit",
        open=PsycopgPool.open,
        workloads=ALL,
        missing=always_available,
    ),
    System(
        key="psycopg-ac",
        label="psycopg_pool autocommit",
        note="as above with kwargs={'autocommit': True}: no BEGIN/COMMIT",
        open=_psycopg_autocommit,
        workloads=frozenset("b"),
        missing=always_available,
    ),
)
