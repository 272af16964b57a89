"""``poolwarden demo`` end to end: embedded PostgreSQL, workload, report, clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg

from poolwarden.demo import percentile, run_demo, summarise
from poolwarden.embedded import EmbeddedPostgres


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) == 0.0


async def test_demo_against_a_given_database_url(pg: EmbeddedPostgres) -> None:
    result = await run_demo({"DATABASE_URL": pg.dsn}, seconds=1.0, workers=16)
    assert not result.embedded
    assert result.operations > 0
    assert not result.errors
    assert {row[0] for row in summarise(result)} >= {"read", "write"}
    assert result.stats["acquires_total"] == result.operations + 1  # + the table setup
    assert result.stats["connections_in_use"] == 0
    assert pg.password not in result.target
    conn = await asyncpg.connect(pg.dsn)
    try:
        writes = await conn.fetchval("SELECT count(*) FROM poolwarden_demo_events")
    finally:
        await conn.close()
    assert writes >= len(result.latencies_ms["write"])


def test_demo_command_starts_embedded_postgres_and_stops_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DB_"))}
    done = subprocess.run(
        [sys.executable, "-m", "poolwarden", "demo", "--seconds", "1", "--workers", "8"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "embedded PostgreSQL (removed)" in done.stdout
    assert "ops/s" in done.stdout
    assert "acquires_total" in done.stdout
    assert "errors: " not in done.stdout
