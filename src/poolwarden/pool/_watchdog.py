"""``command_timeout`` without a timer per statement.

asyncpg bounds a statement by arming ``loop.call_later(command_timeout, …)`` when it is
sent and cancelling the timer when the answer comes. Measured here (SELECT 1, ten tasks
each owning a connection): that timer is ~2 µs of client CPU per statement, about a tenth
of the whole statement, and it is a safety net that almost never fires.

So the pool enforces ``command_timeout`` the way a coarse timer wheel would: for
statements sent through asyncpg's ``Connection._execute`` (``fetch``, ``fetchrow``,
``fetchval``, ``fetchmany``, ``execute`` with arguments — the hot path), the connection
reports no timeout to asyncpg (see :func:`~poolwarden.pool._driver.bind_deadline`; a
statement given an explicit ``timeout=`` keeps it and is left alone), and this watchdog,
run every ``command_timeout / 10`` (between 20 ms and 1 s), looks at the checked-out
connections instead. A connection inside such a statement whose protocol has sent nothing
new (``queries_count`` unchanged) since the statement was first seen has been busy that
long: past ``command_timeout`` the pool sends a CancelRequest (asyncpg's own cancel,
bounded by ``command_timeout``; the connection stays usable), and past twice that — the
server did not answer the cancel: blackholed, hung — it terminates the connection. Either
way the caller gets :class:`~poolwarden.errors.StatementTimeout` (a ``TimeoutError``)
through ``pool.connection()``.

The SQLAlchemy dialect puts its own statements under the watchdog the same way: each
cursor call (``BEGIN``, the prepare, the prepared statement) and each ``COMMIT`` and
``ROLLBACK`` (:meth:`~poolwarden.pool._driver.StatementSection.watch_outside`) — three
timers per checkout saved, and the SQLAlchemy caller gets the same
:class:`~poolwarden.errors.StatementTimeout`.

Precision: a statement is stopped between ``command_timeout`` and ``command_timeout`` plus
two intervals after it started (within 20% for timeouts of 10 ms..10 s, up to 2 s late for
longer ones). Statements with a deadline keep asyncpg's exact timer (cut to the deadline),
and so do all other statements (on the raw path ``execute`` without arguments, prepared
statements, ``copy_*``, cursors; rows a SQLAlchemy server-side cursor fetches later).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from ._record import ConnState

if TYPE_CHECKING:
    from ._record import Record

__all__ = ["Action", "StatementWatchdog"]

MIN_INTERVAL_S = 0.02
MAX_INTERVAL_S = 1.0

Action = Literal["cancel", "terminate"]

# Record.stmt_stage values
_WATCHING, _CANCELLED, _TERMINATED = 0, 1, 2


class StatementWatchdog:
    """Which checked-out connections run a statement past ``timeout_s``, and what to do.

    :meth:`scan` is the whole decision; the pool calls it every :attr:`interval_s` and
    carries out the actions it returns. State lives on each :class:`Record`
    (``stmt_mark``: the protocol's query count when the statement was first seen, -1 when
    none runs; ``stmt_since``; ``stmt_stage``).
    """

    __slots__ = ("interval_s", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, timeout_s / 10))

    def scan(self, records: Iterable[Record], now: float) -> list[tuple[Record, Action, float]]:
        """``(record, action, running_s)`` for every statement due for an action now; each
        statement gets a cancel once, then (if still running) a terminate once."""
        due: list[tuple[Record, Action, float]] = []
        for record in records:
            if record.state is not ConnState.IN_USE:
                continue
            conn = record.conn
            if not conn._stmt_exclusive_section.busy:
                record.stmt_mark = -1  # no statement running that relies on the watchdog
                continue
            count = conn._protocol.queries_count
            if count != record.stmt_mark:  # a new statement (or a new step of one)
                record.stmt_mark, record.stmt_since, record.stmt_stage = count, now, _WATCHING
                continue
            running = now - record.stmt_since
            if record.stmt_stage == _WATCHING and running >= self.timeout_s:
                record.stmt_stage = _CANCELLED
                due.append((record, "cancel", running))
            elif record.stmt_stage == _CANCELLED and running >= 2 * self.timeout_s:
                record.stmt_stage = _TERMINATED
                due.append((record, "terminate", running))
        return due

    def __repr__(self) -> str:
        return f"<StatementWatchdog timeout_s={self.timeout_s} interval_s={self.interval_s}>"
