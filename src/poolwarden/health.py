"""Health of the database nodes: a bounded check per node, a report, and a background monitor.

Two questions, kept apart on purpose:

- **Liveness** — is this process alive and its event loop answering? :meth:`HealthMonitor.live`
  answers it without touching the database. A liveness probe must never depend on the
  database: if it did, a database outage would make the orchestrator restart every replica of
  the service, which cannot fix the database and turns an outage into a restart storm.
- **Readiness** — can this process serve requests that need the database now?
  :meth:`HealthMonitor.readiness` (rules in :mod:`poolwarden.readiness`) answers it from the
  last background check (no round trip in the probe): the last report is ok and no older
  than ``max_age_s``, and no required node's circuit breaker refuses calls *now* (read live
  from the pool's stats: a breaker that opened after the last check counts at once).

:func:`check_node` runs one check on one pool and never raises for a database problem; the
whole check, including the wait for a connection, is bounded by its ``timeout``.

The circuit breaker and the check:

- The check goes through the pool like any caller, so it sees what a caller would see. While
  the breaker is **open** the pool refuses it at once, with no I/O and no probe used: the node
  is not ok, ``error_type`` ``CircuitOpen``, with the breaker's ``retry_after_s`` and the
  connection error that opened it.
- A node is **not ready while its breaker is half open** either: the pool then lets only its
  probe calls through and refuses everyone else, so traffic sent there would mostly be
  refused. Readiness gives one reason for both states, ``circuit_open``; the breaker's own
  state (``open`` / ``half_open``) is reported beside it.
- When the open period is over and no caller is probing, the check may be the probe. This is
  deliberate: a not-ready process gets no traffic, and without traffic nothing else would ever
  probe, so a check that stood aside would keep the process unready long after the database
  came back. The check holds the probe for at most its ``timeout``: it closes the breaker (a
  connection was had and answered), or gives the slot back (no connection in time, or
  cancelled), or the pool's connection attempt fails and the breaker opens again. While a
  caller holds the probe the check is refused at once and does not disturb it.
- A check that answered while the breaker opened under it (other callers' connection
  attempts failed meanwhile) is not ok: a stale success must not hide a breaker that refuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from ._background import BackgroundTask
from .errors import PoolError
from .pool import Pool, PoolStats
from .pool._driver import describe_error, is_connection_lost
from .readiness import (
    CIRCUIT_OPEN_TYPE,
    NodeReadiness,
    NotReadyReason,
    Readiness,
    judge_readiness,
)

__all__ = [
    "HealthMonitor",
    "HealthReport",
    "HealthSource",
    "NodeHealth",
    "NodeReadiness",
    "NotReadyReason",
    "Readiness",
    "StatsSource",
    "check_node",
    "check_nodes",
    "judge_readiness",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_INTERVAL_S = 5.0
# An error message in a report is for a human glancing at a dashboard, not a log dump.
MAX_ERROR_CHARS = 300
HEALTH_QUERY = "SELECT pg_is_in_recovery()"
# The pool's acquire deadline falls this share of the timeout (at most the cap) before the
# hard bound, so that a check that times out waiting reports the pool's PoolTimeout — with
# its counts and the last connection error — rather than a bare timeout.
POOL_DEADLINE_LEAD = 0.05
POOL_DEADLINE_LEAD_MAX_S = 0.1


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """The result of one check of one node.

    ``ok`` means a connection was had, ``SELECT pg_is_in_recovery()`` answered within the
    timeout, and the node's circuit breaker did not refuse calls when the check ended.
    ``latency_ms`` is that query's round trip and ``acquire_ms`` the wait for the
    connection (``None`` when the step did not complete). ``in_recovery`` is ``True`` on a
    standby, ``False`` on a primary, ``None`` when unknown.

    When not ok: ``error_type`` is the class name of the exception that failed the check
    (``PoolTimeout``, ``CircuitOpen``, ``TimeoutError``, ...; ``CircuitOpen`` too when the
    query answered but the breaker opened meanwhile) — a name, never a message; ``error`` is
    that type and a short message, with passwords and DSNs masked; ``retry_after_s`` is the
    pool's hint (seconds after the check) when it refused the check, e.g. the rest of the
    breaker's open period. All three are ``None`` when ok.
    """

    node: str
    ok: bool
    latency_ms: float | None
    in_recovery: bool | None
    checked_at: datetime  # wall-clock time (UTC) the check started
    stats: PoolStats  # the pool's snapshot right after the check
    error: str | None = None
    acquire_ms: float | None = None
    error_type: str | None = None
    retry_after_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (no password: the error is already sanitised)."""
        return {
            "node": self.node,
            "ok": self.ok,
            "latency_ms": self.latency_ms,
            "acquire_ms": self.acquire_ms,
            "in_recovery": self.in_recovery,
            "checked_at": self.checked_at.isoformat(),
            "error_type": self.error_type,
            "error": self.error,
            "retry_after_s": self.retry_after_s,
            "stats": self.stats.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The health of every node. ``ok`` is true when every *required* node is ok (all nodes
    unless ``required`` names a subset); a report with no required node is not ok."""

    nodes: tuple[NodeHealth, ...]
    required: frozenset[str] = field(default_factory=frozenset)

    @property
    def ok(self) -> bool:
        needed = [n for n in self.nodes if n.node in self.required] if self.required else list(
            self.nodes
        )
        return bool(needed) and all(n.ok for n in needed)

    def node(self, name: str) -> NodeHealth:
        """The result for node ``name``; raises ``KeyError`` when it was not checked."""
        for health in self.nodes:
            if health.node == name:
                return health
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe dict for a health endpoint: ``{"ok": ..., "nodes": {name: {...}}}``."""
        return {
            "ok": self.ok,
            "required": sorted(self.required) if self.required else [n.node for n in self.nodes],
            "nodes": {n.node: n.as_dict() for n in self.nodes},
        }


async def check_node(pool: Pool, *, timeout: float = DEFAULT_TIMEOUT_S) -> NodeHealth:
    """Check one node through its pool, within ``timeout`` seconds in all.

    Acquires a connection (waiting in the pool's queue like any caller, at most until the
    deadline) and runs ``SELECT pg_is_in_recovery()`` with the remaining budget. Returns
    ``ok=False`` with a sanitised error and its ``error_type`` for every database or pool
    problem (server down, network blackholed, pool exhausted or closed, circuit breaker
    open) — never raises for those. Raises ``CancelledError`` when the caller is cancelled.

    The breaker decides like for any caller (see the module docstring): while it is open
    the check is refused at once, without I/O; when a probe may go, the check may be it.

    A connection whose health query failed or timed out is closed rather than returned:
    its state is unknown, and cleaning it could wait on a dead network past the deadline.
    """
    checked_at = datetime.now(UTC)
    started = time.monotonic()
    deadline = started + timeout
    stage = "acquire"
    acquire_ms: float | None = None
    try:
        lead = min(timeout * POOL_DEADLINE_LEAD, POOL_DEADLINE_LEAD_MAX_S)
        async with asyncio.timeout(timeout), pool.connection(deadline=deadline - lead) as conn:
            acquired = time.monotonic()
            acquire_ms = (acquired - started) * 1000.0
            stage = "query"
            try:
                remaining = max(deadline - acquired, 0.001)
                in_recovery = await conn.fetchval(HEALTH_QUERY, timeout=remaining)
            except BaseException as exc:
                if not is_connection_lost(exc):
                    # Cancelled or failed mid-query: discard the connection now (no I/O
                    # awaited), so that leaving the block does not clean it, which could
                    # wait on a dead network past our deadline. A lost connection is left
                    # to the block's exit, which also makes its idle siblings suspect.
                    # (Had this check the breaker's half-open probe, the discard frees the
                    # probe's slot: the next check or caller probes again.)
                    await pool.release(conn, discard=True)
                raise
            latency_ms = (time.monotonic() - acquired) * 1000.0
    except Exception as exc:
        return NodeHealth(
            node=pool.name, ok=False, latency_ms=None, in_recovery=None, checked_at=checked_at,
            stats=pool.stats(), error=_describe(exc, pool, stage, timeout),
            acquire_ms=acquire_ms, error_type=type(exc).__name__,
            retry_after_s=exc.retry_after_s if isinstance(exc, PoolError) else None,
        )
    stats = pool.stats()
    if stats.breaker_open:
        # The query answered, but the breaker opened while it ran (other callers' connection
        # attempts failed): callers are refused now, and this success must not hide it.
        return NodeHealth(
            node=pool.name, ok=False, latency_ms=latency_ms, in_recovery=bool(in_recovery),
            checked_at=checked_at, stats=stats, acquire_ms=acquire_ms,
            error=f"{CIRCUIT_OPEN_TYPE}: the circuit breaker is {stats.breaker_state}; "
                  "callers are refused",
            error_type=CIRCUIT_OPEN_TYPE, retry_after_s=pool.retry_after(),
        )
    return NodeHealth(
        node=pool.name, ok=True, latency_ms=latency_ms, in_recovery=bool(in_recovery),
        checked_at=checked_at, stats=stats, acquire_ms=acquire_ms,
    )


async def check_nodes(
    pools: Mapping[str, Pool] | Iterable[Pool],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    required: Collection[str] | None = None,
) -> HealthReport:
    """Check every pool concurrently (so the whole report is bounded by ``timeout`` too).

    ``required`` names the nodes the report's ``ok`` depends on (default: all). Raises only
    ``CancelledError``.
    """
    targets = list(pools.values()) if isinstance(pools, Mapping) else list(pools)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(check_node(p, timeout=timeout)) for p in targets]
    return HealthReport(
        nodes=tuple(t.result() for t in tasks), required=frozenset(required or ())
    )


def _describe(exc: BaseException, pool: Pool, stage: str, timeout: float) -> str:
    """Type and short message, masked of passwords and DSNs, the cause (if any) appended."""
    if isinstance(exc, TimeoutError) and not str(exc):
        text = f"TimeoutError: no answer within {timeout:g} s (during {stage})"
    else:
        text = describe_error(exc, pool.config)
        cause = exc.__cause__
        if cause is not None:
            text += f" (cause: {describe_error(cause, pool.config)})"
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


# ---------------------------------------------------------------------- background monitor


@runtime_checkable
class HealthSource(Protocol):
    """Anything that can produce a :class:`HealthReport` (``Database`` does)."""

    async def health(self, *, timeout: float = ...) -> HealthReport: ...


@runtime_checkable
class StatsSource(Protocol):
    """Anything that gives each node's live pool stats by node name (``Database`` does).
    A :class:`HealthMonitor` whose target also is one reads its breakers live."""

    def stats(self) -> Mapping[str, PoolStats]: ...


async def _check(target: Pool | HealthSource, timeout: float) -> HealthReport:
    if isinstance(target, Pool):
        return await check_nodes([target], timeout=timeout)
    return await target.health(timeout=timeout)


class HealthMonitor(BackgroundTask):
    """Checks ``target`` (a :class:`Pool` or a :class:`HealthSource` such as ``Database``)
    every ``interval`` seconds in a background task and keeps the last report.

    The monitor holds only a weak reference to its target: it does not keep a forgotten
    database alive, and its task ends when the target is gone. ``start()`` needs a running
    loop; ``stop()`` cancels the task and waits for it. Also an async context manager.

    Probes: :meth:`live` (never touches the database) and :meth:`ready` /
    :meth:`readiness` (last report ok and fresh, and no required node's breaker refusing
    calls now; reads the cached report and the pools' in-memory stats, no round trip). The
    breakers are read live when the target is a :class:`Pool` or also a
    :class:`StatsSource`; otherwise from the stats taken with the last check.
    """

    TASK_NAME = "poolwarden-health-monitor"

    def __init__(
        self,
        target: Pool | HealthSource,
        *,
        interval: float = DEFAULT_INTERVAL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0 seconds")
        self._target: weakref.ref[Pool | HealthSource] = weakref.ref(target)
        self.interval = interval
        self.timeout = timeout
        super().__init__()
        self._last: HealthReport | None = None
        self._last_at = 0.0  # monotonic instant the last report was completed
        self._loop_lag_s = 0.0

    # -- state

    @property
    def last(self) -> HealthReport | None:
        """The last completed report, ``None`` before the first check has finished."""
        return self._last

    @property
    def age_s(self) -> float | None:
        """Seconds since the last report was completed; ``None`` before the first."""
        return None if self._last is None else time.monotonic() - self._last_at

    @property
    def loop_lag_s(self) -> float:
        """How late the monitor's last timer fired: a busy or blocked event loop shows here."""
        return self._loop_lag_s


    def default_max_age_s(self) -> float:
        """Freshness limit used by :meth:`ready` by default: two intervals plus one timeout."""
        return 2 * self.interval + self.timeout

    def readiness(
        self, max_age_s: float | None = None, *, live: Mapping[str, PoolStats] | None = None
    ) -> Readiness:
        """Readiness, with the reason when not ready and each node's part (see
        :func:`judge_readiness`). ``max_age_s`` defaults to :meth:`default_max_age_s`;
        ``live`` (each node's stats now) to the target's own, when it gives them. No I/O."""
        limit = self.default_max_age_s() if max_age_s is None else max_age_s
        if live is None:
            live = self._live_stats()
        return judge_readiness(self._last, age_s=self.age_s, max_age_s=limit, live=live)

    def ready(self, max_age_s: float | None = None) -> bool:
        """Whether :meth:`readiness` says ready: the last report is ok and at most
        ``max_age_s`` old, and no required node's breaker refuses calls now. ``False``
        before the first report. No I/O."""
        return self.readiness(max_age_s).ready

    def _live_stats(self) -> Mapping[str, PoolStats] | None:
        # (typed object: mypy takes a HealthSource that is also a StatsSource for impossible)
        target: object = self._target()
        if isinstance(target, Pool):
            return {target.name: target.stats()}
        if isinstance(target, StatsSource):
            return target.stats()
        return None

    def live(self) -> bool:
        """Liveness: always ``True`` — if this runs, the process and its loop answer.

        Deliberately independent of the database (see the module docstring)."""
        return True

    # -- lifecycle

    async def refresh(self) -> HealthReport | None:
        """Run one check now and keep its result; ``None`` when the target is gone."""
        target = self._target()
        if target is None:
            return None
        report = await _check(target, self.timeout)
        del target
        self._record(report)
        return report


    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                if await self.refresh() is None:
                    return  # the target was garbage-collected
            except Exception as exc:
                # A bug in a HealthSource, not a database problem (check_node never raises
                # for those): log the type only — a traceback's messages might hold a DSN —
                # and keep going; the report goes stale, so readiness turns false.
                logger.error(  # noqa: TRY400 - no traceback on purpose, see above
                    "health check raised %s; will retry", type(exc).__name__
                )
            wake_at = started + self.interval
            await asyncio.sleep(max(0.0, wake_at - loop.time()))
            self._loop_lag_s = max(0.0, loop.time() - wake_at)

    def _record(self, report: HealthReport) -> None:
        previous, self._last = self._last, report
        self._last_at = time.monotonic()
        # Log transitions only (and the first result), not every check.
        if report.ok and (previous is None or not previous.ok):
            logger.info("database ready")
        elif not report.ok and (previous is None or previous.ok):
            errors = "; ".join(f"{n.node}: {n.error}" for n in report.nodes if not n.ok)
            logger.warning("database not ready: %s", errors)

    def __repr__(self) -> str:
        age = self.age_s
        state = "running" if self.running else "stopped"
        last = "none" if self._last is None else ("ok" if self._last.ok else "failing")
        age_text = "-" if age is None else f"{age:.1f}s"
        return f"<HealthMonitor {state} interval={self.interval}s last={last} age={age_text}>"
