"""``async with pool.connection() as conn``: the block that acquires and releases.

No coroutine of its own on the way in or out: ``__aenter__`` returns the pool's acquiring
coroutine, which stores the connection on the block, and ``__aexit__`` gives the connection
back synchronously (only a rollback or reset is awaited).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from ..deadline import current_deadline
from ..errors import DeadlineExceeded, StatementTimeout
from . import _driver
from ._driver import PooledConnection
from ._record import CloseReason, ConnState, Record
from ._waiter import Waiter

if TYPE_CHECKING:
    from types import TracebackType

    from .core import Pool

__all__ = ["Checkout", "stopped_statement_error"]

_monotonic = time.monotonic
_IN_USE = ConnState.IN_USE


class Checkout(Waiter):
    """The async context manager returned by :meth:`Pool.connection`; when it must wait,
    it is itself the pool's :class:`Waiter` (no object of its own per wait)."""

    __slots__ = ("_conn", "_deadline", "_pool", "_reset", "_timeout")

    def __init__(
        self, pool: Pool, timeout: float | None, deadline: float | None, reset: bool
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._deadline = deadline
        self._reset = reset
        self._conn: PooledConnection | None = None

    def __aenter__(self) -> Coroutine[Any, Any, PooledConnection]:
        # the acquiring coroutine itself, which stores the connection here: no frame of ours
        return self._pool._acquire(self._timeout, self._deadline, self)

    def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        conn, self._conn = self._conn, None
        if conn is None:
            return self._pool._released()
        if e is None:  # (no coroutine of ours on the way out either)
            return self._pool._give_back(conn, self._reset, False)
        return self._exit_with(conn, e)

    async def _exit_with(self, conn: PooledConnection, e: BaseException) -> None:
        """The block raised ``e``: release (or discard) the connection, and say what
        happened with a typed error where a statement ran out of time."""
        record = conn._pw_record
        if record is not None and record.timed_out:
            await self._stopped(conn, record, e)
        if _driver.is_connection_lost(e):
            record = self._pool._checked_out(conn)
            if record is not None:
                self._pool._close_held(record, CloseReason.ERROR)
            return
        held = _monotonic() - record.acquired_at if record is not None else 0.0
        await self._pool.release(conn, reset=self._reset)
        if _driver.is_timeout(e):
            at = current_deadline()
            if at is not None and _monotonic() >= at:
                pool = self._pool
                raise DeadlineExceeded(
                    "deadline passed while a statement ran (it was cancelled)",
                    node=pool.name, state=pool._state(), waited_s=held,
                ) from e

    async def _stopped(self, conn: PooledConnection, record: Record, e: BaseException) -> None:
        """The watchdog stopped a statement of this block: say so with a typed error."""
        error = stopped_statement_error(record)
        if record.state is _IN_USE:
            await self._pool.release(conn, discard=True)
        raise error from e


def stopped_statement_error(record: Record) -> StatementTimeout:
    """What the holder of ``record`` gets when the watchdog stopped its statement."""
    pool = cast("Pool", record.pool)
    return StatementTimeout(
        f"a statement ran longer than command_timeout ({pool.config.command_timeout} s) "
        "and was stopped", node=pool.name, state=pool._state(),
        running_s=_monotonic() - record.stmt_since,
    )
