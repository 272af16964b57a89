"""The adaptive concurrency limit against a sweep of fixed pool sizes (issue 5's knee test).

A CPU-bound query (summing a generate_series) on this machine's PostgreSQL has a knee near
its core count: past it, more concurrent queries only queue inside the server. The sweep
runs fixed pools of 1…N connections and the adaptive limit (max N), interleaved and
repeated, with C callers each, and reports throughput and p50/p99 latency (medians of the
rounds); the adaptive limit should be within 10 % of the best fixed size's throughput with a
lower p99 than the configured size N.

    .venv/bin/python -m bench.knee [--rounds 3] [--duration 3] [--callers 20] [--max 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from poolwarden.embedded import EmbeddedPostgres
from poolwarden.pool import Pool, PoolConfig
from poolwarden.protect.limiter import LimiterConfig

from .stats import TIMES

QUERY = "SELECT sum(i) FROM generate_series(1, 200000) i"


async def _measure(dsn: str, size: int, *, adaptive: bool, callers: int, duration: float,
                   warmup: float) -> dict[str, Any]:
    config = PoolConfig(dsn=dsn, name="knee", min_size=size, pool_size=size, max_overflow=0,
                        acquire_timeout=60.0,
                        limiter=LimiterConfig(initial=min(4, size)) if adaptive else None)
    pool = Pool(config)
    await pool.open()
    latencies: list[float] = []
    limits: list[int] = []
    start = time.monotonic() + warmup
    stop = start + duration

    async def caller() -> None:
        while (t0 := time.monotonic()) < stop:
            async with pool.connection() as conn:
                await conn.fetchval(QUERY)
            t1 = time.monotonic()
            if t1 >= start and t1 <= stop:
                latencies.append(t1 - t0)
                limits.append(pool.stats().concurrency_limit)

    await asyncio.gather(*(caller() for _ in range(callers)))
    await pool.close()
    latencies.sort()
    return {
        "throughput": len(latencies) / duration,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
        "limit_median": statistics.median(limits) if limits else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--max", type=int, default=10)
    args = parser.parse_args()
    sizes = [1, 2, 3, 4, 6, 8, args.max]
    runs: dict[str, list[dict[str, Any]]] = {}
    with EmbeddedPostgres() as server:
        for _ in range(args.rounds):
            for key in [f"fixed {n}" for n in sizes] + [f"adaptive (max {args.max})"]:
                adaptive = key.startswith("adaptive")
                size = args.max if adaptive else int(key.split()[1])
                runs.setdefault(key, []).append(asyncio.run(_measure(
                    server.dsn, size, adaptive=adaptive, callers=args.callers,
                    duration=args.duration, warmup=args.warmup)))
    summary = {
        key: {m: statistics.median(r[m] for r in rs if r[m] is not None)
              for m in ("throughput", "p50_ms", "p99_ms", "limit_median")
              if any(r[m] is not None for r in rs)}
        for key, rs in runs.items()
    }
    best = max((v for k, v in summary.items() if k.startswith("fixed")),
               key=lambda v: v["throughput"])
    lines = [f"# knee sweep: {args.callers} callers, CPU-bound query, {args.rounds} rounds",
             "", f"| pool | q/s | {TIMES}best fixed | p50 ms | p99 ms | median limit |",
             "|---|---|---|---|---|---|"]
    for key, v in summary.items():
        ratio = v["throughput"] / best["throughput"]
        lines.append(f"| {key} | {v['throughput']:.0f} | {TIMES}{ratio:.2f} | "
                     f"{v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v.get('limit_median', '-')} |")
    report = "\n".join(lines)
    print(report)
    out = Path("bench/results") / time.strftime("knee-%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
