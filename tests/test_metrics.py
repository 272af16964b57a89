"""Prometheus metrics: scraped and parsed after workloads whose counts are known, on real
PostgreSQL; multiprocess mode with two real worker processes; no password in any label."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from metrics_helpers import worker_processes
from pool_helpers import config_for, open_pool
from poolwarden import PoolExhausted, PoolStats, PoolTimeout
from poolwarden.database import Database
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.metrics import (
    POOL_LABEL,
    MetricsSync,
    NoopMetrics,
    PoolMetrics,
    make_exporter,
    render,
)
from poolwarden.pool import CloseReason

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str, node: str, *, histograms: bool = False) -> Series:
    """Every sample of ``node`` in the exposition ``text`` (parsed, not grepped), keyed by
    sample name and its other labels; ``_created`` timestamps left out, and the histograms
    unless asked for (the core's are checked in test_metrics_histograms.py)."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram" and not histograms:
            continue
        for sample in family.samples:
            if sample.labels.get(POOL_LABEL) != node or sample.name.endswith("_created"):
                continue
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != POOL_LABEL))
            out[sample.name, labels] = sample.value
    return out


def scrape_registry(
    registry: CollectorRegistry, node: str, *, histograms: bool = False
) -> Series:
    body, content_type = render(registry)
    assert content_type.startswith("text/plain")
    return scrape(body.decode(), node, histograms=histograms)


def expected(
    *, idle: int, used: int, max_: int, idle_max: int, idle_min: int, pending: int = 0,
    opening: int = 0, overflow: int = 0, timeouts: int = 0, acquires: int = 0, waited: int = 0,
    wait_s: float = 0.0, refusals: int = 0, cancelled: int = 0, created: int = 0,
    errors: int = 0, pings: int = 0, ping_failures: int = 0, restores: int = 0,
    restarts: int = 0, closed: Mapping[str, int] | None = None, limit: int | None = None,
    leaks: int = 0, shed: int = 0, circuit_refusals: int = 0,
) -> Series:
    """The full set of series one node must have, with these values."""
    out: Series = {
        ("db_client_connection_count", (("db_client_connection_state", "idle"),)): idle,
        ("db_client_connection_count", (("db_client_connection_state", "used"),)): used,
        ("db_client_connection_max", ()): max_,
        ("db_client_connection_idle_max", ()): idle_max,
        ("db_client_connection_idle_min", ()): idle_min,
        ("db_client_connection_pending_requests", ()): pending,
        ("poolwarden_connections_opening", ()): opening,
        ("poolwarden_connections_overflow", ()): overflow,
        ("db_client_connection_timeouts_total", ()): timeouts,
        ("poolwarden_acquires_total", ()): acquires,
        ("poolwarden_acquires_waited_total", ()): waited,
        ("poolwarden_acquire_wait_seconds_total", ()): wait_s,
        ("poolwarden_acquire_refusals_total", ()): refusals,
        ("poolwarden_acquire_cancelled_total", ()): cancelled,
        ("poolwarden_connections_created_total", ()): created,
        ("poolwarden_connection_errors_total", ()): errors,
        ("poolwarden_pings_total", ()): pings,
        ("poolwarden_ping_failures_total", ()): ping_failures,
        ("poolwarden_connection_restores_total", ()): restores,
        ("poolwarden_server_restarts_total", ()): restarts,
        ("poolwarden_concurrency_limit", ()): max_ if limit is None else limit,
        ("poolwarden_overloaded", ()): 0,
        ("poolwarden_breaker_open", ()): 0,
        ("poolwarden_connection_leaks_total", ()): leaks,
        ("poolwarden_acquire_shed_total", ()): shed,
        ("poolwarden_circuit_refusals_total", ()): circuit_refusals,
    }
    for reason in CloseReason:
        count = (closed or {}).get(reason.value, 0)
        out["poolwarden_connections_closed_total", (("reason", reason.value),)] = count
    return out


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not reached")


def stats_of(name: str, **changes: object) -> PoolStats:
    """A snapshot made by hand, for the pure exporter tests."""
    base = PoolStats(
        name=name, min_size=1, pool_size=2, max_overflow=1, max_size=3, max_waiting=10,
        connections=1, connections_idle=1, connections_in_use=0, connections_opening=0,
        connections_overflow=0, requests_waiting=0, closed=False, acquires_total=0,
        acquires_waited_total=0, acquire_wait_ms_total=0.0, acquire_timeouts_total=0,
        acquire_refusals_total=0, acquire_cancelled_total=0, connections_created_total=1,
        connection_errors_total=0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- real PostgreSQL workload


async def test_each_metric_matches_a_known_workload_and_resync_does_not_double_count(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    # min 1 < idle max 2 < max 3, so a mix-up of the three limits shows.
    async with open_pool(
        pg, name=unique_name, min_size=1, pool_size=2, max_overflow=1, max_waiting=1,
        pre_ping=False,
    ) as pool:
        for _ in range(16):  # 16 acquires, all served by the one warm connection
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        held = [await pool.acquire() for _ in range(3)]  # 3 more; two wait for new ones
        for _ in range(2):  # 2 timeouts: the pool is at max_size
            with pytest.raises(PoolTimeout):
                await pool.acquire(timeout=0.05)
        cancelled = asyncio.ensure_future(pool.acquire())  # 1 cancelled while waiting
        await wait_until(lambda: pool.stats().requests_waiting == 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        waiter = asyncio.ensure_future(pool.acquire())
        await wait_until(lambda: pool.stats().requests_waiting == 1)
        with pytest.raises(PoolExhausted):  # 1 refusal: max_waiting=1 already waits
            await pool.acquire()
        await pool.release(held[0])  # handed to the waiter: the 20th acquire
        third = await waiter
        await pool.release(held[1])  # above pool_size: closed as overflow
        await pool.release(held[2])  # kept idle
        await pool.release(third, discard=True)  # 1 discard
        await wait_until(lambda: pool.stats().connections == 1)
        stats = pool.stats()

        metrics.sync(pool.stats())
        first = scrape_registry(registry, unique_name)
        want = expected(
            idle=1, used=0, max_=3, idle_max=2, idle_min=1, timeouts=2, acquires=20, waited=3,
            wait_s=stats.acquire_wait_ms_total / 1000, refusals=1, cancelled=1, created=3,
            closed={"overflow": 1, "discarded": 1},
        )
        assert first == pytest.approx(want)
        assert stats.acquire_wait_ms_total > 0

        metrics.sync(pool.stats())  # no new work: nothing changes
        assert scrape_registry(registry, unique_name) == first

        async with pool.connection():  # one more acquire, held while syncing
            metrics.sync({unique_name: pool.stats()})
            during = scrape_registry(registry, unique_name)
    assert during == pytest.approx(
        want | {
            ("poolwarden_acquires_total", ()): 21,
            ("db_client_connection_count", (("db_client_connection_state", "idle"),)): 0,
            ("db_client_connection_count", (("db_client_connection_state", "used"),)): 1,
        }
    )


async def test_no_password_in_the_exposition_even_with_a_dsn_for_a_node_name(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    async with open_pool(pg, name=unique_name) as pool:
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
        metrics.sync(pool.stats())
        metrics.sync({pg.dsn: pool.stats()})  # a careless caller labels a node by its DSN
    text = render(registry)[0].decode()
    assert unique_name in text
    for secret in {pg.password, quote(pg.password, safe=""), pg.dsn}:
        assert secret not in text


async def test_background_sync_follows_a_database_and_stops_cleanly(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    registry = CollectorRegistry()
    async with Database(config_for(pg, name=unique_name, pre_ping=False)) as db:
        sync = MetricsSync(db, PoolMetrics(registry), interval=0.05)
        async with sync:
            assert sync.running
            for _ in range(4):
                async with db.connection() as conn:
                    await conn.fetchval("SELECT 1")

            def synced() -> bool:
                series = scrape_registry(registry, unique_name)
                return series.get(("poolwarden_acquires_total", ())) == 4

            await wait_until(synced)
        assert not sync.running
        await sync.stop()  # idempotent
        assert "stopped" in repr(sync)


async def test_background_sync_ends_when_its_source_is_gone() -> None:
    class Source:
        def stats(self) -> PoolStats:
            return stats_of("gone")

    source = Source()
    sync = MetricsSync(source, NoopMetrics(), interval=0.01)
    sync.start()
    assert sync.running
    del source
    gc.collect()
    await wait_until(lambda: not sync.running)
    assert sync.sync_now() is False
    await sync.stop()


# ---------------------------------------------------------------- the exporter alone


def test_a_new_pool_under_the_same_name_counts_from_zero_not_backwards() -> None:
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    metrics.sync(stats_of("n", acquires_total=20, connections_created_total=3,
                          connections_closed_total={"overflow": 2}))
    # the pool was replaced: its counters restarted below the old ones
    metrics.sync(stats_of("n", acquires_total=5, connections_created_total=1))
    series = scrape_registry(registry, "n")
    assert series["poolwarden_acquires_total", ()] == 25
    assert series["poolwarden_connections_created_total", ()] == 4
    assert series["poolwarden_connections_closed_total", (("reason", "overflow"),)] == 2
    metrics.sync(stats_of("n", acquires_total=7, connections_created_total=1))
    assert scrape_registry(registry, "n")["poolwarden_acquires_total", ()] == 27


@dataclasses.dataclass(frozen=True)
class Buckets:
    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float


def test_histogram_snapshots_are_fed_by_increments_and_only_once_given() -> None:
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    metrics.sync(stats_of("h"))
    names = {name for name, _ in scrape_registry(registry, "h", histograms=True)}
    assert not any("time_seconds" in name for name in names)  # nothing invented

    metrics.observe_histogram("h", "wait", Buckets((0.01, 0.1), (3, 1, 0), 0.08))
    metrics.observe_histogram("h", "wait", Buckets((0.01, 0.1), (5, 1, 1), 0.6))
    metrics.observe_histogram("h", "wait", Buckets((0.01, 0.1), (5, 1, 1), 0.6))  # no change
    series = scrape_registry(registry, "h", histograms=True)
    name = "db_client_connection_wait_time_seconds"
    assert series[name + "_bucket", (("le", "0.01"),)] == 5
    assert series[name + "_bucket", (("le", "0.1"),)] == 6
    assert series[name + "_bucket", (("le", "+Inf"),)] == 7
    assert series[name + "_count", ()] == 7
    assert series[name + "_sum", ()] == pytest.approx(0.6)

    with pytest.raises(ValueError, match="bounds changed"):
        metrics.observe_histogram("h", "wait", Buckets((0.5,), (1, 1), 1.0))
    with pytest.raises(ValueError, match="unknown histogram kind"):
        metrics.observe_histogram("h", "bogus", Buckets((0.5,), (1, 1), 1.0))


def test_without_prometheus_client_poolwarden_imports_and_metrics_are_a_no_op() -> None:
    script = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None  # as if the `metrics` extra were missing
        import poolwarden
        from poolwarden import metrics
        assert not metrics.prometheus_available()
        exporter = metrics.make_exporter()
        assert isinstance(exporter, metrics.NoopMetrics)
        class Source:
            def stats(self):
                return {}
        source = Source()
        sync = metrics.MetricsSync(source)  # the no-op exporter by default
        assert isinstance(sync.exporter, metrics.NoopMetrics)
        assert sync.sync_now()
        try:
            metrics.PoolMetrics()
        except ImportError as exc:
            assert "poolwarden[metrics]" in str(exc)
        else:
            raise SystemExit("PoolMetrics() should need prometheus-client")
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_make_exporter_with_a_registry_gives_a_prometheus_exporter() -> None:
    registry = CollectorRegistry()
    exporter = make_exporter(registry)
    assert isinstance(exporter, PoolMetrics)
    assert exporter.registry is registry


# ---------------------------------------------------------------- multiprocess mode

WORKER = textwrap.dedent("""
    import asyncio, os, sys
    from poolwarden import Pool, PoolConfig
    from poolwarden.metrics import MetricsSync, default_metrics

    async def main() -> None:
        pool = Pool(PoolConfig(dsn=os.environ["PW_DSN"], name=os.environ["PW_NODE"],
                               min_size=1, pool_size=2, max_overflow=3, pre_ping=False))
        await pool.open()
        for _ in range(int(sys.argv[1])):
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        MetricsSync(pool, default_metrics()).sync_now()
        print("synced", flush=True)
        sys.stdin.readline()  # stay alive (a live worker) until the test has scraped
        await pool.close()

    asyncio.run(main())
""")


def test_two_worker_processes_are_summed_and_a_dead_ones_gauges_drop_out(
    pg: EmbeddedPostgres, unique_name: str, tmp_path: Path
) -> None:
    env = {"PW_DSN": pg.dsn, "PW_NODE": unique_name}
    with worker_processes(tmp_path, WORKER, env, (5, 7)) as (multiproc_dir, workers):
        body, _ = render(multiprocess_dir=str(multiproc_dir))
        text = body.decode()
        both = expected(idle=2, used=0, max_=10, idle_max=4, idle_min=2, acquires=12,
                        created=2)
        assert scrape(text, unique_name) == both
        assert pg.password not in text
        assert quote(pg.password, safe="") not in text

        first = workers[0]
        first.communicate("\n", timeout=30)  # the first worker exits
        assert first.returncode == 0
        mark_process_dead(first.pid, str(multiproc_dir))  # what gunicorn's child_exit does
        body, _ = render(multiprocess_dir=str(multiproc_dir))
        # livesum gauges: only the live worker; counters: still both workers' totals
        one_left = expected(idle=1, used=0, max_=5, idle_max=2, idle_min=1, acquires=12,
                            created=2)
        assert scrape(body.decode(), unique_name) == one_left
