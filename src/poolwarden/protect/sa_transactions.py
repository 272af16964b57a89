"""Retryable transactions on the SQLAlchemy path: :func:`run_session`.

The same contract as :func:`~poolwarden.protect.transactions.run_transaction`, around an
``AsyncSession``: each attempt opens a session, runs the work, flushes, and commits;
failures are retried only when that is safe, and a connection lost with ``COMMIT`` in
flight raises :class:`~poolwarden.errors.CommitOutcomeUnknown`.

SQLAlchemy wraps asyncpg's errors twice: its asyncpg adapter raises a DBAPI-style error
``from`` the asyncpg one, and SQLAlchemy raises a ``DBAPIError`` whose ``orig`` is the
adapter's error. :func:`driver_error` unwraps both (errors asyncpg raises that are not its
own, such as ``TimeoutError``, come through unwrapped). The pending ORM changes are flushed
before the statement count is read, so the count tells whether ``COMMIT`` itself went out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..errors import CommitOutcomeUnknown
from ..pool._driver import statements_sent
from ..sqlalchemy import CorePool
from .retry import RetryPolicy, call_with_retry
from .transactions import (
    DEFAULT_RETRY,
    AttemptOutcome,
    commit_outcome_unknown,
    connection_lost,
    sent_since,
)

__all__ = ["driver_error", "run_session"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_WRAPPERS = 8  # SQLAlchemy wraps twice; more means a loop, not a chain


def driver_error(exc: BaseException) -> BaseException:
    """The error under SQLAlchemy's wrappers (asyncpg's, usually); ``exc`` if unwrapped."""
    current = exc
    for _ in range(_MAX_WRAPPERS):
        if not type(current).__module__.startswith("sqlalchemy"):
            break
        inner = current.orig if isinstance(current, DBAPIError) else current.__cause__
        if inner is None:
            break
        current = inner
    return current


async def run_session(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    policy: RetryPolicy | None = DEFAULT_RETRY,
    isolation: str | None = None,
    readonly: bool = False,
    deferrable: bool = False,
) -> T:
    """Run ``await work(session)`` in a new session, flush and commit, and return its
    result; retry with a new session under ``policy`` when that is safe.

    ``work`` may run several times: it must act only through ``session`` (objects it adds
    or loads belong to that attempt's session), have no other side effects, and not commit
    or roll back itself. ``isolation`` (``'SERIALIZABLE'`` or ``'serializable'``,
    ``'REPEATABLE READ'``, ...), ``readonly`` and ``deferrable`` set the transaction's
    characteristics. ``policy=None``: a single attempt.

    Raises :class:`~poolwarden.errors.CommitOutcomeUnknown` (never retried) when the
    connection was lost with ``COMMIT`` in flight (for ``readonly``: retried instead);
    otherwise the last attempt's error as SQLAlchemy raised it. Any error other than
    ``CommitOutcomeUnknown`` means nothing was committed.
    """
    outcome = AttemptOutcome()
    options = _execution_options(isolation, readonly, deferrable) or None

    async def attempt() -> T:
        outcome.reset()
        session = sessions()
        conn: Any = None
        try:
            conn = await _driver_connection(session, options)
            result = await work(session)
            await session.flush()
            conn = await _driver_connection(session, None)
            await _commit(session, conn, outcome)
        except Exception as exc:
            cause = driver_error(exc)
            outcome.connection_lost = connection_lost(cause, conn)
            if outcome.unknown(cause, read_only=readonly):
                raise _unknown(cause, session) from cause
            raise
        finally:
            await _close_quietly(session)
        return result

    return await call_with_retry(
        attempt, policy,
        retry_if=lambda exc: outcome.retryable(driver_error(exc), read_only=readonly),
    )


async def _commit(session: AsyncSession, conn: Any, outcome: AttemptOutcome) -> None:
    """Commit what the work left (already flushed: the only statement now is ``COMMIT``),
    noting whether ``COMMIT`` went out if it fails."""
    before = statements_sent(conn)
    try:
        await session.commit()
    except Exception:
        outcome.commit_sent = sent_since(conn, before)
        raise


async def _driver_connection(session: AsyncSession, options: dict[str, Any] | None) -> Any:
    """The asyncpg connection under ``session`` (checked out and in a transaction now)."""
    connection = await session.connection(execution_options=options)
    raw = await connection.get_raw_connection()
    return raw.driver_connection


def _execution_options(isolation: str | None, readonly: bool, deferrable: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if isolation is not None:
        options["isolation_level"] = isolation.replace("_", " ").upper()
    if readonly:
        options["postgresql_readonly"] = True
    if deferrable:
        options["postgresql_deferrable"] = True
    return options


def _unknown(cause: BaseException, session: AsyncSession) -> CommitOutcomeUnknown:
    engine = getattr(session.bind, "sync_engine", session.bind)
    pool = getattr(engine, "pool", None)
    node = pool.core.name if isinstance(pool, CorePool) else "sqlalchemy"
    return commit_outcome_unknown(cause, node=node)


async def _close_quietly(session: AsyncSession) -> None:
    """Close the session (rolling back what is left) without hiding the attempt's own
    error; its connection goes back to the core, which discards it if it is dead."""
    try:
        await session.close()
    except Exception:
        logger.warning("poolwarden: closing a session after a transaction attempt failed",
                       exc_info=True)
