"""The time-bounded closed-loop driver: C tasks, each doing one operation after another.

Every task runs the same loop: take a timestamp, run the operation, take a timestamp. Only
operations that *finish* inside the measurement window (after the warm-up, before the end)
are recorded, so the throughput is ``recorded / window``, independent of how precisely the
event loop wakes up. An operation reports the moment it had its connection in hand, which
splits its latency into the acquire wait and the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

Op = Callable[[], Awaitable[int]]
"""One operation; returns ``time.perf_counter_ns()`` taken when the connection was in hand."""

_ERROR_PAUSE_S = 0.01  # after an unexpected error, so that a broken system does not spin


class Shed(Exception):
    """The system did not give a connection: ``kind`` is ``"timeout"`` or ``"refused"``;
    ``retry_after_s``: when the system said to come back (its Retry-After), if it did."""

    def __init__(self, kind: str, retry_after_s: float | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Samples:
    """What the tasks recorded inside the window (latencies in nanoseconds)."""

    window_s: float
    total_ns: list[int] = field(default_factory=list)
    wait_ns: list[int] = field(default_factory=list)
    shed_ns: list[int] = field(default_factory=list)
    timeouts: int = 0
    refusals: int = 0
    late_acquires: int = 0
    late_finishes: int = 0
    errors: int = 0
    first_error: str | None = None
    cpu_s: float | None = None  # this process's CPU time inside the window (all tasks)

    def add(self, other: Samples) -> None:
        """Take in another window of the same system (its window adds to this one's)."""
        self.window_s += other.window_s
        self.total_ns.extend(other.total_ns)
        self.wait_ns.extend(other.wait_ns)
        self.shed_ns.extend(other.shed_ns)
        self.timeouts += other.timeouts
        self.refusals += other.refusals
        self.late_acquires += other.late_acquires
        self.late_finishes += other.late_finishes
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        if other.cpu_s is not None:
            self.cpu_s = (self.cpu_s or 0.0) + other.cpu_s


async def closed_loop(
    ops: Sequence[Op],
    *,
    warmup_s: float,
    duration_s: float,
    budget_s: float | None = None,
    shed_pause_s: float = 0.0,
) -> Samples:
    """Run ``ops[i]`` in a loop in task ``i`` (concurrency ``len(ops)``) and record the window.

    ``budget_s`` is the caller's acquire budget: a served request whose connection came
    later than that is a *late acquire*, one that finished later is a *late finish*. After a
    :class:`Shed` the task pauses ``shed_pause_s`` before its next request, as a client
    honouring a short ``Retry-After`` would, instead of spinning on refusals.
    """
    now = time.perf_counter_ns
    start_ns = now() + int(warmup_s * 1e9)
    stop_ns = start_ns + int(duration_s * 1e9)
    budget_ns = int(budget_s * 1e9) if budget_s is not None else None
    out = Samples(window_s=duration_s)

    async def worker(op: Op) -> None:
        total, wait = out.total_ns, out.wait_ns
        while True:
            t0 = now()
            if t0 >= stop_ns:
                return
            try:
                t_conn = await op()
            except Shed as shed:
                t1 = now()
                if start_ns <= t1 <= stop_ns:
                    out.shed_ns.append(t1 - t0)
                    if shed.kind == "timeout":
                        out.timeouts += 1
                    else:
                        out.refusals += 1
                pause = shed.retry_after_s if shed.retry_after_s is not None else shed_pause_s
                if pause:
                    await asyncio.sleep(pause)
                continue
            except Exception as exc:  # a benchmark reports errors, it does not die
                out.errors += 1
                if out.first_error is None:
                    out.first_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(_ERROR_PAUSE_S)
                continue
            t1 = now()
            if start_ns <= t1 <= stop_ns:
                total.append(t1 - t0)
                wait.append(t_conn - t0)
                if budget_ns is not None:
                    out.late_acquires += t_conn - t0 > budget_ns
                    out.late_finishes += t1 - t0 > budget_ns

    async def cpu_meter() -> None:
        # The client's CPU per operation is steadier than its throughput on a shared
        # machine: the server's and the neighbours' load moves it much less.
        await asyncio.sleep(max(0.0, (start_ns - now()) / 1e9))
        cpu = time.process_time()
        await asyncio.sleep(max(0.0, (stop_ns - now()) / 1e9))
        out.cpu_s = time.process_time() - cpu

    await asyncio.gather(cpu_meter(), *(worker(op) for op in ops))
    return out
