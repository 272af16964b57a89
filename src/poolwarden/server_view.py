"""The server's view: who holds PostgreSQL's connections, and whether our pools fit in them.

:func:`server_activity` reads ``pg_stat_activity`` and the connection settings through a
pool: max_connections and the reserved slots, connections by application and state,
sessions idle in a transaction for too long (the usual cause of "pool exhausted" pages), and
the longest-running queries. The role needs ``pg_monitor`` (or superuser) to see other
users' sessions; without it their state and query come back empty.

:func:`budget_check` judges the connection budget without I/O (every process's pool at its
maximum, plus other clients, against the slots a non-superuser may use), over the budget
arithmetic and checks of :mod:`poolwarden.sizing`; :func:`connection_budget` feeds it the
server's numbers.

**Query text**: ``pg_stat_activity.query`` is the statement as sent, so it may contain
literal values (personal data, tokens). Reports carry at most :data:`QUERY_CHARS`
characters of it, with ``PASSWORD '...'`` literals masked; do not log them where such data
must not go.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from .pool import Pool, PooledConnection
from .sizing import SizingError, budget_problems, service_budget

__all__ = [
    "ActivityGroup",
    "BudgetReport",
    "ServerActivity",
    "SessionInfo",
    "budget_check",
    "connection_budget",
    "processes_from_env",
    "server_activity",
]

QUERY_CHARS = 200
DEFAULT_TIMEOUT_S = 5.0
PROCESSES_ENV = "WEB_CONCURRENCY"
# PASSWORD 'secret' in CREATE/ALTER ROLE statements, with '' escapes inside the literal.
_PASSWORD_LITERAL = re.compile(r"(\bpassword\s+)'(?:[^']|'')*'?", re.IGNORECASE)

# Only client backends take max_connections slots (autovacuum, WAL senders and background
# workers have their own), so every count below is over client backends.
_SETTINGS_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       current_setting('reserved_connections', true)::int AS reserved,  -- PG 16+, else NULL
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend')::int AS total
"""
_GROUPS_SQL = """
SELECT coalesce(application_name, '') AS application_name, state, count(*)::int AS connections
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
 GROUP BY 1, 2
 ORDER BY 3 DESC, 1, 2
"""
_SESSION_COLUMNS = """
SELECT pid, coalesce(application_name, '') AS application_name, usename, state,
       extract(epoch FROM now() - {since})::float8 AS duration_s,
       extract(epoch FROM now() - xact_start)::float8 AS transaction_s,
       left(query, {chars}) AS query
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
_IDLE_IN_TRANSACTION_SQL = (
    _SESSION_COLUMNS.format(since="state_change", chars=QUERY_CHARS)
    + """   AND state IN ('idle in transaction', 'idle in transaction (aborted)')
   AND now() - state_change > make_interval(secs => $1)
 ORDER BY state_change
 LIMIT $2
"""
)
_LONG_QUERIES_SQL = (
    _SESSION_COLUMNS.format(since="query_start", chars=QUERY_CHARS)
    + """   AND state = 'active'
   AND now() - query_start > make_interval(secs => $1)
 ORDER BY query_start
 LIMIT $2
"""
)


@dataclass(frozen=True, slots=True)
class ActivityGroup:
    """Client connections with one application_name in one state (``state`` is ``None``
    when the role may not see it)."""

    application_name: str
    state: str | None
    connections: int


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One server session. ``duration_s`` is the time in its current state (idle in
    transaction) or since its query started (active); ``transaction_s`` the age of its open
    transaction (``None`` outside one). ``query`` is truncated to :data:`QUERY_CHARS`
    characters and may contain literal values (see the module docstring)."""

    pid: int
    application_name: str
    usename: str | None
    state: str | None
    duration_s: float
    transaction_s: float | None
    query: str


@dataclass(frozen=True, slots=True)
class ServerActivity:
    """A snapshot of the server's connections, taken in one transaction (consistent).

    ``total_connections`` counts every client backend, the session that took the snapshot
    included (it holds a slot); ``by_application``, ``idle_in_transaction`` and
    ``longest_queries`` leave that session out. ``reserved_connections`` is ``None`` before
    PostgreSQL 16. ``headroom`` = max_connections - reserved slots - total: how many more
    connections a non-superuser role can open now (negative when superusers use reserved
    slots).
    """

    node: str
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int | None
    total_connections: int
    by_application: tuple[ActivityGroup, ...]
    idle_in_transaction: tuple[SessionInfo, ...]
    longest_queries: tuple[SessionInfo, ...]
    checked_at: datetime

    @property
    def reserved(self) -> int:
        """All slots a non-superuser role cannot use."""
        return self.superuser_reserved_connections + (self.reserved_connections or 0)

    @property
    def headroom(self) -> int:
        return self.max_connections - self.reserved - self.total_connections

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checked_at"] = self.checked_at.isoformat()
        out["headroom"] = self.headroom
        return out


async def server_activity(
    pool: Pool,
    *,
    idle_in_transaction_s: float = 30.0,
    long_query_s: float = 5.0,
    limit: int = 10,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> ServerActivity:
    """Read the server's connection picture through ``pool`` (one connection, one read-only
    transaction, four queries).

    Lists at most ``limit`` sessions idle in a transaction for more than
    ``idle_in_transaction_s`` seconds (oldest first) and at most ``limit`` active queries
    running for more than ``long_query_s`` seconds (longest first). ``timeout`` bounds the
    wait for a connection and each query. Raises the pool's errors (``PoolTimeout``...) and
    the driver's (``TimeoutError``, connection errors) — unlike the health check, this is a
    diagnostic that should say why it could not run.
    """
    if limit < 0 or idle_in_transaction_s < 0 or long_query_s < 0:
        raise ValueError("limit and thresholds must be >= 0")
    deadline = time.monotonic() + timeout
    async with pool.connection(deadline=deadline) as conn, conn.transaction(readonly=True):
        # One transaction: pg_stat_activity is read once per transaction, so the four
        # queries see the same snapshot and their counts agree.
        settings = await conn.fetchrow(_SETTINGS_SQL, timeout=_left(deadline))
        groups = await conn.fetch(_GROUPS_SQL, timeout=_left(deadline))
        idle = await _sessions(conn, _IDLE_IN_TRANSACTION_SQL, idle_in_transaction_s, limit,
                               deadline)
        longest = await _sessions(conn, _LONG_QUERIES_SQL, long_query_s, limit, deadline)
        checked_at = await conn.fetchval("SELECT now()", timeout=_left(deadline))
    return ServerActivity(
        node=pool.name,
        max_connections=settings["max_connections"],
        superuser_reserved_connections=settings["superuser_reserved"],
        reserved_connections=settings["reserved"],
        total_connections=settings["total"],
        by_application=tuple(
            ActivityGroup(r["application_name"], r["state"], r["connections"]) for r in groups
        ),
        idle_in_transaction=idle,
        longest_queries=longest,
        checked_at=checked_at,
    )


async def _sessions(
    conn: PooledConnection, sql: str, threshold_s: float, limit: int, deadline: float
) -> tuple[SessionInfo, ...]:
    rows = await conn.fetch(sql, threshold_s, limit, timeout=_left(deadline))
    return tuple(
        SessionInfo(
            pid=r["pid"], application_name=r["application_name"], usename=r["usename"],
            state=r["state"], duration_s=r["duration_s"], transaction_s=r["transaction_s"],
            query=mask_query(r["query"] or ""),
        )
        for r in rows
    )


def mask_query(text: str) -> str:
    """``text`` with ``PASSWORD '...'`` literals masked (CREATE/ALTER ROLE statements)."""
    return _PASSWORD_LITERAL.sub(r"\1'***'", text)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


# ---------------------------------------------------------------------- connection budget


@dataclass(frozen=True, slots=True)
class BudgetReport:
    """Whether every process's pool, at its maximum, fits in the server's usable slots.

    ``used`` = processes x pool_max_size + other_connections; ``available`` =
    max_connections - reserved; ``budget`` = :func:`~poolwarden.sizing.service_budget`
    (available - other_connections); ``spare`` = budget - processes x pool_max_size; ``ok``
    iff spare >= 0 (used <= available). An over-committed server (budget < 1) is reported
    here, not refused. :attr:`message` says it in plain words with the numbers, and what to
    change when it does not fit.

    Raises :class:`~poolwarden.sizing.SizingError` (a ``ValueError``) naming every invalid
    count (:func:`~poolwarden.sizing.budget_problems`).
    """

    max_connections: int
    reserved: int
    pool_max_size: int
    processes: int
    other_connections: int = 0

    def __post_init__(self) -> None:
        problems = budget_problems(
            self.max_connections, self.reserved, self.other_connections,
            processes=self.processes, pool_max_size=self.pool_max_size,
        )
        if problems:
            raise SizingError(problems)

    @property
    def used(self) -> int:
        return self.processes * self.pool_max_size + self.other_connections

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved

    @property
    def budget(self) -> int:
        """Slots left for this service's pools (zero or negative: other clients and reserved
        slots take them all)."""
        return service_budget(self.max_connections, self.reserved, self.other_connections)

    @property
    def spare(self) -> int:
        """Slots left when every pool is full (negative: the shortfall)."""
        return self.budget - self.processes * self.pool_max_size

    @property
    def ok(self) -> bool:
        return self.spare >= 0

    @property
    def message(self) -> str:
        workers = f"{self.processes} worker{'s' if self.processes != 1 else ''}"
        total = f"{workers} x {self.pool_max_size} connections"
        if self.other_connections:
            total += f" + {self.other_connections} other"
        where = f"(max_connections {self.max_connections} - {self.reserved} reserved)"
        if self.ok:
            return (
                f"{total} = {self.used} <= {self.available} available {where}; "
                f"{self.spare} to spare"
            )
        return f"{total} = {self.used} > {self.available} available {where}: " + ", ".join(
            self._fixes()
        )

    def _fixes(self) -> list[str]:
        fixes = []
        room = self.budget
        per_worker = room // self.processes if room > 0 else 0
        if per_worker >= 1:
            fixes.append(f"lower pool_size + max_overflow to at most {per_worker} per worker")
        if self.pool_max_size and room >= self.pool_max_size:
            fixes.append(f"run at most {room // self.pool_max_size} workers")
        fixes.append(f"raise max_connections to at least {self.used + self.reserved}")
        fixes.append("or put PgBouncer in front")
        return fixes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, used=self.used, available=self.available, budget=self.budget,
                   spare=self.spare, message=self.message)
        return out


def budget_check(
    max_connections: int,
    reserved: int,
    pool_max_size: int,
    processes: int,
    other_connections: int = 0,
) -> BudgetReport:
    """The connection budget, without I/O: a :class:`BudgetReport`, with ``ok=False`` when the
    pools do not fit — even when reserved slots and other clients leave nothing at all, which
    :class:`~poolwarden.sizing.ServerBudget` refuses. Raises
    :class:`~poolwarden.sizing.SizingError` (a ``ValueError``) naming every invalid count:
    not a whole number, negative, or fewer than one process or one max_connection."""
    return BudgetReport(max_connections, reserved, pool_max_size, processes, other_connections)


def processes_from_env(env: Mapping[str, str] | None = None) -> int:
    """Sibling processes sharing the server: ``WEB_CONCURRENCY`` (gunicorn/uvicorn), else 1.

    Raises ``ValueError`` naming the variable when it is set but not a positive integer."""
    raw = (os.environ if env is None else env).get(PROCESSES_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{PROCESSES_ENV}: must be a positive integer (got {raw!r})")
    return value


async def connection_budget(
    pool: Pool,
    *,
    processes: int | None = None,
    other_connections: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> BudgetReport:
    """:func:`budget_check` for ``pool``'s maximum size (pool_size + max_overflow) against
    the server's max_connections and reserved slots, for ``processes`` processes each
    running this pool (default :func:`processes_from_env`). Raises the pool's and the
    driver's errors when the server cannot be read."""
    count = processes_from_env() if processes is None else processes
    async with pool.connection(timeout=timeout) as conn:
        row = await conn.fetchrow(_SETTINGS_SQL, timeout=timeout)
    reserved = row["superuser_reserved"] + (row["reserved"] or 0)
    return budget_check(row["max_connections"], reserved, pool.config.max_size, count,
                        other_connections)
