"""OpenTelemetry metrics through opentelemetry-api, read back with the SDK's in-memory
reader after a workload whose counts are known, on real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pool_helpers import config_for
from poolwarden import Pool, PoolTimeout
from poolwarden.database import Database
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.otel import POOL_NAME, Instrumentation, instrument
from poolwarden.pool.histogram import DURATION_BOUNDS_S

STATE = "db.client.connection.state"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    meter_provider = MeterProvider(metric_readers=[reader])
    yield meter_provider
    meter_provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Every data point collected now, by instrument name."""
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def value_of(points: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    """The one point of ``name`` whose attributes are exactly ``attributes`` (keys with
    dots spelled with underscores)."""
    wanted = {key.replace("_", "."): value for key, value in attributes.items()}
    matches = [p for p in points.get(name, []) if dict(p.attributes) == wanted]
    assert len(matches) == 1, (name, wanted, points.get(name))
    return matches[0]


@asynccontextmanager
async def instrumented_pool(
    provider: MeterProvider, name: str, dsn: str, **overrides: Any
) -> AsyncIterator[tuple[Pool, Instrumentation]]:
    """A pool instrumented before it opens (so its first connection is recorded)."""
    pool = Pool(config_for(dsn, name=name, **overrides))
    instrumentation = instrument(pool, meter_provider=provider)
    await pool.open()
    try:
        yield pool, instrumentation
    finally:
        instrumentation.close()
        await pool.close(timeout=5)


async def test_instruments_match_a_known_workload(
    pg: EmbeddedPostgres, unique_name: str, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """After 13 checkouts (2 waiting for a new connection), 1 acquire timeout, 3 connections
    created and 11 statements (1 failing), every instrument has the expected value, the
    pool-name attribute, and the histograms the core's bucket bounds."""
    async with instrumented_pool(provider, unique_name, pg.dsn, min_size=1, pool_size=2,
                                 max_overflow=1, pre_ping=False) as (pool, _):
        for _ in range(10):
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        held = [await pool.acquire() for _ in range(3)]
        with pytest.raises(PoolTimeout):
            await pool.acquire(timeout=0.05)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await held[0].fetchval("SELECT 1 / 0")

        during = collect(reader)
        attrs = {"db_client_connection_pool_name": unique_name}
        assert value_of(during, "db.client.connection.count", **attrs,
                        db_client_connection_state="used").value == 3
        assert value_of(during, "db.client.connection.count", **attrs,
                        db_client_connection_state="idle").value == 0
        assert value_of(during, "db.client.connection.max", **attrs).value == 3
        assert value_of(during, "db.client.connection.idle.max", **attrs).value == 2
        assert value_of(during, "db.client.connection.idle.min", **attrs).value == 1
        assert value_of(during, "db.client.connection.pending_requests", **attrs).value == 0
        assert value_of(during, "db.client.connection.timeouts", **attrs).value == 1

        for conn in held:
            await pool.release(conn)
        after = collect(reader)

    assert value_of(after, "db.client.connection.count", **attrs,
                    db_client_connection_state="idle").value == 2
    create = value_of(after, "db.client.connection.create_time", **attrs)
    wait = value_of(after, "db.client.connection.wait_time", **attrs)
    use = value_of(after, "db.client.connection.use_time", **attrs)
    ok = value_of(after, "db.client.operation.duration", **attrs,
                  db_system_name="postgresql")
    failed = value_of(after, "db.client.operation.duration", **attrs,
                      db_system_name="postgresql", error_type="DivisionByZeroError")
    assert (create.count, wait.count, use.count, ok.count, failed.count) == (3, 13, 13, 10, 1)
    assert create.sum > 0
    assert wait.sum > 0
    for point in (create, wait, use, ok, failed):
        assert tuple(point.explicit_bounds) == DURATION_BOUNDS_S
        assert sum(point.bucket_counts) == point.count


async def test_close_stops_recording(
    pg: EmbeddedPostgres, unique_name: str, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """After Instrumentation.close() no checkout or statement is recorded and the
    asynchronous instruments report nothing for the pool; the pool's bus is quiet again."""
    async with instrumented_pool(provider, unique_name, pg.dsn, pre_ping=False) as (pool, inst):
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
        before = collect(reader)
        inst.close()
        inst.close()  # idempotent
        assert inst.closed
        assert "closed" in repr(inst)
        assert not pool.events.active
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
        after = collect(reader)
    for name in ("db.client.connection.wait_time", "db.client.connection.use_time",
                 "db.client.operation.duration"):
        assert [p.count for p in after[name]] == [p.count for p in before[name]] == [1]
    assert not after.get("db.client.connection.count")


async def test_a_database_is_instrumented_pool_by_pool(
    pg: EmbeddedPostgres, unique_name: str, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """instrument(Database) reports each of its pools under its node name."""
    db = Database(config_for(pg, name=unique_name, min_size=2, pre_ping=False))
    with instrument(db, meter_provider=provider):
        async with db:
            async with db.connection() as conn:
                await conn.fetchval("SELECT 1")
            points = collect(reader)
    attrs = {"db_client_connection_pool_name": unique_name}
    assert value_of(points, "db.client.connection.count", **attrs,
                    db_client_connection_state="idle").value == 2
    assert value_of(points, "db.client.connection.create_time", **attrs).count == 2
    assert value_of(points, "db.client.operation.duration", **attrs,
                    db_system_name="postgresql").count == 1


async def test_no_password_in_any_attribute(
    pg: EmbeddedPostgres, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Even a pool carelessly named by its DSN reports no password in any attribute."""
    async with instrumented_pool(provider, pg.dsn, pg.dsn, pre_ping=False) as (pool, _):
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
        points = collect(reader)
    assert points
    dump = repr([dict(p.attributes) for values in points.values() for p in values])
    assert POOL_NAME in dump
    assert pg.password not in dump
    assert quote(pg.password, safe="") not in dump


def test_without_opentelemetry_instrument_names_the_extra() -> None:
    """With opentelemetry-api missing, poolwarden.otel imports and instrument() raises an
    ImportError naming the poolwarden[otel] extra."""
    script = textwrap.dedent("""
        import sys
        sys.modules["opentelemetry"] = None  # as if the `otel` extra were missing
        from poolwarden import otel
        assert not otel.otel_available()
        try:
            otel.instrument(object())
        except ImportError as exc:
            assert "poolwarden[otel]" in str(exc), exc
        else:
            raise SystemExit("instrument() should need opentelemetry-api")
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
