"""Retryable transactions on the raw asyncpg path: :func:`run_transaction`.

Each attempt checks a connection out of the pool, sends ``BEGIN``, runs the caller's work
and sends ``COMMIT``. A failure is retried only when :func:`~.retry.retryable` says the
attempt changed nothing (serialization failure, deadlock, connection lost before ``COMMIT``
went out, a connect that failed). A write is never run twice after its ``COMMIT`` went
out: when the connection dies (or the client gives up waiting) with ``COMMIT`` in flight,
the caller gets :class:`~poolwarden.errors.CommitOutcomeUnknown`, chained from the driver
error, and nothing is retried.

How "``COMMIT`` went out" is known: asyncpg counts the statements its protocol has written
to the socket (``queries_count``, incremented right after the write, synchronously). The
count is read just before ``COMMIT`` and again when it fails: unchanged means ``COMMIT``
failed before being written (a closed connection, an expired deadline, another operation
in progress), so nothing was committed. If asyncpg ever stops exposing the count, every
failed ``COMMIT`` counts as sent: an unknown outcome is reported rather than risking a
second write. A ``COMMIT`` that the server answered with an error (a serialization
failure, a deferred constraint) was rolled back: that is a known outcome, not an unknown one.

Cancellation is not translated: a task cancelled while ``COMMIT`` is in flight gets its
``CancelledError`` (the outcome is unknown then too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from ..errors import CommitOutcomeUnknown
from ..pool._driver import is_connection_lost, statements_sent
from .retry import RetryPolicy, call_with_retry, retryable

if TYPE_CHECKING:
    from ..pool import Pool, PooledConnection

__all__ = ["DEFAULT_RETRY", "run_transaction"]

T = TypeVar("T")

DEFAULT_RETRY = RetryPolicy()
"""3 attempts, backoff window 50 ms doubling up to 1 s, full jitter."""


@dataclass(slots=True)
class AttemptOutcome:
    """How far the latest attempt got: whether its ``COMMIT`` went out, whether its
    connection died. Read by the retry classifier after each failed attempt."""

    commit_sent: bool = False
    connection_lost: bool = False

    def reset(self) -> None:
        self.commit_sent = False
        self.connection_lost = False

    def retryable(self, exc: BaseException, *, read_only: bool) -> bool:
        return retryable(exc, read_only=read_only, commit_sent=self.commit_sent,
                         connection_lost=self.connection_lost)

    def unknown(self, exc: BaseException, *, read_only: bool) -> bool:
        """``COMMIT`` of a writing transaction went out and no answer from the server came
        back: the transaction may or may not have committed."""
        return self.commit_sent and not read_only and not server_answered(exc)


def server_answered(exc: BaseException) -> bool:
    """The server replied with an error (it did not just go away): the statement failed
    and, for ``COMMIT``, the transaction was rolled back. Looks through one translation by
    the pool (a ``DeadlineExceeded`` caused by the server's statement timeout)."""
    return any(isinstance(error, asyncpg.PostgresError) and not is_connection_lost(error)
               for error in (exc, exc.__cause__))


def connection_lost(exc: BaseException, conn: Any) -> bool:
    """``exc`` means the connection is gone: a connection-loss error, or asyncpg's "the
    connection is closed" (raised before sending, when the socket died between statements)."""
    if is_connection_lost(exc):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and conn is not None and conn.is_closed()


def sent_since(conn: Any, before: int | None) -> bool:
    """Whether a statement went out on ``conn`` since ``before`` (when unknown: yes)."""
    after = statements_sent(conn)
    return before is None or after is None or after != before


def commit_outcome_unknown(exc: BaseException, *, node: str) -> CommitOutcomeUnknown:
    return CommitOutcomeUnknown(
        f"COMMIT was sent but no answer came back ({type(exc).__name__}): the transaction "
        "may or may not have committed; check before doing the work again",
        node=node, state=None,
    )


async def run_transaction(
    pool: Pool,
    work: Callable[[PooledConnection], Awaitable[T]],
    *,
    policy: RetryPolicy | None = DEFAULT_RETRY,
    isolation: str | None = None,
    readonly: bool = False,
    deferrable: bool = False,
    timeout: float | None = None,
) -> T:
    """Run ``await work(conn)`` in a transaction on a connection from ``pool``, commit, and
    return its result; retry the whole transaction under ``policy`` when that is safe.

    ``work`` may run several times: it must do everything through ``conn``, inside the
    transaction, and have no other side effects (no messages sent, no files written, no
    state kept between runs); it must not commit or roll back itself. ``isolation``
    (``'serializable'``, ``'repeatable_read'``, ...), ``readonly`` and ``deferrable`` are
    asyncpg's transaction options; ``timeout`` bounds each wait for a connection (the
    caller's deadline, :func:`poolwarden.deadline`, bounds the waits, every statement and
    the retries).
    ``policy=None``: a single attempt.

    Raises :class:`~poolwarden.errors.CommitOutcomeUnknown` (never retried) when the
    connection was lost with ``COMMIT`` in flight, or the deadline or ``command_timeout``
    ran out while ``COMMIT`` was in flight (the pool's ``DeadlineExceeded`` is then the
    cause); for a ``readonly`` transaction a lost connection is retried instead, nothing
    having been written. Otherwise raises the last attempt's
    error unchanged: pool errors (``PoolTimeout``, ``PoolExhausted``...), asyncpg's errors,
    or ``work``'s own. Any error other than ``CommitOutcomeUnknown`` means nothing was
    committed. A connection that died is discarded by the pool.
    """
    outcome = AttemptOutcome()

    async def attempt() -> T:
        outcome.reset()
        conn: PooledConnection | None = None
        try:
            # The block sees the driver's error as it is, so the pool discards a dead
            # connection; the error is translated only once the connection is given back.
            async with pool.connection(timeout=timeout) as conn:
                tx = conn.transaction(isolation=isolation, readonly=readonly,
                                      deferrable=deferrable)
                await tx.start()
                try:
                    result = await work(conn)
                except Exception:
                    if not conn.is_closed():
                        # On failure the pool rolls back or discards it at release.
                        with contextlib.suppress(Exception):
                            await tx.rollback()
                    raise
                before = statements_sent(conn)
                try:
                    await tx.commit()
                except Exception:
                    outcome.commit_sent = sent_since(conn, before)
                    raise
                return result
        except Exception as exc:
            outcome.connection_lost = connection_lost(exc, conn)
            if outcome.unknown(exc, read_only=readonly):
                raise commit_outcome_unknown(exc, node=pool.name) from exc
            raise

    return await call_with_retry(
        attempt, policy, retry_if=lambda exc: outcome.retryable(exc, read_only=readonly)
    )
