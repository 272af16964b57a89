"""The advisor: from a pool's settings and stats, what to change and why, in plain words.

:func:`advise` is pure (no I/O, no clock): it reads a :class:`~poolwarden.pool.PoolConfig`, a
:class:`~poolwarden.pool.PoolStats` snapshot and, when given, an earlier snapshot of the same
pool, and returns :class:`Finding` s — each with the numbers behind it and the change to make.
With an earlier snapshot the counters are judged over the interval between the two (what is
happening now); without one, over the pool's whole life.

The usual cause of "pool limit reached" is not a pool that is too small but connections held
too long (slow work, HTTP calls or an idle transaction inside ``async with``); hold times are
not in ``PoolStats``, so the metrics layer passes them (``hold_time_p99_ms``,
``query_time_p99_ms``) and the advisor tells the two apart when it has them.

Every threshold is a named constant below, with the reason for its value.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .pool.config import PoolConfig
from .pool.stats import PoolStats
from .sizing import ServerBudget

MIN_ACQUIRES = 100
"""Below this many acquire attempts in the window, ratios are noise: rate-based rules stay quiet
(failures — timeouts, refusals, connection errors — are reported at any count)."""

WAITED_SIGNIFICANT = 0.10
"""One acquire in ten queuing for a connection is more than bad luck in arrivals."""

WAITED_NEGLIGIBLE = 0.01
"""At most one acquire in a hundred queued: capacity is not what limits this pool."""

WAIT_MEAN_HIGH_MS = 50.0
"""A mean queue wait of 50 ms is latency users notice, added by the pool alone."""

FAILURE_CRITICAL = 0.01
"""One failed acquire (timeout or refusal) in a hundred attempts is an outage for those users."""

HELD_TOO_LONG_RATIO = 5.0
"""A connection held five times longer than its queries take is mostly held doing something
else (HTTP calls, computation, an open transaction waiting on the client)."""

HOLD_MIN_MS = 20.0
"""Below 20 ms of hold time, the ratio to query time is not worth a finding."""

IDLE_FRACTION = 0.25
"""At most a quarter of pool_size in use at both snapshots, with no queueing: mostly idle."""

SHRINK_HEADROOM = 2.0
"""Shrink to twice the most in use seen: two snapshots can miss the peaks between them."""

GROWTH_STEP = 0.5
"""Grow by half at a time: a bigger pool moves the queue into the server, so grow in steps and
look again, rather than jumping to the load's peak."""

OVERFLOW_CHURN = 0.01
"""Overflow connections closed on release in more than 1% of acquires: every one is a new
connection (TCP, TLS, authentication) that a larger pool_size would have kept."""

CHURN = 0.05
"""More than one new connection (not counting growth) per twenty acquires: connecting costs far
more than a query, so this is a pool that keeps losing its connections."""

LIFETIME_SHORT_S = 300.0
"""A max_lifetime under five minutes replaces every connection many times an hour for no gain;
half an hour is the usual setting (PgBouncer, HikariCP)."""

LIFETIME_SUGGESTED_S = 1800.0

PING_FAILURE_WARN = 0.01
"""More than 1% of pre-pings failing: something between the pool and the server drops idle
connections (firewall, NAT, load balancer, idle_session_timeout)."""

BUDGET_TIGHT = 0.9
"""Pools that may together take over 90% of the usable connections leave no room for a rolling
deploy, where old and new processes hold connections at the same time."""

IDLE_IN_TX_CRITICAL = 0.25
"""A quarter of the pools' connections idle in a transaction is a leak in progress: each holds
a connection and its locks while doing nothing."""

IDLE_IN_TX_TIMEOUT_S = 60.0

_CHURN_REASONS = ("lifetime", "idle", "error", "server_restarted", "ping_failed", "reset_failed")
"""Close reasons that mean a connection was replaced, not that the pool shrank or closed."""


class Severity(enum.StrEnum):
    """``critical``: users are failing now; ``warning``: will fail or costs latency; ``info``."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


_RANK = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.INFO: 2}

Evidence = dict[str, float | int | str]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the advisor found: how bad, a stable ``code``, what and why, what to do.

    ``changes`` holds the proposed new values of :class:`PoolConfig` fields (``pool_size``,
    ``max_overflow``, ``min_size``, ``max_lifetime``, ...) when the action is a setting change;
    the resulting sizes always satisfy ``1 ≤ pool_size``, ``0 ≤ min_size ≤ pool_size`` and,
    with a server budget, never grow a pool past it.
    """

    severity: Severity
    code: str
    message: str
    evidence: Evidence
    action: str
    changes: dict[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Window:
    """The counters over the judged interval, and the current counts seen at its ends."""

    label: str  # "interval" or "since start"
    acquires: int
    waited: int
    wait_ms: float
    timeouts: int
    refusals: int
    cancelled: int
    created: int
    connect_errors: int
    pings: int
    ping_failures: int
    closed: dict[str, int]
    grown: int  # net change in open connections over the window
    peak_in_use: int
    peak_connections: int
    overflow_throughout: bool

    @property
    def attempts(self) -> int:
        return self.acquires + self.timeouts + self.refusals + self.cancelled

    @property
    def waited_fraction(self) -> float:
        return self.waited / self.acquires if self.acquires else 0.0

    @property
    def mean_wait_ms(self) -> float:
        return self.wait_ms / self.waited if self.waited else 0.0

    @property
    def failed(self) -> int:
        return self.timeouts + self.refusals


def advise(
    config: PoolConfig,
    stats: PoolStats,
    previous: PoolStats | None = None,
    *,
    server: ServerBudget | None = None,
    hold_time_p99_ms: float | None = None,
    query_time_p99_ms: float | None = None,
    idle_in_transaction: int | None = None,
) -> list[Finding]:
    """Findings for one pool, most severe first; an empty list when nothing needs changing.

    ``stats`` is the current snapshot; sizes are read from it (it reflects resizes), the other
    settings from ``config``. ``previous`` is an earlier snapshot of the same pool: counters are
    judged over the interval between the two; if it is not an earlier snapshot of this pool
    (a counter went down, another name), the whole life is judged instead. ``server``: the
    connection budget this pool's processes share. ``hold_time_p99_ms``/``query_time_p99_ms``
    (from the metrics layer): with both, a hold far longer than the queries is reported as
    ``connections_held_too_long`` instead of ``pool_too_small``. ``idle_in_transaction``: this
    application's sessions idle in a transaction (from the server's view). Never raises for a
    snapshot whose counts are non-negative.
    """
    w = _window(stats, previous)
    held_long = _held_too_long(hold_time_p99_ms, query_time_p99_ms)
    starved = _starved(stats, w)
    findings = [
        *_failures(config, stats, w, starved),
        *_capacity(stats, w, starved=starved, held_long=held_long, server=server,
                   hold_ms=hold_time_p99_ms, query_ms=query_time_p99_ms),
        *_churn(config, stats, w),
        *_budget(stats, server),
        *_idle_in_transaction(config, stats, server, idle_in_transaction),
    ]
    for finding in findings:
        finding.evidence["window"] = w.label
    findings.sort(key=lambda f: _RANK[f.severity])
    return findings


# -- the window ----------------------------------------------------------------------------


def _window(stats: PoolStats, previous: PoolStats | None) -> _Window:
    """The interval between ``previous`` and ``stats``; the whole life when that is not valid."""
    now = _counters(stats)
    if previous is not None and previous.name == stats.name:
        before = _counters(previous)
        delta = {key: now[key] - before[key] for key in now}
        closed = {reason: count - previous.connections_closed_total.get(reason, 0)
                  for reason, count in stats.connections_closed_total.items()}
        if all(v >= 0 for v in delta.values()) and all(v >= 0 for v in closed.values()):
            return _Window(
                "interval", **_ints(delta), wait_ms=delta["wait_ms"], closed=closed,
                grown=stats.connections - previous.connections,
                peak_in_use=max(stats.connections_in_use, previous.connections_in_use),
                peak_connections=max(stats.connections, previous.connections),
                overflow_throughout=min(stats.connections_overflow,
                                        previous.connections_overflow) > 0)
    return _Window(
        "since start", **_ints(now), wait_ms=now["wait_ms"],
        closed=dict(stats.connections_closed_total), grown=stats.connections,
        peak_in_use=stats.connections_in_use, peak_connections=stats.connections,
        overflow_throughout=False)


def _counters(s: PoolStats) -> dict[str, float]:
    return {
        "acquires": s.acquires_total, "waited": s.acquires_waited_total,
        "wait_ms": s.acquire_wait_ms_total, "timeouts": s.acquire_timeouts_total,
        "refusals": s.acquire_refusals_total, "cancelled": s.acquire_cancelled_total,
        "created": s.connections_created_total, "connect_errors": s.connection_errors_total,
        "pings": s.pings_total, "ping_failures": s.ping_failures_total,
    }


def _ints(counters: dict[str, float]) -> dict[str, int]:
    return {key: int(value) for key, value in counters.items() if key != "wait_ms"}


def _starved(stats: PoolStats, w: _Window) -> bool:
    """Callers waited because every connection was taken — not because the server was down."""
    queued_long = (w.attempts >= MIN_ACQUIRES and w.waited_fraction >= WAITED_SIGNIFICANT
                   and w.mean_wait_ms >= WAIT_MEAN_HIGH_MS)
    at_limit = w.peak_connections >= stats.max_size
    # A rare timeout on a pool seen below its limit is bad luck, not a lack of capacity.
    failing = w.failed > 0 and (at_limit or w.failed >= FAILURE_CRITICAL * w.attempts)
    server_failing = w.connect_errors > 0
    return not server_failing and ((queued_long and at_limit) or failing)


def _held_too_long(hold_ms: float | None, query_ms: float | None) -> bool:
    if hold_ms is None or query_ms is None or not (hold_ms >= HOLD_MIN_MS):
        return False
    return hold_ms >= HELD_TOO_LONG_RATIO * max(query_ms, 0.0)


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


# -- the rules -----------------------------------------------------------------------------


def _failures(config: PoolConfig, stats: PoolStats, w: _Window,
              starved: bool) -> list[Finding]:
    out: list[Finding] = []
    cause = ("see the pool-size and hold-time findings" if starved
             else "see the connection-error finding" if w.connect_errors else
             "look at what held the connections when it happened")
    for code, count, what, also in (
        ("acquire_timeouts", w.timeouts, "timed out waiting for a connection",
         f"raising DB_POOL_TIMEOUT (now {config.acquire_timeout:g} s) only makes callers "
         "wait longer"),
        ("acquire_refusals", w.refusals, "were refused at once because the wait queue was full "
         f"(max_waiting={stats.max_waiting})",
         "refusing fast (HTTP 503) protects the service; raise DB_POOL_MAX_WAITING only if "
         "callers can afford to queue"),
    ):
        if count:
            severity = (Severity.CRITICAL if count >= FAILURE_CRITICAL * w.attempts
                        else Severity.WARNING)
            out.append(Finding(
                severity, code,
                f"{count} of {w.attempts} acquires ({_pct(count, w.attempts)}%) {what}.",
                {code.split("_")[1]: count, "attempts": w.attempts,
                 "percent": _pct(count, w.attempts)},
                f"Fix the cause, not the symptom: {cause}; {also}."))
    if w.connect_errors:
        nothing = w.created == 0
        out.append(Finding(
            Severity.CRITICAL if nothing else Severity.WARNING, "connection_errors",
            f"{w.connect_errors} attempts to open a connection failed"
            f"{' and none succeeded' if nothing else f' ({w.created} succeeded)'}.",
            {"connection_errors": w.connect_errors, "connections_created": w.created},
            "Check that the server is up and reachable and accepts this role (network, TLS, "
            "credentials, pg_hba.conf, 'too many clients' = max_connections reached)."))
    return out


def _capacity(stats: PoolStats, w: _Window, *, starved: bool, held_long: bool,
              server: ServerBudget | None, hold_ms: float | None,
              query_ms: float | None) -> list[Finding]:
    out: list[Finding] = []
    evidence: Evidence = {
        "acquires": w.acquires, "waited_percent": _pct(w.waited, w.acquires),
        "mean_wait_ms": round(w.mean_wait_ms, 2), "timeouts": w.timeouts,
        "refusals": w.refusals, "peak_in_use": w.peak_in_use, "pool_size": stats.pool_size,
        "max_size": stats.max_size, "waiting_now": stats.requests_waiting,
    }
    if held_long and hold_ms is not None and query_ms is not None:
        out.append(Finding(
            Severity.CRITICAL if starved else Severity.WARNING, "connections_held_too_long",
            f"Connections are held {hold_ms:.0f} ms (p99) for queries that take "
            f"{query_ms:.0f} ms (p99): most of the hold is spent on something else"
            f"{', and callers are queuing for them' if starved else ''}. A bigger pool would "
            "only move the queue.",
            {**evidence, "hold_time_p99_ms": hold_ms, "query_time_p99_ms": query_ms},
            "Find the code that holds connections: enable leak detection, and move HTTP calls "
            "and slow work out of the `async with db.session()` / `connection()` block."))
    elif starved:
        grown = _grown(stats, server)
        hint = ("" if hold_ms is not None and query_ms is not None else
                " Hold times were not given: check them first, since connections held too "
                "long are the usual cause.")
        message = (f"The pool is too small for its load: {_pct(w.waited, w.acquires)}% of "
                   f"acquires queued (mean wait {w.mean_wait_ms:.0f} ms), {w.failed} failed, "
                   f"with up to {w.peak_connections} of {stats.max_size} connections open.{hint}")
        if grown is None:
            out.append(Finding(
                Severity.CRITICAL if w.failed else Severity.WARNING, "pool_too_small", message,
                evidence, "The server budget leaves no room to grow: hold connections for less "
                "time, run fewer processes, or share connections through PgBouncer."))
        else:
            pool, overflow = grown
            out.append(Finding(
                Severity.CRITICAL if w.failed else Severity.WARNING, "pool_too_small", message,
                evidence, f"Raise DB_POOL_SIZE from {stats.pool_size} to {pool}"
                f"{_overflow_change(stats, overflow)}, then look again.",
                {"pool_size": pool, "max_overflow": overflow}))
    if not starved:
        out.extend(_overflow_used(stats, w))
        out.extend(_too_big(stats, w))
    return out


def _grown(stats: PoolStats, server: ServerBudget | None) -> tuple[int, int] | None:
    """A larger (pool_size, max_overflow), within the budget per process; None if no room."""
    pool = stats.pool_size + max(1, math.ceil(stats.pool_size * GROWTH_STEP))
    overflow = stats.max_overflow
    if server is not None:
        ceiling = server.usable // server.processes
        pool = min(pool, ceiling)
        overflow = max(0, min(overflow, ceiling - pool))
    return (pool, overflow) if pool > stats.pool_size else None


def _overflow_change(stats: PoolStats, overflow: int) -> str:
    if overflow == stats.max_overflow:
        return ""
    return f" and set DB_MAX_OVERFLOW from {stats.max_overflow} to {overflow}"


def _overflow_used(stats: PoolStats, w: _Window) -> list[Finding]:
    closes = w.closed.get("overflow", 0)
    churny = w.acquires >= MIN_ACQUIRES and closes >= OVERFLOW_CHURN * w.acquires
    if stats.max_overflow == 0 or not (churny or w.overflow_throughout):
        return []
    moved = min(stats.max_overflow, max(1, stats.connections_overflow))
    pool, overflow = stats.pool_size + moved, stats.max_overflow - moved
    return [Finding(
        Severity.WARNING, "overflow_always_used",
        f"Overflow connections are in constant use: {closes} were opened and closed again "
        f"over {w.acquires} acquires, and {stats.connections_overflow} are open now. Each one "
        "costs a new connection that a larger pool_size would keep.",
        {"overflow_closes": closes, "acquires": w.acquires,
         "overflow_now": stats.connections_overflow, "pool_size": stats.pool_size,
         "max_overflow": stats.max_overflow},
        f"Raise DB_POOL_SIZE from {stats.pool_size} to {pool} and lower DB_MAX_OVERFLOW from "
        f"{stats.max_overflow} to {overflow}: the same ceiling of {stats.max_size}, fewer "
        "reconnects.",
        {"pool_size": pool, "max_overflow": overflow})]


def _too_big(stats: PoolStats, w: _Window) -> list[Finding]:
    quiet = (w.attempts >= MIN_ACQUIRES and w.waited_fraction <= WAITED_NEGLIGIBLE
             and w.failed == 0)
    target = max(stats.min_size, 1, math.ceil(w.peak_in_use * SHRINK_HEADROOM))
    if not quiet or w.peak_in_use > IDLE_FRACTION * stats.pool_size or target >= stats.pool_size:
        return []
    return [Finding(
        Severity.INFO, "pool_too_big",
        f"The pool is mostly idle: at most {w.peak_in_use} of {stats.pool_size} connections in "
        f"use and {_pct(w.waited, w.acquires)}% of {w.acquires} acquires queued. Its "
        f"{stats.max_size} possible connections count against the server's max_connections.",
        {"peak_in_use": w.peak_in_use, "pool_size": stats.pool_size,
         "idle_now": stats.connections_idle, "acquires": w.acquires,
         "waited_percent": _pct(w.waited, w.acquires)},
        f"Lower DB_POOL_SIZE from {stats.pool_size} to {target} (twice the most seen in use, "
        f"not below DB_POOL_MIN_SIZE={stats.min_size}).",
        {"pool_size": target})]


def _churn(config: PoolConfig, stats: PoolStats, w: _Window) -> list[Finding]:
    out: list[Finding] = []
    if w.pings and w.ping_failures:
        share = w.ping_failures / w.pings
        out.append(Finding(
            Severity.WARNING if share >= PING_FAILURE_WARN else Severity.INFO, "ping_failures",
            f"{w.ping_failures} of {w.pings} pre-pings ({_pct(w.ping_failures, w.pings)}%) "
            "found a dead connection: something closes connections while they sit idle.",
            {"ping_failures": w.ping_failures, "pings": w.pings},
            f"Find what drops idle connections (firewall, NAT, load balancer, PgBouncer or "
            f"server idle timeouts) and keep DB_POOL_IDLE_TIMEOUT (now {config.idle_timeout:g} "
            "s) below its cutoff."))
    replaced = w.created - max(0, w.grown)
    by_reason = {r: w.closed.get(r, 0) for r in _CHURN_REASONS if w.closed.get(r, 0) > 0}
    if w.acquires < MIN_ACQUIRES or replaced < CHURN * w.acquires or not by_reason:
        return out
    reason = max(by_reason, key=lambda r: by_reason[r])
    evidence: Evidence = {"replaced": replaced, "acquires": w.acquires,
                          **{f"closed_{r}": n for r, n in by_reason.items()}}
    head = (f"{replaced} connections were replaced over {w.acquires} acquires "
            f"({_pct(replaced, w.acquires)}%), mostly closed for '{reason}'")
    changes: dict[str, int | float] = {}
    if reason == "lifetime":
        action = (f"DB_POOL_RECYCLE is {config.max_lifetime:g} s; connections are replaced as "
                  "they reach it.")
        if config.max_lifetime < LIFETIME_SHORT_S:
            action = (f"Raise DB_POOL_RECYCLE from {config.max_lifetime:g} to "
                      f"{LIFETIME_SUGGESTED_S:g} s.")
            changes = {"max_lifetime": LIFETIME_SUGGESTED_S}
    elif reason == "idle":
        keep = min(stats.pool_size, max(stats.min_size + 1, w.peak_in_use))
        action = (f"Connections close as idle and are reopened: raise DB_POOL_MIN_SIZE from "
                  f"{stats.min_size} to {keep} or DB_POOL_IDLE_TIMEOUT (now "
                  f"{config.idle_timeout:g} s).")
        if keep > stats.min_size:
            changes = {"min_size": keep}
    elif reason == "reset_failed":
        action = ("Released connections could not be cleaned: find the code that returns "
                  "them mid-query or in a broken transaction.")
    else:
        action = ("The server, or something between (PgBouncer, a proxy, pg_terminate_backend, "
                  "idle_session_timeout, a restart), is closing connections: check its logs.")
    out.append(Finding(Severity.WARNING, "connection_churn", f"{head}.", evidence, action,
                       changes))
    return out


def _budget(stats: PoolStats, server: ServerBudget | None) -> list[Finding]:
    if server is None:
        return []
    n, usable = server.processes, server.usable
    total = n * stats.max_size
    evidence: Evidence = {
        "processes": n, "max_size": stats.max_size, "total_max": total,
        "max_connections": server.max_connections, "reserved": server.reserved,
        "other_connections": server.other_connections, "headroom": server.headroom,
        "usable": usable}
    arithmetic = (f"{n} processes x {stats.max_size} = {total} connections at peak, against "
                  f"{server.max_connections} - {server.reserved} reserved - "
                  f"{server.other_connections} other - {server.headroom} headroom = {usable}")
    if total > usable:
        ceiling = usable // n
        if ceiling < 1:
            return [Finding(
                Severity.CRITICAL, "server_budget_exceeded", f"{arithmetic}: not even one "
                "connection per process fits.", evidence,
                "Run fewer processes, raise max_connections, or share connections through "
                "PgBouncer (transaction mode).")]
        pool = min(stats.pool_size, ceiling)
        changes: dict[str, int | float] = {"pool_size": pool, "max_overflow": ceiling - pool}
        lower_min = ""
        if stats.min_size > pool:
            changes["min_size"] = pool
            lower_min = f", DB_POOL_MIN_SIZE to {pool}"
        return [Finding(
            Severity.CRITICAL, "server_budget_exceeded",
            f"{arithmetic}: under load the server will refuse connections ('too many clients').",
            evidence,
            f"Per process: set DB_POOL_SIZE to {pool}, DB_MAX_OVERFLOW to {ceiling - pool}"
            f"{lower_min} ({n} x {ceiling} = {n * ceiling} ≤ {usable}); or put PgBouncer in "
            "front.", changes)]
    if total > BUDGET_TIGHT * usable:
        return [Finding(
            Severity.INFO, "server_budget_tight",
            f"{arithmetic}: over {BUDGET_TIGHT:.0%} of the budget, so a rolling deploy (old and "
            "new processes at once) can run out.", evidence,
            "Leave room for deploys: lower DB_MAX_OVERFLOW, or raise max_connections.")]
    return []


def _idle_in_transaction(config: PoolConfig, stats: PoolStats, server: ServerBudget | None,
                         count: int | None) -> list[Finding]:
    if not count or count < 0:
        return []
    capacity = (server.processes if server else 1) * stats.max_size
    changes: dict[str, int | float] = {}
    action = "Find the code that opens a transaction and then awaits something else: "
    if config.idle_in_transaction_timeout is None:
        action += (f"enable leak detection, and set DB_IDLE_IN_TRANSACTION_TIMEOUT "
                   f"(e.g. {IDLE_IN_TX_TIMEOUT_S:g} s) so the server ends such sessions.")
        changes = {"idle_in_transaction_timeout": IDLE_IN_TX_TIMEOUT_S}
    else:
        action += "enable leak detection to see the stack that took the connection."
    return [Finding(
        Severity.CRITICAL if count >= IDLE_IN_TX_CRITICAL * capacity else Severity.WARNING,
        "idle_in_transaction",
        f"{count} sessions are idle in a transaction: each holds a connection and its locks "
        "while doing nothing — a leak, or work done between queries inside a transaction.",
        {"idle_in_transaction": count, "capacity": capacity}, action, changes)]
