"""The facade applications use: ``Database``.

One ``Database`` owns one pool per database node and, on demand, a SQLAlchemy engine on the
primary's pool. Today it has one node, the primary; the node is chosen in one place
(:meth:`Database._node`) so that a router for replicas and named databases can be put
behind it without changing this API.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .advisor import Finding, advise
from .deadline import deadline, remaining
from .errors import PoolClosed
from .health import HealthMonitor, HealthReport, check_nodes
from .pool import Checkout, Pool, PoolConfig, PooledConnection, PoolStats
from .protect.retry import RetryPolicy
from .protect.transactions import DEFAULT_RETRY, run_transaction
from .server_view import BudgetReport, ServerActivity, connection_budget, server_activity
from .settings import DatabaseSettings

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

PRIMARY = "primary"
T = TypeVar("T")


def _statement_timeout_ms(configured_s: float | None) -> int | None:
    """The server-side ``statement_timeout`` (ms) that keeps a transaction within the
    caller's deadline, or ``None`` when no deadline is set or the configured
    ``statement_timeout`` (seconds) is already shorter."""
    left = remaining()
    if left is None or (configured_s and configured_s <= left):
        return None
    # Rounded up: the server's timer must not fire before the deadline (the client's own
    # timeout, set for the deadline, then reports it as DeadlineExceeded).
    return max(1, math.ceil(left * 1000))


class Database:
    """PostgreSQL for an asyncio service: pools, SQLAlchemy sessions, stats.

    ``async with Database.from_env() as db:`` opens the pools (warmed to their minimum)
    and closes them, draining in-flight work, on exit. All methods raise the errors of
    :mod:`poolwarden.errors` for pool trouble and asyncpg's own errors for SQL errors.
    """

    def __init__(
        self,
        settings: DatabaseSettings | PoolConfig,
        *,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(settings, DatabaseSettings):
            self.settings: DatabaseSettings | None = settings
            config = settings.pool_config(PRIMARY)
            echo = settings.echo
        else:
            self.settings = None
            config = settings
            echo = False
        self._pools: dict[str, Pool] = {config.name: Pool(config)}
        self._primary = self._pools[config.name]
        self._engine_options: dict[str, Any] = {"echo": echo, **(engine_options or {})}
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Database:
        """Build from ``DATABASE_URL`` and the ``DB_*`` variables (or ``env`` when given).

        Raises :class:`~poolwarden.errors.ConfigurationError` naming every invalid variable.
        """
        return cls(DatabaseSettings.from_env(env, **overrides))

    @classmethod
    def from_url(cls, url: str, **pool_options: Any) -> Database:
        """Build from a URL and :class:`PoolConfig` options (``pool_size=...`` etc.)."""
        return cls(PoolConfig(dsn=url, **pool_options))

    # ------------------------------------------------------------------ lifecycle

    async def open(self, *, wait: bool = True) -> None:
        """Open every pool.

        ``wait=True`` (default): each pool opens its first connections now, warmed to its
        minimum, and a node that cannot be reached raises ``ConnectionFailed`` at once (fail
        fast on a wrong URL or a down server). ``wait=False``: return without waiting for
        the servers — e.g. so that a service can start while its database is still coming
        up. Connections are then opened in the background, retried with backoff until the
        server answers; work asked of the database meanwhile waits for a connection within
        its usual limits (acquire timeout, deadline) and fails as it would on a down server.
        """
        for pool in self._pools.values():
            await pool.open(wait=wait)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop admitting work, drain in-flight work up to ``timeout`` seconds, close all."""
        if self._engine is not None:
            await self._engine.dispose()
        for pool in self._pools.values():
            await pool.close(timeout)

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ raw asyncpg path

    @staticmethod
    def deadline(seconds: float, *, replace: bool = False) -> deadline:
        """``async with db.deadline(0.5):`` — bound everything the block does with the
        database (the wait for a connection, each statement, and the server's
        ``statement_timeout`` inside transactions and sessions) to ``seconds`` from now.
        Nested deadlines can only shorten the budget; ``replace=True`` puts exactly this
        one in force instead, for work that outlives its caller (see
        :mod:`poolwarden.deadline`). Expiry raises
        :class:`~poolwarden.errors.DeadlineExceeded`."""
        return deadline(seconds, replace=replace)

    def _node(self, *, read_only: bool = False) -> Pool:
        """The pool that serves this work. One node for now: the primary serves all."""
        return self._primary

    @property
    def pool(self) -> Pool:
        """The primary's pool core."""
        return self._primary

    def connection(
        self, *, timeout: float | None = None, deadline: float | None = None, reset: bool = False,
        read_only: bool = False,
    ) -> Checkout:
        """``async with db.connection() as conn:`` — an ``asyncpg.Connection`` for the block.

        See :meth:`Pool.connection` for ``timeout``, ``deadline`` and ``reset``.
        """
        return self._node(read_only=read_only).connection(
            timeout=timeout, deadline=deadline, reset=reset
        )

    @asynccontextmanager
    async def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[PooledConnection]:
        """``async with db.transaction() as conn:`` — commits when the block succeeds, rolls
        back when it raises (or is cancelled)."""
        async with self.connection(timeout=timeout, read_only=readonly) as conn, conn.transaction(
            isolation=isolation, readonly=readonly, deferrable=deferrable
        ):
            limit = _statement_timeout_ms(self._primary.config.statement_timeout)
            if limit is not None:
                await conn.execute(f"SET LOCAL statement_timeout = {limit}")
            yield conn

    async def run_transaction(
        self, work: Callable[[PooledConnection], Awaitable[T]], *,
        policy: RetryPolicy | None = DEFAULT_RETRY, isolation: str | None = None,
        readonly: bool = False, deferrable: bool = False, timeout: float | None = None,
    ) -> T:
        """Run ``await work(conn)`` in a transaction and commit; retry the whole transaction
        — only where that cannot write twice — on a serialization failure (40001), a
        deadlock (40P01), a connection lost before ``COMMIT`` was sent, or a failure to
        connect; with backoff and full jitter, within ``policy``'s attempts and the
        caller's deadline. A connection lost while ``COMMIT`` was in flight raises
        :class:`~poolwarden.errors.CommitOutcomeUnknown` and is never retried. ``work`` may
        run more than once: it must have no side effects outside the transaction.
        ``policy=None``: one attempt."""
        return await run_transaction(
            self._node(read_only=readonly), work, policy=policy, isolation=isolation,
            readonly=readonly, deferrable=deferrable, timeout=timeout,
        )

    async def run_session(
        self, work: Callable[[AsyncSession], Awaitable[T]], *,
        policy: RetryPolicy | None = DEFAULT_RETRY, isolation: str | None = None,
        readonly: bool = False, deferrable: bool = False,
    ) -> T:
        """:meth:`run_transaction` for the SQLAlchemy path: ``await work(session)`` in a
        session that commits at the end, retried under the same rules."""
        from .protect.sa_transactions import run_session

        return await run_session(
            self._session_factory(), work, policy=policy, isolation=isolation,
            readonly=readonly, deferrable=deferrable,
        )

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run one statement on a pooled connection; returns the status (e.g. ``INSERT 0 1``)."""
        async with self._primary.connection() as conn:
            result: str = await conn.execute(query, *args, timeout=timeout)
            return result

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        async with self._primary.connection() as conn:
            return list(await conn.fetch(query, *args, timeout=timeout))

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        async with self._primary.connection() as conn:
            return await conn.fetchrow(query, *args, timeout=timeout)

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        async with self._primary.connection() as conn:
            return await conn.fetchval(query, *args, column=column, timeout=timeout)

    # ------------------------------------------------------------------ SQLAlchemy path

    @property
    def engine(self) -> AsyncEngine:
        """A SQLAlchemy ``AsyncEngine`` whose connections come from the primary's pool core
        (same limits, fairness, stats and errors as the raw path). Created on first use;
        needs the ``sqlalchemy`` extra."""
        if self._engine is None:
            from .sqlalchemy import create_async_engine_on

            self._engine = create_async_engine_on(self._primary, **self._engine_options)
        return self._engine

    @asynccontextmanager
    async def session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """``async with db.session() as session:`` — an ``AsyncSession`` that commits when
        the block succeeds and rolls back when it raises; its connection goes back to the
        pool when the block ends. ``read_only=True`` marks work that may be served by a
        replica (routing comes with the topology layer; today the primary serves it)."""
        from .sqlalchemy import session_scope

        async with session_scope(self._session_factory()) as session:
            ms = _statement_timeout_ms(self._primary.config.statement_timeout)
            if ms is not None:
                from sqlalchemy import text

                await session.execute(text(f"SET LOCAL statement_timeout = {ms}"))
            yield session

    def _session_factory(self) -> async_sessionmaker[AsyncSession]:
        if self._primary.stats().closed:
            raise PoolClosed("database is closed", node=self._primary.name)
        if self._sessions is None:
            from .sqlalchemy import session_factory

            self._sessions = session_factory(self.engine)
        return self._sessions

    # ------------------------------------------------------------------ observability

    async def health(self, timeout: float = 2.0) -> HealthReport:
        """Check every node within ``timeout`` seconds (readiness); never raises for a
        database problem: the report says what failed, without credentials."""
        return await check_nodes(self._pools, timeout=timeout)

    def health_monitor(self, *, interval: float = 5.0, timeout: float = 2.0) -> HealthMonitor:
        """A background monitor of :meth:`health` (``start()`` it, or ``async with`` it)."""
        return HealthMonitor(self, interval=interval, timeout=timeout)

    async def server_activity(
        self, *, idle_in_transaction_s: float = 30.0, long_query_s: float = 5.0,
        limit: int = 10, timeout: float = 5.0,
    ) -> ServerActivity:
        """The server's view: connections by application and state, sessions idle in a
        transaction longer than ``idle_in_transaction_s``, the longest-running queries."""
        return await server_activity(
            self._primary, idle_in_transaction_s=idle_in_transaction_s,
            long_query_s=long_query_s, limit=limit, timeout=timeout,
        )

    async def connection_budget(
        self, *, processes: int | None = None, other_connections: int = 0
    ) -> BudgetReport:
        """This pool times ``processes`` sibling workers (default ``WEB_CONCURRENCY``)
        against the server's ``max_connections`` minus its reserved slots."""
        return await connection_budget(
            self._primary, processes=processes, other_connections=other_connections
        )

    def advise(self, previous: Mapping[str, PoolStats] | None = None) -> dict[str, list[Finding]]:
        """The advisor's findings for every node, from its settings and live stats (over the
        interval since ``previous``, a former :meth:`stats`, when given); most severe first."""
        previous = previous or {}
        return {
            name: advise(pool.config, pool.stats(), previous.get(name))
            for name, pool in self._pools.items()
        }

    def stats(self) -> dict[str, PoolStats]:
        """A stats snapshot of every node's pool, by node name."""
        return {name: pool.stats() for name, pool in self._pools.items()}

    def __repr__(self) -> str:
        nodes = ", ".join(repr(pool) for pool in self._pools.values())
        return f"<Database [{nodes}]>"
