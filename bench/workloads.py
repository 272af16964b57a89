"""The workloads (a, b, c, d), the points they are measured at, and one measurement.

A measurement is one system at one point for one repetition, in a fresh event loop with a
freshly opened pool: open, warm up, record for a fixed window, close.

Workload d compares two configurations of the same pool whose difference (~2 %) is smaller
than what a shared machine's speed drifts between two 1.5 s windows. So its participants
are measured *paired*: all open in one event loop, each warmed up, then the window is cut
into :data:`PAIRED_SLICES` slices taken in turn (A B, B A, A B, ...), each after a short
warm-up of its own; a participant's figures are its slices added up. A drift then hits both
alike, as interleaving does for the other workloads at the scale of a round.

The bar's b criteria against the no-pool ideal (≥ 90 % at C=10, ≥ 85 % at C=64) are
measured the same way (workload ``paired``): the raw pool and the issue's bare-bones FIFO
pool with C tasks, and the ideal's P tasks each owning a connection, in turn. In separate
windows a minute apart, the per-round ratio moved by ±10 % with the machine's speed alone.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from .drive import Op, Samples, closed_loop
from .limits import (
    FifoPool,
    open_owned,
    owned_connections,
    owned_sqlalchemy_connections,
    statement_on,
)
from .stats import percentile
from .systems import SELECT1, SLEEP, PoolSpec, System

BUDGET_S = 1.0  # workload c: the caller's acquire budget
NO_BUDGET_S = 60.0  # workloads a and b: never time out, just measure

WORKLOADS = {
    "a": "acquire + release, no query (connection held across one event-loop turn)",
    "b": "SELECT 1 per acquire",
    "c": "overload: SELECT pg_sleep(0.01) per acquire, acquire budget 1 s",
    "d": "instrumentation overhead: poolwarden observability on vs off",
    "paired": (
        "SELECT 1, poolwarden raw (C tasks) and the no-pool ideal (P tasks, own connection "
        "each) measured paired: one event loop, the window cut into slices taken in turn"
    ),
    "limit": (
        "limits of this client: bare connection (C=1), P tasks owning P connections "
        "(asyncpg; and SQLAlchemy connections, BEGIN/SELECT 1/ROLLBACK)"
    ),
    "capacity": "workload c's capacity: 10 tasks owning 10 connections, SELECT pg_sleep(0.01)",
    "pgbench": "the server's own limit (pgbench, separate process)",
}


@dataclass(frozen=True, slots=True)
class Point:
    """Where a figure is measured: a workload, a concurrency (tasks) and a pool size."""

    workload: str
    concurrency: int
    pool_size: int

    @property
    def key(self) -> str:
        return f"{self.workload} C={self.concurrency} P={self.pool_size}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Timing:
    warmup_s: float
    duration_s: float
    overload_warmup_s: float
    overload_s: float
    pgbench_s: int
    shed_pause_s: float
    paired_s: float  # the window of a paired measurement (d, paired), per participant


def _ms(ns: float | None) -> float | None:
    return ns / 1e6 if ns is not None else None


def metrics(samples: Samples, *, overload: bool = False) -> dict[str, Any]:
    """The figures of one measurement: throughput in ops/s, latencies in ms."""
    out: dict[str, Any] = {
        "throughput": len(samples.total_ns) / samples.window_s,
        "p50_ms": _ms(percentile(samples.total_ns, 50)),
        "p99_ms": _ms(percentile(samples.total_ns, 99)),
        "wait_p99_ms": _ms(percentile(samples.wait_ns, 99)),
        "errors": samples.errors,
        "cpu_us_per_op": (
            samples.cpu_s / len(samples.total_ns) * 1e6
            if samples.cpu_s is not None and samples.total_ns else None
        ),
    }
    if samples.first_error:
        out["first_error"] = samples.first_error
    if overload:
        out |= {
            "timeouts": samples.timeouts,
            "refusals": samples.refusals,
            "timeouts_per_s": samples.timeouts / samples.window_s,
            "refusals_per_s": samples.refusals / samples.window_s,
            "shed_p99_ms": _ms(percentile(samples.shed_ns, 99)),
            "late_acquires": samples.late_acquires,
            "late_finishes": samples.late_finishes,
        }
    return out


async def _measure_system(system: System, point: Point, dsn: str, timing: Timing) -> Samples:
    overload = point.workload == "c"
    spec = PoolSpec(point.pool_size, BUDGET_S if overload else NO_BUDGET_S)
    client = await system.open(dsn, spec)
    try:
        # (workloads d and paired are measured paired, see _measure_paired)
        op = {"a": client.hold, "b": client.select1, "c": client.sleep}[point.workload]
        return await closed_loop(
            [op] * point.concurrency,
            warmup_s=timing.overload_warmup_s if overload else timing.warmup_s,
            duration_s=timing.overload_s if overload else timing.duration_s,
            budget_s=BUDGET_S if overload else None,
            shed_pause_s=timing.shed_pause_s if overload else 0.0,
        )
    finally:
        await client.close()


def measure_system(system: System, point: Point, dsn: str, timing: Timing) -> dict[str, Any]:
    """One measurement of a pool, in its own event loop."""
    gc.collect()
    samples = asyncio.run(_measure_system(system, point, dsn, timing))
    return metrics(samples, overload=point.workload == "c")


PAIRED_SLICES = 12  # workload d: slices of the window per participant
SLICE_WARMUP_S = 0.1  # before each slice: the C tasks start and reach a steady state


@dataclass(slots=True)
class _Participant:
    """One side of a paired measurement: the closed loop's operations, and how to end."""

    ops: list[Op]
    close: Callable[[], Awaitable[None]]


async def _pool_participant(system: System, point: Point, dsn: str) -> _Participant:
    client = await system.open(dsn, PoolSpec(point.pool_size, NO_BUDGET_S))
    return _Participant([client.select1] * point.concurrency, client.close)


async def _ideal_participant(point: Point, dsn: str) -> _Participant:
    conns, close = await open_owned(dsn, point.pool_size)
    return _Participant([statement_on(c, SELECT1) for c in conns], close)


async def _measure_paired(
    openers: dict[str, Callable[[], Awaitable[_Participant]]], timing: Timing
) -> dict[str, Samples]:
    sides: dict[str, _Participant] = {}
    try:
        for key, open_side in openers.items():
            sides[key] = await open_side()
        merged = {key: Samples(window_s=0.0) for key in sides}
        order = list(sides)
        for key in order:  # the warm-up, discarded
            await closed_loop(sides[key].ops, warmup_s=timing.warmup_s, duration_s=0.0)
        for i in range(PAIRED_SLICES):
            for key in order if i % 2 == 0 else reversed(order):
                merged[key].add(await closed_loop(
                    sides[key].ops,
                    warmup_s=SLICE_WARMUP_S, duration_s=timing.paired_s / PAIRED_SLICES,
                ))
        return merged
    finally:
        for side in sides.values():
            await side.close()


def _paired(
    openers: dict[str, Callable[[], Awaitable[_Participant]]], timing: Timing
) -> dict[str, dict[str, Any]]:
    gc.collect()
    samples = asyncio.run(_measure_paired(openers, timing))
    return {key: metrics(s) for key, s in samples.items()}


def measure_paired(
    systems: Sequence[System], point: Point, dsn: str, timing: Timing
) -> dict[str, dict[str, Any]]:
    """One paired measurement of ``systems`` (workload d), each running ``SELECT 1``."""
    return _paired(
        {s.key: partial(_pool_participant, s, point, dsn) for s in systems}, timing)


async def _fifo_participant(point: Point, dsn: str) -> _Participant:
    conns, close = await open_owned(dsn, point.pool_size)
    return _Participant([FifoPool(conns).select1()] * point.concurrency, close)


def measure_paired_with_ideal(
    system: System, point: Point, dsn: str, timing: Timing, *, ideal: str, fifo: str
) -> dict[str, dict[str, Any]]:
    """One paired measurement (workload ``paired``) of ``system`` and the bare-bones FIFO
    pool (named ``fifo``) with ``point.concurrency`` tasks, and of the no-pool ideal (named
    ``ideal``) with ``point.pool_size``."""
    return _paired({
        system.key: partial(_pool_participant, system, point, dsn),
        fifo: partial(_fifo_participant, point, dsn),
        ideal: partial(_ideal_participant, point, dsn),
    }, timing)


def measure_owned(point: Point, dsn: str, timing: Timing) -> dict[str, Any]:
    """One measurement of a limit: ``point.concurrency`` tasks each owning a connection,
    running ``SELECT 1`` (workload ``limit``) or workload c's statement (``capacity``)."""
    gc.collect()
    capacity = point.workload == "capacity"
    samples = asyncio.run(
        owned_connections(
            dsn, point.concurrency,
            warmup_s=timing.overload_warmup_s if capacity else timing.warmup_s,
            duration_s=timing.overload_s if capacity else timing.duration_s,
            statement=SLEEP if capacity else SELECT1,
        )
    )
    return metrics(samples)


def measure_owned_sqlalchemy(point: Point, dsn: str, timing: Timing) -> dict[str, Any]:
    """One measurement of the SQLAlchemy limit: ``point.concurrency`` tasks each owning an
    ``AsyncConnection``."""
    gc.collect()
    samples = asyncio.run(owned_sqlalchemy_connections(
        dsn, point.concurrency, warmup_s=timing.warmup_s, duration_s=timing.duration_s))
    return metrics(samples)
