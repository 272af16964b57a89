"""``poolwarden demo``: a short concurrent workload through the pool, and what happened.

With no ``DATABASE_URL`` it starts a throwaway embedded PostgreSQL and removes it after.
The workload mixes what services do: point reads, a write in a transaction, and a burst
that is larger than the pool so that callers queue (fairly) for connections.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from .database import Database
from .errors import PoolwardenError

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS poolwarden_demo_events (
    id bigserial PRIMARY KEY,
    worker int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass
class DemoResult:
    """What the workload did: per-kind latencies (ms), errors, duration and the pool's stats."""

    duration_s: float
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    stats: dict[str, object] = field(default_factory=dict)
    target: str = ""
    embedded: bool = False

    @property
    def operations(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    @property
    def throughput(self) -> float:
        return self.operations / self.duration_s if self.duration_s else 0.0


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) of ``values`` by the nearest-rank method."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def run_workload(db: Database, *, seconds: float, workers: int) -> DemoResult:
    """Run ``workers`` concurrent tasks for ``seconds`` against ``db``; never raises for a
    failed operation (it is counted by error type instead)."""
    await db.execute(SETUP_SQL)
    latencies: dict[str, list[float]] = {"read": [], "write": [], "report": []}
    errors: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds

    async def worker(n: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            kind = "write" if i % 5 == 0 else ("report" if i % 17 == 0 else "read")
            started = time.perf_counter()
            try:
                if kind == "read":
                    await db.fetchval("SELECT count(*) FROM pg_stat_activity")
                elif kind == "write":
                    async with db.transaction() as conn:
                        await conn.execute(
                            "INSERT INTO poolwarden_demo_events (worker) VALUES ($1)", n)
                else:
                    await db.fetchval("SELECT sum(x) FROM generate_series(1, 20000) x")
            except (PoolwardenError, OSError) as exc:
                errors[type(exc).__name__] += 1
                continue
            latencies[kind].append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    duration = time.monotonic() - started
    return DemoResult(duration_s=duration, latencies_ms=latencies, errors=errors,
                      stats=db.pool.stats().as_dict())


async def run_demo(
    env: Mapping[str, str] | None = None, *, seconds: float = 3.0, workers: int = 32
) -> DemoResult:
    """Run the demo against ``DATABASE_URL`` from ``env`` (default: the process environment),
    or against an embedded PostgreSQL started (and removed) for it when there is none."""
    env = dict(os.environ if env is None else env)
    async with AsyncExitStack() as stack:
        embedded = not env.get("DATABASE_URL")
        if embedded:
            from .embedded import EmbeddedPostgres

            server = await stack.enter_async_context(EmbeddedPostgres())
            env["DATABASE_URL"] = server.dsn
        env.setdefault("DB_POOL_SIZE", "10")
        env.setdefault("DB_MAX_OVERFLOW", "0")
        env.setdefault("DB_POOL_MIN_SIZE", "10")
        env.setdefault("DB_APPLICATION_NAME", "poolwarden-demo")
        db = Database.from_env(env)
        async with db:
            result = await run_workload(db, seconds=seconds, workers=workers)
        result.target = db.pool.config.masked_dsn
        result.embedded = embedded
        return result


def summarise(result: DemoResult) -> list[tuple[str, int, float, float, float]]:
    """Rows of (kind, count, p50 ms, p99 ms, mean ms)."""
    rows = []
    for kind, values in result.latencies_ms.items():
        if values:
            rows.append((kind, len(values), percentile(values, 50), percentile(values, 99),
                         statistics.fmean(values)))
    return rows
