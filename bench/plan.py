"""What one run measures: the profiles (full, quick) and the interleaved rounds of tasks.

A round measures every (point, participant) once, participants of a point back to back;
the run repeats the round, so each figure has one sample per round and slow drifts of a
shared machine hit every system alike. Odd rounds take the participants in reverse order
(A B C D, D C B A, ...), so that going first or last at a point favours nobody.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from .limits import PGBENCH_SCRIPTS, Pgbench
from .systems import System
from .workloads import (
    Point,
    Timing,
    measure_owned,
    measure_owned_sqlalchemy,
    measure_paired,
    measure_paired_with_ideal,
    measure_system,
)

# Workload c: 10 callers fill pool 10; 100 and 500 callers are 10x and 50x overload.
OVERLOAD_CALLERS = (100, 500)
HOLD_CONCURRENCIES = (1, 64)
HOLD_POOL = 10
OBSERVABILITY_CONCURRENCIES = (10, 64)  # workload d: SELECT 1, observability on vs off
FIRST_POOL_ONLY = (1, 10)  # b concurrencies measured at the first pool size only
IDEAL_PAIRED_CONCURRENCIES = (10, 64)  # the bar's b criteria against the ideal, paired
OURS = "poolwarden"  # the raw path: the bar's subject, measured paired with the ideal
OVERLOAD_POOL = 10
PGBENCH_CLIENTS = (10, 64)
# Workload c: a caller refused at once waits this long before its next request (a client
# honouring a short Retry-After). With no pause, 490 refused callers would spin and the
# benchmark would measure the cost of generating refusals in this process instead.
SHED_PAUSE_S = 0.1
BARE = "bare"
IDEAL = "ideal"
FIFO = "fifo"  # the bare-bones fair FIFO pool of the issue, measured paired with the ideal
SQLALCHEMY_BARE = "sqlalchemy-bare"  # one SQLAlchemy connection, one task
SQLALCHEMY_IDEAL = "sqlalchemy-ideal"  # P tasks owning a SQLAlchemy connection each


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    rounds: int
    timing: Timing
    pool_sizes: tuple[int, ...]  # workload b
    concurrencies: tuple[int, ...]  # workload b


FULL = Profile(
    name="full",
    rounds=3,
    timing=Timing(
        warmup_s=0.5,
        duration_s=1.5,
        overload_warmup_s=1.0,
        overload_s=8.0,
        pgbench_s=5,
        shed_pause_s=SHED_PAUSE_S,
        paired_s=3.0,
    ),
    pool_sizes=(10, 20),
    concurrencies=(1, 10, 16, 64, 256),
)
QUICK = Profile(
    name="quick",
    rounds=2,
    timing=Timing(
        warmup_s=0.3,
        duration_s=0.7,
        overload_warmup_s=0.5,
        overload_s=3.0,
        pgbench_s=2,
        shed_pause_s=SHED_PAUSE_S,
        paired_s=1.0,
    ),
    pool_sizes=(10,),
    concurrencies=(1, 10, 64, 256),
)


@dataclass(frozen=True, slots=True)
class Task:
    """One measurement at one point: ``run()`` measures its participants once (one, or the
    pair of workload d) and returns their figures by participant."""

    point: Point
    participants: tuple[str, ...]
    run: Callable[[], dict[str, dict[str, Any]]]


def _single(point: Point, participant: str, run: Callable[[], dict[str, Any]]) -> Task:
    return Task(point, (participant,), lambda: {participant: run()})


def b_points(profile: Profile) -> list[Point]:
    """Workload b's grid. C=1 and C=10 only at the first pool size: the pool size does not
    matter to one caller, and C=10 is not in the issue's grid but there for the bar's C=10
    criterion, which is at pool 10."""
    points = []
    for size in profile.pool_sizes:
        for c in profile.concurrencies:
            if c in FIRST_POOL_ONLY and size != profile.pool_sizes[0]:
                continue
            points.append(Point("b", c, size))
    return points


def one_round(
    profile: Profile, systems: Sequence[System], dsn: str, pgbench: Pgbench | None,
    round_no: int = 0,
) -> list[Task]:
    """Every task of round ``round_no``, in the order they run."""
    timing = profile.timing
    tasks: list[Task] = []
    in_order = list(systems) if round_no % 2 == 0 else list(reversed(systems))

    def pools_at(point: Point) -> None:
        tasks.extend(
            _single(point, system.key, partial(measure_system, system, point, dsn, timing))
            for system in in_order
            if point.workload in system.workloads
        )

    def paired_at(point: Point) -> None:
        pair = [system for system in in_order if point.workload in system.workloads]
        if pair:
            tasks.append(Task(point, tuple(s.key for s in pair),
                              partial(measure_paired, pair, point, dsn, timing)))

    def owned(point: Point, name: str) -> None:
        tasks.append(_single(point, name, partial(measure_owned, point, dsn, timing)))

    def owned_sqlalchemy(point: Point, name: str) -> None:
        if any(system.key == "sqlalchemy" for system in systems):  # compared with it only
            tasks.append(
                _single(point, name, partial(measure_owned_sqlalchemy, point, dsn, timing))
            )

    for c in HOLD_CONCURRENCIES:
        pools_at(Point("a", c, HOLD_POOL))
    # Each limit runs right before the b points it is compared with.
    owned(Point("limit", 1, 1), BARE)
    owned_sqlalchemy(Point("limit", 1, 1), SQLALCHEMY_BARE)
    for size in profile.pool_sizes:
        owned(Point("limit", size, size), IDEAL)
        owned_sqlalchemy(Point("limit", size, size), SQLALCHEMY_IDEAL)
        for point in b_points(profile):
            if point.pool_size == size:
                pools_at(point)
    owned(Point("capacity", OVERLOAD_POOL, OVERLOAD_POOL), IDEAL)
    for callers in OVERLOAD_CALLERS:
        pools_at(Point("c", callers, OVERLOAD_POOL))
    for c in OBSERVABILITY_CONCURRENCIES:
        paired_at(Point("d", c, HOLD_POOL))
    for system in systems:
        if system.key == OURS:
            for c in IDEAL_PAIRED_CONCURRENCIES:
                point = Point("paired", c, HOLD_POOL)
                tasks.append(Task(point, (OURS, FIFO, IDEAL), partial(
                    measure_paired_with_ideal, system, point, dsn, timing, ideal=IDEAL,
                    fifo=FIFO)))
    if pgbench is not None:
        tasks.extend(
            _single(
                Point("pgbench", clients, 0),
                script.key,
                partial(pgbench.run, script, clients, timing.pgbench_s),
            )
            for clients in PGBENCH_CLIENTS
            for script in PGBENCH_SCRIPTS
        )
    return tasks
