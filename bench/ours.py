"""poolwarden's own systems: the raw path and the SQLAlchemy engine on the same core.

Each is skipped, with the reason in the report, while the module it needs is not importable
(the pool core and the SQLAlchemy bridge land in their own issues).
"""

from __future__ import annotations

import asyncio
import importlib
import time
from dataclasses import dataclass, field
from typing import Any

from .drive import Shed
from .peers import SqlalchemyEngine
from .stats import TIMES
from .systems import SELECT1, SLEEP, PoolSpec, System

now = time.perf_counter_ns


def _module(name: str) -> Any:
    """Import a poolwarden module at run time: it may not exist yet when the bench starts."""
    return importlib.import_module(name)


SHED_QUEUE_PER_CONNECTION = 4  # the "shed" variant queues at most this many callers per connection


@dataclass(frozen=True, slots=True)
class Variant:
    """Options given to ``PoolConfig`` on top of the bench's sizing (the rest are defaults)."""

    options: dict[str, Any] = field(default_factory=dict)
    queue_per_connection: int | None = None  # sets max_waiting = size * this


async def open_pool(dsn: str, spec: PoolSpec, variant: Variant) -> Any:
    core = _module("poolwarden.pool")
    options = dict(variant.options)
    if variant.queue_per_connection is not None:
        options["max_waiting"] = spec.size * variant.queue_per_connection
    config = core.PoolConfig(
        dsn=dsn,
        name="bench",
        min_size=spec.size,
        pool_size=spec.size,
        max_overflow=0,
        acquire_timeout=spec.acquire_timeout_s,
        **options,
    )
    pool = core.Pool(config)
    await pool.open()
    return pool


class PoolwardenRaw:
    """The raw path: ``async with pool.connection() as conn`` (an asyncpg connection)."""

    def __init__(self, pool: Any) -> None:
        errors = _module("poolwarden.errors")
        self._pool = pool
        self._on_close: list[Any] = []
        self._exhausted: type[Exception] = errors.PoolExhausted
        self._timeout: type[Exception] = errors.PoolTimeout

    async def hold(self) -> int:
        async with self._pool.connection():
            t = now()
            await asyncio.sleep(0)
        return t

    async def select1(self) -> int:
        async with self._pool.connection() as conn:
            t = now()
            await conn.fetchval(SELECT1)
        return t

    async def sleep(self) -> int:
        try:
            async with self._pool.connection() as conn:
                t = now()
                await conn.execute(SLEEP)
        except self._exhausted as exc:
            raise Shed("refused", getattr(exc, "retry_after_s", None)) from exc
        except self._timeout as exc:
            raise Shed("timeout") from exc
        return t

    def on_close(self, stop: Any) -> None:
        self._on_close.append(stop)

    async def close(self) -> None:
        for stop in self._on_close:
            result = stop()
            if asyncio.iscoroutine(result):
                await result
        await self._pool.close()


class PoolwardenSqlalchemy(SqlalchemyEngine):
    """The SQLAlchemy ``AsyncEngine`` drawing its connections from a poolwarden pool."""

    def __init__(self, engine: Any, pool: Any) -> None:
        super().__init__(engine)
        self._pool = pool

    async def sleep(self) -> int:
        exhausted: type[Exception] = _module("poolwarden.errors").PoolExhausted
        try:
            return await super().sleep()
        except exhausted as exc:
            raise Shed("refused") from exc
        except TimeoutError as exc:  # PoolTimeout, however the bridge surfaces it
            raise Shed("timeout") from exc

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self._pool.close()


def _raw(variant: Variant) -> Any:
    async def opener(dsn: str, spec: PoolSpec) -> PoolwardenRaw:
        return PoolwardenRaw(await open_pool(dsn, spec, variant))

    return opener


async def _open_sqlalchemy(dsn: str, spec: PoolSpec) -> PoolwardenSqlalchemy:
    bridge = _module("poolwarden.sqlalchemy")
    pool = await open_pool(dsn, spec, Variant())
    return PoolwardenSqlalchemy(bridge.create_async_engine_on(pool), pool)


def _needs(module: str, what: str) -> Any:
    def missing() -> str | None:
        try:
            _module(module)
        except Exception as exc:  # a half-written module is "not available" too
            return f"{what} not available yet ({module}: {exc})"
        return None

    return missing


def _admission() -> dict[str, Any]:
    return {"admission": _module("poolwarden.protect.admission").AdmissionConfig()}


def _raw_admission(dsn: str, spec: PoolSpec) -> Any:
    return _raw(Variant(_admission()))(dsn, spec)


OBSERVABILITY_OFF: dict[str, Any] = {
    "query_stats": False, "slow_query_threshold": None, "leak_threshold": None,
}


async def _raw_observed(dsn: str, spec: PoolSpec) -> PoolwardenRaw:
    """Every observability feature meant for production on: histograms, statement timing,
    slow-query log, leak detection (the holder task per checkout) and the Prometheus adapter synced
    in the background. Per-checkout events (a subscribed hook, DB_ECHO_POOL) are a debugging
    switch and not included: they build two event objects per checkout (~1.5 µs)."""
    pool = await open_pool(dsn, spec, Variant({"leak_threshold": 30.0,
                                               "slow_query_threshold": 1.0}))
    try:
        metrics = _module("poolwarden.metrics")
        registry = _module("prometheus_client").CollectorRegistry()
        sync = metrics.MetricsSync(pool, metrics.PoolMetrics(registry), interval=1.0)
        sync.start()
        raw = PoolwardenRaw(pool)
        raw.on_close(sync.stop)
    except Exception:  # prometheus-client missing: the rest is still on
        raw = PoolwardenRaw(pool)
    return raw


POOLWARDEN = System(
    key="poolwarden",
    label="poolwarden raw",
    note="Pool(PoolConfig(min_size=P, pool_size=P, max_overflow=0)), other options default",
    open=_raw(Variant()),
    workloads=frozenset("abc"),
    missing=_needs("poolwarden.pool", "the pool core"),
)
OURS = (
    POOLWARDEN,
    System(
        key="poolwarden-noping",
        label="poolwarden raw, pre_ping=False",
        note="as poolwarden raw with pre_ping=False",
        open=_raw(Variant({"pre_ping": False})),
        workloads=frozenset("ab"),
        missing=_needs("poolwarden.pool", "the pool core"),
    ),
    System(
        key="poolwarden-shed",
        label=f"poolwarden raw, max_waiting={SHED_QUEUE_PER_CONNECTION}P",
        note=(
            f"as poolwarden raw with max_waiting={SHED_QUEUE_PER_CONNECTION}{TIMES}P: "
            "a bounded queue refuses the rest at once"
        ),
        open=_raw(Variant(queue_per_connection=SHED_QUEUE_PER_CONNECTION)),
        workloads=frozenset("c"),
        missing=_needs("poolwarden.pool", "the pool core"),
    ),
    System(
        key="poolwarden-admit",
        label="poolwarden raw, admission on",
        note=(
            "as poolwarden raw with admission=AdmissionConfig() (CoDel-style overload "
            "detection, refusals at arrival with a Retry-After the callers honour)"
        ),
        open=_raw_admission,
        workloads=frozenset("c"),
        missing=_needs("poolwarden.protect.admission", "overload admission"),
    ),
    System(
        key="poolwarden-obs-off",
        label="poolwarden raw, observability off",
        note="as poolwarden raw with query_stats=False, no slow-query log, no leak detection",
        open=_raw(Variant(OBSERVABILITY_OFF)),
        workloads=frozenset("d"),
        missing=_needs("poolwarden.pool", "the pool core"),
    ),
    System(
        key="poolwarden-obs-on",
        label="poolwarden raw, all observability on",
        note=(
            "histograms, statement timing + slow-query log, leak detection (holder task per "
            "checkout), Prometheus adapter synced every second"
        ),
        open=_raw_observed,
        workloads=frozenset("d"),
        missing=_needs("poolwarden.metrics", "the metrics adapter"),
    ),
    System(
        key="poolwarden-sqla",
        label="poolwarden SQLAlchemy",
        note="create_async_engine_on(pool) on a pool as poolwarden raw; same queries as SQLAlchemy",
        open=_open_sqlalchemy,
        workloads=frozenset("abc"),
        missing=_needs("poolwarden.sqlalchemy", "the SQLAlchemy engine on the core"),
    ),
)
