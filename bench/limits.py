"""The limits no pool can beat with this client: connections owned outright, and pgbench.

- *bare*: one asyncpg connection, one task, ``SELECT 1`` in a loop (the ceiling at C=1);
- *ideal P*: P tasks each owning one asyncpg connection, no pool at all — the most any pool
  of P connections can do with this client, whatever the concurrency;
- *SQLAlchemy ideal P*: P tasks each owning one SQLAlchemy ``AsyncConnection`` (asyncpg
  dialect), running what a pooled ``engine.connect()`` block runs — ``BEGIN`` (implicit),
  ``SELECT 1``, ``ROLLBACK`` — with no checkout at all: the most any pool under SQLAlchemy
  can do, which bounds the SQLAlchemy criterion of the bar;
- *capacity*: the same with workload c's ``SELECT pg_sleep(0.01)`` — what pool 10 can serve
  at most on this machine (nominally 1000/s; each request also pays a round trip);
- *pgbench*: the server's own limit, from a C client in a separate process.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from .drive import Op, Samples, closed_loop
from .systems import SELECT1

now = time.perf_counter_ns


def statement_on(conn: Any, statement: str) -> Op:
    """The ideal's operation: ``statement`` on a connection that is always in hand."""
    async def op() -> int:
        t = now()  # the connection is always in hand: no acquire wait
        await conn.fetchval(statement)
        return t

    return op


async def open_owned(
    dsn: str, connections: int
) -> tuple[list[asyncpg.Connection], Callable[[], Awaitable[None]]]:
    """``connections`` plain asyncpg connections, and how to close them all."""
    conns = await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(connections)))

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in conns))

    return list(conns), close


class FifoPool:
    """The issue's reference: a bare-bones fair FIFO pool (a deque of futures, direct
    handoff, nothing else). Measured next to poolwarden so that the report shows what a
    pool costs at the very least on this machine."""

    def __init__(self, conns: list[asyncpg.Connection]) -> None:
        self._idle = collections.deque(conns)
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection]] = (
            collections.deque())

    async def acquire(self) -> asyncpg.Connection:
        if self._idle:
            return self._idle.pop()
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return await future

    def release(self, conn: asyncpg.Connection) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(conn)
                return
        self._idle.append(conn)

    def select1(self) -> Op:
        async def op() -> int:
            conn = await self.acquire()
            try:
                t = now()
                await conn.fetchval(SELECT1)
            finally:
                self.release(conn)
            return t

        return op


async def owned_connections(
    dsn: str, connections: int, *, warmup_s: float, duration_s: float,
    statement: str = SELECT1,
) -> Samples:
    """``statement`` from ``connections`` tasks, each on its own connection (no pool)."""
    conns, close = await open_owned(dsn, connections)
    try:
        return await closed_loop(
            [statement_on(c, statement) for c in conns],
            warmup_s=warmup_s, duration_s=duration_s,
        )
    finally:
        await close()


def _sqlalchemy_statement_on(conn: Any, statement: Any) -> Op:
    async def op() -> int:
        t = now()
        (await conn.execute(statement)).scalar()
        await conn.rollback()  # what returning the connection to QueuePool does
        return t

    return op


async def owned_sqlalchemy_connections(
    dsn: str, connections: int, *, warmup_s: float, duration_s: float
) -> Samples:
    """``SELECT 1`` from ``connections`` tasks, each on its own SQLAlchemy connection."""
    engine = create_async_engine(
        make_url(dsn).set(drivername="postgresql+asyncpg"),
        pool_size=connections, max_overflow=0,
    )
    statement = text(SELECT1)
    try:
        conns = [await engine.connect() for _ in range(connections)]
        try:
            return await closed_loop(
                [_sqlalchemy_statement_on(c, statement) for c in conns],
                warmup_s=warmup_s, duration_s=duration_s,
            )
        finally:
            for conn in conns:
                await conn.close()
    finally:
        await engine.dispose()


@dataclass(frozen=True, slots=True)
class PgbenchScript:
    key: str
    label: str
    args: tuple[str, ...]


SELECT1_SCRIPT = "SELECT 1;\n"
PGBENCH_SCRIPTS = (
    PgbenchScript("select-only", "pgbench -S -M prepared", ("-S", "-M", "prepared")),
    PgbenchScript("select1", "pgbench SELECT 1 -M prepared", ("-M", "prepared")),
)
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


class Pgbench:
    """Runs ``pgbench`` against the benchmark server; ``prepare`` first (``pgbench -i``)."""

    def __init__(self, dsn: str, threads: int) -> None:
        self._dsn = dsn
        self._threads = threads
        self._dir = Path(tempfile.mkdtemp(prefix="poolwarden-bench-"))
        self._script = self._dir / "select1.sql"
        self._script.write_text(SELECT1_SCRIPT)

    @staticmethod
    def missing() -> str | None:
        return None if shutil.which("pgbench") else "pgbench not on PATH (postgresql-client)"

    def prepare(self) -> None:
        """``pgbench -i -s 1``: (re)create the ``pgbench_*`` tables that ``-S`` reads."""
        done = subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1", self._dsn],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {done.stderr.strip()[-500:]}")

    def run(self, script: PgbenchScript, clients: int, seconds: int) -> dict[str, Any]:
        """One pgbench run; returns tps (queries/s: one query per transaction) and latency."""
        args = list(script.args)
        if script.key == "select1":
            args += ["-f", str(self._script)]
        command = [
            "pgbench",
            "-n",
            *args,
            "-c",
            str(clients),
            "-j",
            str(min(self._threads, clients)),
            "-T",
            str(seconds),
            self._dsn,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        tps = _TPS.search(done.stdout)
        latency = _LATENCY.search(done.stdout)
        if done.returncode != 0 or tps is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"throughput": None, "error": " | ".join(tail)}
        return {
            "throughput": float(tps.group(1)),
            "latency_avg_ms": float(latency.group(1)) if latency else None,
        }

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
