"""Prometheus histograms of acquire wait, hold (use) time, connection creation and statement
time, on real PostgreSQL: scraped and parsed after a workload whose counts are known, in one
process and summed over two worker processes in multiprocess mode."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from metrics_helpers import worker_processes
from pool_helpers import open_pool
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.metrics import HISTOGRAMS, POOL_LABEL, PoolMetrics, render

WAIT = "db_client_connection_wait_time_seconds"
USE = "db_client_connection_use_time_seconds"
CREATE = "db_client_connection_create_time_seconds"
QUERY = "db_client_operation_duration_seconds"


@dataclass(frozen=True)
class Scraped:
    """One histogram of one pool, as parsed from the exposition text."""

    buckets: dict[float, float]  # le -> cumulative count (inf included)
    count: float
    sum: float


def scrape_histogram(text: str, node: str, name: str) -> Scraped:
    """The ``name`` histogram of ``node`` in the exposition ``text`` (parsed, not grepped)."""
    buckets: dict[float, float] = {}
    count = total = math.nan
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get(POOL_LABEL) != node:
                continue
            if sample.name == name + "_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == name + "_count":
                count = sample.value
            elif sample.name == name + "_sum":
                total = sample.value
    return Scraped(buckets, count, total)


def assert_consistent(h: Scraped, count: int, *, zero: bool = False) -> None:
    """``_count`` is ``count``, the buckets are cumulative (never decreasing, ``+Inf`` equal
    to the count) and the sum is positive — or, with ``zero``, every observation was 0 s."""
    assert h.count == count
    bounds = sorted(h.buckets)
    assert bounds[-1] == math.inf
    values = [h.buckets[b] for b in bounds]
    assert values == sorted(values)
    assert values[-1] == count
    if zero:
        assert h.sum == 0
        assert values[0] == count
    else:
        assert h.sum > 0


def test_the_histogram_names_follow_the_opentelemetry_conventions() -> None:
    """create/wait/use/query export as db_client_connection_{create,wait,use}_time_seconds
    and db_client_operation_duration_seconds."""
    assert {kind: name for kind, (name, _) in HISTOGRAMS.items()} == {
        "create": CREATE, "wait": WAIT, "use": USE, "query": QUERY,
    }


async def test_histograms_count_a_known_workload_and_resync_does_not_double_count(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """20 acquires (2 of them waited for a new connection), 20 releases, 3 connections
    created and 30 statements show as those _count values, with consistent buckets."""
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    async with open_pool(pg, name=unique_name, min_size=1, pool_size=2, max_overflow=1,
                         pre_ping=False) as pool:
        for _ in range(17):  # 17 acquires served by the warm connection, 17 statements
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
        held = [await pool.acquire() for _ in range(3)]  # 3 more: two wait for new ones
        for conn in held:
            await conn.execute("SELECT 1")
            await conn.fetch("SELECT $1::int", 1)
            await conn.fetchrow("SELECT 1")
            await conn.executemany("SELECT $1::int", [(1,), (2,)])
        # 17 + 3 * 4 = 29 statements so far; one more
        await held[0].fetchval("SELECT 2")
        for conn in held:
            await pool.release(conn)
        stats = pool.stats()
        assert stats.acquires_total == 20
        assert stats.acquires_waited_total == 2
        assert stats.connections_created_total == 3

        metrics.sync(pool.stats())
        text = render(registry)[0].decode()
        metrics.sync(pool.stats())  # nothing new: nothing changes
        assert render(registry)[0].decode() == text

    assert_consistent(scrape_histogram(text, unique_name, WAIT), 20)
    assert_consistent(scrape_histogram(text, unique_name, USE), 20)
    assert_consistent(scrape_histogram(text, unique_name, CREATE), 3)
    assert_consistent(scrape_histogram(text, unique_name, QUERY), 30)
    wait = scrape_histogram(text, unique_name, WAIT)
    assert wait.buckets[min(wait.buckets)] >= 18  # the 18 that did not wait are at 0 s


WORKER = textwrap.dedent("""
    import asyncio, os, sys
    from poolwarden import Pool, PoolConfig
    from poolwarden.metrics import MetricsSync, default_metrics

    async def main() -> None:
        pool = Pool(PoolConfig(dsn=os.environ["PW_DSN"], name=os.environ["PW_NODE"],
                               min_size=1, pool_size=2, max_overflow=0, pre_ping=False))
        await pool.open()
        for _ in range(int(sys.argv[1])):
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
                await conn.execute("SELECT 2")
        MetricsSync(pool, default_metrics()).sync_now()
        print("synced", flush=True)
        sys.stdin.readline()  # stay alive until the test has scraped
        await pool.close()

    asyncio.run(main())
""")


def test_two_worker_processes_histograms_add_up_in_multiprocess_mode(
    pg: EmbeddedPostgres, unique_name: str, tmp_path: Path
) -> None:
    """Under PROMETHEUS_MULTIPROC_DIR, two workers doing 5 and 7 checkouts of 2 statements
    each scrape as 12 acquires (none waited), 12 uses, 24 statements and 2 connections
    created, bucket by bucket consistent; no password in the text."""
    env = {"PW_DSN": pg.dsn, "PW_NODE": unique_name}
    with worker_processes(tmp_path, WORKER, env, (5, 7)) as (multiproc_dir, workers):
        text = render(multiprocess_dir=str(multiproc_dir))[0].decode()
    assert all(worker.returncode == 0 for worker in workers)
    # one checkout at a time: every acquire found an idle connection, none waited
    assert_consistent(scrape_histogram(text, unique_name, WAIT), 12, zero=True)
    assert_consistent(scrape_histogram(text, unique_name, USE), 12)
    assert_consistent(scrape_histogram(text, unique_name, CREATE), 2)
    assert_consistent(scrape_histogram(text, unique_name, QUERY), 24)
    assert pg.password not in text
    assert quote(pg.password, safe="") not in text
