"""Load comparison: the example service on poolwarden against the same service written the
seeds' way (plain ``create_async_engine`` + ``Depends(get_db)``, ``bench/service_plain``).

::

    .venv/bin/python -m bench.service_load                  # embedded PostgreSQL, ~3 minutes
    .venv/bin/python -m bench.service_load --dsn postgresql://user:pw@host/db --duration 30

Each service runs under uvicorn with the same workers and the same pool per worker
(``--workers 2``, ``DB_POOL_SIZE=4``, no overflow), one after the other, against the same
seeded database. An open-loop client (raw asyncio HTTP/1.1, keep-alive; arrivals are a
Poisson process that does not slow down when the service does) sends a fixed mix:

- 40 % ``GET /users/{id}``, 25 % ``GET /users/{id}/orders``, 10 % ``POST /users/{id}/orders``,
- 25 % ``GET /reports/revenue?simulate_ms=200`` — a slow query, so that the pool (not the
  CPU) is what runs out first;

through four phases: warm-up (discarded), **normal** load, **overload** at 10 times the normal
rate, and **recovery** back at the normal rate. Latency counts from the scheduled arrival
(no coordinated omission); the client gives up after 10 s (a typical upstream timeout).

The poolwarden service runs with its defaults plus a 1 s request budget (the client sends
``X-Request-Timeout: 1``, as a caller propagating its deadline would) and admission control
on the wait queue (``DB_POOL_ADMISSION=true``: a caller who would not get a connection within
its budget is refused at once). The plain service has the seeds' ``pool_timeout=30`` and
ignores the header.

The default normal rate, 30 requests/s, is about a fifth of what the pools can serve with
this mix (2 x 4 connections, about 50 ms of connection time per request on average: ~150/s),
so the overload phase offers about twice the pools' capacity. Much beyond that on a small
machine the CPU (client, two workers and PostgreSQL on the same cores) saturates first:
requests then wait in the kernel's accept queue before any application code — and any
deadline — sees them; ``--normal-rps`` raises the rate to see that too.

Columns: *served rps* counts every 2xx of the phase's arrivals (late ones included) over the
phase's length; *≤ budget rps* only those answered within the 1 s budget — what a caller
with that budget actually got.

Prints a markdown table and writes ``bench/results/<UTC>-service-load/`` (``results.json``,
``report.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from examples.service.models import DDL

from bench.env import machine
from poolwarden.embedded import EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

WORKERS = 2
POOL_SIZE = 4
CLIENT_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 6000  # client sockets; arrivals beyond it are counted as dropped
BUDGET_S = 1.0
REPORT_SIM_MS = 200
USERS = 2000
ORDERS_PER_USER = 5
STARTUP_TIMEOUT_S = 60.0

SERVICES: dict[str, dict[str, Any]] = {
    "poolwarden": {
        "target": "examples.service.app:app",
        "env": {"DB_POOL_MIN_SIZE": str(POOL_SIZE), "DB_POOL_ADMISSION": "true",
                "SERVICE_DEADLINE_S": str(BUDGET_S)},
        "headers": {"X-Request-Timeout": str(BUDGET_S)},
    },
    "plain": {
        "target": "bench.service_plain.app:app",
        "env": {"DB_POOL_TIMEOUT": "30"},
        "headers": {},
    },
}

MIX: tuple[tuple[str, float], ...] = (
    ("get_user", 0.40), ("list_orders", 0.25), ("create_order", 0.10), ("report", 0.25),
)


# ---------------------------------------------------------------------- HTTP client


@dataclass(slots=True)
class Outcome:
    kind: str
    status: int | str  # HTTP status, or "timeout" / "error" / "dropped"
    latency_s: float


class HttpClient:
    """A minimal HTTP/1.1 keep-alive client: idle connections are reused LIFO."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def request(self, method: str, path: str, body: bytes | None = None) -> int:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(
            self.host, self.port)
        reader, writer = conn
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: service\r\n{self.extra}"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + (body or b""))
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("closed by the server")
            status = int(status_line.split(b" ", 2)[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.transport.abort()
            raise
        if close:
            writer.transport.abort()
        else:
            self.idle.append(conn)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.transport.abort()
        self.idle.clear()


def _path_for(kind: str, rng: random.Random) -> tuple[str, str, bytes | None]:
    user = rng.randint(1, USERS)
    if kind == "get_user":
        return "GET", f"/users/{user}", None
    if kind == "list_orders":
        return "GET", f"/users/{user}/orders?limit=10", None
    if kind == "create_order":
        body = json.dumps({"item": "widget", "quantity": rng.randint(1, 5),
                           "price_cents": rng.randint(100, 5000)}).encode()
        return "POST", f"/users/{user}/orders", body
    return "GET", f"/reports/revenue?days=30&simulate_ms={REPORT_SIM_MS}", None


async def _one(client: HttpClient, kind: str, rng: random.Random, scheduled: float,
               out: list[Outcome]) -> None:
    method, path, body = _path_for(kind, rng)
    client.in_flight += 1
    client.peak_in_flight = max(client.peak_in_flight, client.in_flight)
    status: int | str
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            status = await client.request(method, path, body)
    except TimeoutError:
        status = "timeout"
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        status = "error"
    finally:
        client.in_flight -= 1
    out.append(Outcome(kind, status, time.monotonic() - scheduled))


async def run_phase(client: HttpClient, rate: float, duration: float, seed: int) -> list[Outcome]:
    """Open loop: Poisson arrivals at ``rate``/s for ``duration`` s; waits for the stragglers."""
    rng = random.Random(seed)
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    out: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    at = start
    while True:
        at += rng.expovariate(rate)
        if at - start >= duration:
            break
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = rng.choices(kinds, weights)[0]
        if client.in_flight >= MAX_IN_FLIGHT:
            out.append(Outcome(kind, "dropped", 0.0))
            continue
        task = asyncio.create_task(_one(client, kind, random.Random(rng.random()), at, out))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return out


# ---------------------------------------------------------------------- summary


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class PhaseSummary:
    service: str
    phase: str
    offered_rps: float
    duration_s: float
    requests: int
    served: int  # 2xx
    served_rps: float
    served_in_budget_rps: float  # 2xx answered within BUDGET_S
    p50_ms: float | None
    p99_ms: float | None
    refused_503: int
    refused_p99_ms: float | None
    errors_5xx: int  # 5xx other than 503
    other_4xx: int
    timeouts: int
    transport_errors: int
    dropped: int
    peak_in_flight: int
    statuses: dict[str, int] = field(default_factory=dict)


def summarise(service: str, phase: str, rate: float, duration: float, *,
              outcomes: list[Outcome], peak: int) -> PhaseSummary:
    ok = [o.latency_s * 1000 for o in outcomes if isinstance(o.status, int) and o.status < 300]
    refused = [o.latency_s * 1000 for o in outcomes if o.status == 503]
    statuses = Counter(str(o.status) for o in outcomes)

    def count(predicate: Callable[[int | str], bool]) -> int:
        return sum(1 for o in outcomes if predicate(o.status))

    return PhaseSummary(
        service=service, phase=phase, offered_rps=rate, duration_s=duration,
        requests=len(outcomes), served=len(ok), served_rps=len(ok) / duration,
        served_in_budget_rps=sum(1 for ms in ok if ms <= BUDGET_S * 1000) / duration,
        p50_ms=_percentile(ok, 0.50), p99_ms=_percentile(ok, 0.99),
        refused_503=len(refused), refused_p99_ms=_percentile(refused, 0.99),
        errors_5xx=count(lambda s: isinstance(s, int) and s >= 500 and s != 503),
        other_4xx=count(lambda s: isinstance(s, int) and 400 <= s < 500),
        timeouts=statuses["timeout"], transport_errors=statuses["error"],
        dropped=statuses["dropped"], peak_in_flight=peak, statuses=dict(statuses),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(rows: list[PhaseSummary]) -> str:
    lines = [
        "| service | phase | offered rps | served rps | ≤ budget rps | p50 ms | p99 ms | 503s "
        "| 503 p99 ms | other 5xx | client timeouts | dropped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.service} | {r.phase} | {r.offered_rps:.0f} | {r.served_rps:.1f} | "
        f"{r.served_in_budget_rps:.1f} | "
        f"{_ms(r.p50_ms)} | {_ms(r.p99_ms)} | {r.refused_503} | {_ms(r.refused_p99_ms)} | "
        f"{r.errors_5xx} | {r.timeouts} | {r.dropped} |"
        for r in rows
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- servers


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with EmbeddedPostgres(max_connections=100) as pg:
        yield pg.dsn


async def seed(dsn: str) -> None:
    """The schema and ``USERS`` users with ``ORDERS_PER_USER`` orders each (idempotent)."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in DDL:
            await conn.execute(statement)
        if await conn.fetchval("SELECT count(*) FROM users") >= USERS:
            return
        await conn.execute("TRUNCATE orders, users RESTART IDENTITY")
        await conn.execute(
            "INSERT INTO users (email, name) SELECT 'user' || i || '@example.com', "
            "'User ' || i FROM generate_series(1, $1) AS i", USERS)
        await conn.execute(
            "INSERT INTO orders (user_id, item, quantity, price_cents, status, created_at) "
            "SELECT u, 'item ' || k, 1 + k % 3, 100 + (u * k) % 5000, "
            "(ARRAY['pending','paid','shipped','cancelled'])[1 + (u + k) % 4], "
            "now() - ((u + k) % 60) * interval '1 day' "
            "FROM generate_series(1, $1) AS u, generate_series(1, $2) AS k",
            USERS, ORDERS_PER_USER)
        await conn.execute("ANALYZE users; ANALYZE orders")
    finally:
        await conn.close()


class Service:
    """One service under ``uvicorn --workers`` on a free loopback port."""

    def __init__(self, name: str, dsn: str) -> None:
        spec = SERVICES[name]
        self.name = name
        self.port = free_port()
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("DB_", "DATABASE_", "SERVICE_", "PROMETHEUS_"))}
        self.metrics_dir = tempfile.TemporaryDirectory(prefix="pw-bench-prom-")
        self.env = {
            **inherited, "DATABASE_URL": dsn, "DB_POOL_SIZE": str(POOL_SIZE),
            "DB_MAX_OVERFLOW": "0", "DB_APPLICATION_NAME": f"bench-{name}",
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir.name, **spec["env"],
        }
        self.log = tempfile.NamedTemporaryFile(prefix=f"pw-bench-{name}-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", spec["target"], "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", str(WORKERS), "--no-access-log",
             "--log-level", "warning", "--backlog", "4096", "--timeout-graceful-shutdown", "5"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    async def ready(self) -> None:
        end = time.monotonic() + STARTUP_TIMEOUT_S
        probe = HttpClient("127.0.0.1", self.port, {})
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError, IndexError,
                                     asyncio.IncompleteReadError):
                if await probe.request("GET", "/health/db") == 200:
                    probe.close()
                    return
            await asyncio.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        self.metrics_dir.cleanup()


# ---------------------------------------------------------------------- main


async def measure(name: str, dsn: str, normal: float, duration: float,
                  warmup: float) -> list[PhaseSummary]:
    service = Service(name, dsn)
    try:
        await service.ready()
        client = HttpClient("127.0.0.1", service.port, SERVICES[name]["headers"])
        phases = (("warm-up", normal, warmup), ("normal", normal, duration),
                  ("overload 10x", normal * 10, duration), ("recovery", normal, duration / 2))
        rows = []
        for seed_no, (phase, rate, seconds) in enumerate(phases):
            client.peak_in_flight = 0
            print(f"  {name}: {phase} at {rate:.0f} rps for {seconds:.0f} s", flush=True)
            outcomes = await run_phase(client, rate, seconds, seed=seed_no)
            if phase != "warm-up":
                rows.append(summarise(name, phase, rate, seconds, outcomes=outcomes,
                                      peak=client.peak_in_flight))
        client.close()
        return rows
    finally:
        service.stop()


def verdict(rows: list[PhaseSummary]) -> list[str]:
    by = {(r.service, r.phase): r for r in rows}
    out = []
    ours = by.get(("poolwarden", "overload 10x"))
    if ours is not None and ours.p99_ms is not None:
        under = ours.p99_ms <= BUDGET_S * 1000
        out.append(f"poolwarden at overload: p99 of served {ours.p99_ms:.0f} ms "
                   f"{'<=' if under else '>'} the {BUDGET_S * 1000:.0f} ms budget; "
                   f"{ours.refused_503} answered 503, {ours.timeouts} client timeouts")
    plain = by.get(("plain", "overload 10x"))
    if plain is not None:
        out.append(f"plain at overload: p99 of served {_ms(plain.p99_ms)} ms; "
                   f"{plain.timeouts} client timeouts, {plain.errors_5xx} other 5xx, "
                   f"{plain.dropped} dropped at the client's socket limit")
    return out


async def main_async(args: argparse.Namespace) -> int:
    with database(args.dsn) as dsn:
        await seed(dsn)
        rows: list[PhaseSummary] = []
        for name in args.services:
            print(f"measuring {name}", flush=True)
            rows += await measure(name, dsn, args.normal_rps, args.duration, args.warmup)
    report = "\n".join([
        "# Service load: poolwarden vs the seeds' way",
        "",
        f"{WORKERS} uvicorn workers per service, pool {POOL_SIZE} per worker, no overflow; "
        f"open-loop Poisson arrivals; mix {', '.join(f'{k} {w:.0%}' for k, w in MIX)} "
        f"(report = {REPORT_SIM_MS} ms of server time); client timeout {CLIENT_TIMEOUT_S:g} s; "
        f"poolwarden budget {BUDGET_S:g} s (X-Request-Timeout), DB_POOL_ADMISSION=true.",
        "",
        table(rows),
        "",
        *[f"- {line}" for line in verdict(rows)],
        "",
    ])
    print()
    print(report)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS / f"{stamp}-service-load"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps({
        "command": sys.argv, "config": {
            "workers": WORKERS, "pool_size": POOL_SIZE, "normal_rps": args.normal_rps,
            "overload_rps": args.normal_rps * 10, "duration_s": args.duration,
            "client_timeout_s": CLIENT_TIMEOUT_S, "budget_s": BUDGET_S, "mix": dict(MIX),
            "report_simulate_ms": REPORT_SIM_MS, "services": SERVICES,
        },
        "machine": machine(), "phases": [asdict(r) for r in rows], "verdict": verdict(rows),
    }, indent=2, default=str))
    print(f"written to {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN"),
                        help="an existing server (default: a throwaway embedded one)")
    parser.add_argument("--normal-rps", type=float, default=30.0,
                        help="the normal rate; overload is 10 times it (default 30)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--services", nargs="+", default=list(SERVICES), choices=list(SERVICES))
    parser.add_argument("--out", help="output directory (default bench/results/<UTC>-service-load)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
