"""Deterministic discrete-event simulations for the protection policies (no real time).

- :func:`run_processor_sharing`: a server of ``cores`` shared equally by the operations on it
  (PostgreSQL running CPU-bound queries), fed by an endless closed loop of callers gated by an
  :class:`~poolwarden.protect.limiter.AdaptiveLimit`.
- :func:`run_overload`: a pool of ``servers`` connections and its FIFO wait queue behind an
  :class:`~poolwarden.protect.admission.Admission`, with a fixed population of closed-loop
  callers that each have a budget and come back after the ``retry_after`` they are given.

Both take a seeded :class:`random.Random` and return what happened, for the tests to judge.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

from poolwarden.protect.admission import Admission
from poolwarden.protect.limiter import AdaptiveLimit

# ---------------------------------------------------------------- adaptive limit


@dataclass
class LimitTrace:
    """The limit after each finished operation, with when it finished."""

    times: list[float] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def settled(self) -> int:
        """The median limit over the second half of the run (after warm-up)."""
        half = self.times[-1] / 2
        return round(statistics.median(
            limit for t, limit in zip(self.times, self.limits, strict=True) if t >= half))

    def throughput(self, since: float) -> float:
        done = sum(1 for t in self.times if t >= since)
        return done / (self.times[-1] - since)


def run_processor_sharing(
    limiter: AdaptiveLimit, *, cores: int, service_s: float, duration_s: float,
    rng: random.Random, spread: float = 0.5,
) -> LimitTrace:
    """Operations of work ``service_s * uniform(1 - spread, 1 + spread)`` share ``cores``
    equally (each runs at ``min(1, cores / n)`` with ``n`` on the server). Callers are always
    waiting, so a new operation starts whenever fewer than ``limiter.limit`` are in flight;
    every finished one is reported with ``on_sample(latency, inflight_at_start, now)``."""
    now = 0.0
    jobs: list[list[float]] = []  # [work left, started at, in flight when it started]
    trace = LimitTrace()
    while now < duration_s:
        while len(jobs) < limiter.limit:
            work = service_s * rng.uniform(1 - spread, 1 + spread)
            jobs.append([work, now, float(len(jobs) + 1)])
        rate = min(1.0, cores / len(jobs))
        first = min(jobs, key=lambda job: job[0])
        step = first[0] / rate
        now += step
        for job in jobs:
            job[0] -= step * rate
        jobs.remove(first)
        latency = now - first[1]
        limiter.on_sample(latency, int(first[2]), now)
        trace.times.append(now)
        trace.limits.append(limiter.limit)
        trace.latencies.append(latency)
    return trace


# ---------------------------------------------------------------- admission


@dataclass
class OverloadResult:
    """What the callers saw during the measured part of an overload run."""

    measured_s: float
    servers: int
    busy_s: float  # connection-seconds spent serving in the measured part
    waits: list[float]  # queue wait of each request served
    served_late: int  # served after its budget ran out (must be 0)
    timed_out: int  # admitted, then gave up in the queue
    refusals: int  # refusals (each one answered at once)
    failed: int  # requests whose budget ran out while away on a retry_after
    served: int
    max_queue: int

    @property
    def goodput(self) -> float:
        """Share of the pool's capacity spent serving: 1.0 when no connection ever idled."""
        return self.busy_s / (self.servers * self.measured_s)

    @property
    def median_wait(self) -> float:
        return statistics.median(self.waits)


_ARRIVE, _RELEASE = 0, 1


def run_overload(
    admission: Admission | None, *, servers: int = 10, callers: int = 500,
    hold_s: float = 0.010, jitter: float = 0.3, budget_s: float = 1.0,
    duration_s: float = 20.0, warmup_s: float = 2.0, rng: random.Random,
) -> OverloadResult:
    """A pool of ``servers`` connections, each use holding one ``hold_s * uniform(1 ± jitter)``,
    and ``callers`` that each send one request after another (no think time). A request has
    ``budget_s`` from its first attempt. It either finds a free connection, or asks
    ``admission.admit``: admitted, it queues (FIFO) for at most ``max_wait(budget left)``;
    refused, it comes back after ``retry_after`` if its budget allows, else it fails there and
    the caller's next request starts then. ``admission=None`` is a plain FIFO queue that
    admits everyone (the baseline).

    The pool calls the admission hooks the way the real pool must: ``on_hold`` on every
    release, ``on_served`` for each waiter handed a connection, ``on_queue_empty`` when a
    release finds nobody waiting."""
    events: list[tuple[float, int, int, int]] = []  # (time, seq, kind, caller)
    seq = 0

    def schedule(at: float, kind: int, caller: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, caller))

    deadline = [0.0] * callers  # the current request's budget ends then
    held = [0.0] * callers  # how long its current use holds the connection
    queue: deque[tuple[int, float, float]] = deque()  # (caller, queued at, gives up at)
    free = servers
    busy_s = 0.0
    waits: list[float] = []
    served_late = timed_out = refusals = failed = served = max_queue = 0
    end = warmup_s + duration_s

    def measured(at: float) -> bool:
        return warmup_s <= at < end

    def serve(caller: int, now: float, waited: float) -> None:
        nonlocal busy_s, served_late, served
        hold = held[caller] = hold_s * rng.uniform(1 - jitter, 1 + jitter)
        if measured(now):
            served += 1
            waits.append(waited)
            served_late += now > deadline[caller]
            busy_s += min(hold, end - now)
        schedule(now + hold, _RELEASE, caller)

    for caller in range(callers):
        deadline[caller] = budget_s
        schedule(0.0, _ARRIVE, caller)

    while events:
        now, _, kind, caller = heapq.heappop(events)
        if now >= end:
            break
        if kind == _RELEASE:
            free += 1
            if admission is not None:
                admission.on_hold(held[caller])
            while queue and free:
                waiter, since, gives_up_at = queue.popleft()
                if now > gives_up_at:  # its timer fired already: the real pool removed it
                    timed_out += measured(now)
                    continue
                free -= 1
                if admission is not None:
                    admission.on_served(now - since, now)
                serve(waiter, now, now - since)
            if free and not queue and admission is not None:
                admission.on_queue_empty(now)
            deadline[caller] = now + budget_s  # its next request starts now
            schedule(now, _ARRIVE, caller)
            continue
        # an arrival (a first attempt or a retry)
        if free and not queue:
            free -= 1
            serve(caller, now, 0.0)
            continue
        left = deadline[caller] - now
        retry = None if admission is None else admission.admit(len(queue), servers, left, now)
        if retry is None:
            max_wait = left if admission is None else admission.max_wait(left)
            queue.append((caller, now, now + max_wait))
            max_queue = max(max_queue, len(queue))
            continue
        assert retry >= 0.0
        assert not math.isnan(retry)
        refusals += measured(now)
        if now + retry > deadline[caller]:
            failed += measured(now)
            deadline[caller] = now + retry + budget_s
        schedule(now + retry, _ARRIVE, caller)

    return OverloadResult(
        measured_s=duration_s, servers=servers, busy_s=busy_s, waits=waits,
        served_late=served_late, timed_out=timed_out, refusals=refusals, failed=failed,
        served=served, max_queue=max_queue,
    )
