"""Background upkeep, run by the pool's periodic tasks: closing idle connections past their
lifetime or idle too long, refilling to ``min_size``, reporting suspected leaks, and
stopping statements that run past ``command_timeout`` (the statement watchdog)."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable

from .. import events as ev
from ._base import IN_USE, PoolBase, server_pid
from ._leaks import format_stack
from ._record import CloseReason, Record

__all__ = ["Upkeep", "periodically"]

_monotonic = time.monotonic


class Upkeep(PoolBase):
    """The pool's part that keeps it healthy between uses."""

    def maintain(self) -> None:
        """One maintenance pass (the background task calls it every interval): close idle
        connections past their lifetime, or idle too long above ``min_size``; refill to
        ``min_size``."""
        if self._closing:
            return
        now = _monotonic()
        keep: deque[Record] = deque()
        total = self._total()
        for record in self._idle:  # oldest-used first
            reason = self._stale_reason(record) if now >= record.expires_at else None
            if reason is None and now - record.idle_since > self._config.idle_timeout and (
                total > self._min_size
            ):
                reason = CloseReason.IDLE
            if reason is None:
                keep.append(record)
            else:
                total -= 1
                self._close_record(record, reason)
        self._idle = keep
        if self._leak_threshold is not None:
            self._report_leaks(now - self._leak_threshold, now)
        self._grow()

    def check_statements(self) -> None:
        """Stop statements running past ``command_timeout`` (the background task calls it
        every ``command_timeout / 10``; see :mod:`._watchdog`)."""
        if self._watchdog is None:
            return
        for record, action, running in self._watchdog.scan(self._records, _monotonic()):
            record.timed_out = True
            conn = record.conn
            self.events.emit(ev.StatementStopped(
                node=self.name, pid=server_pid(record), running_s=running, action=action))
            if action == "cancel":
                # asyncpg's own CancelRequest (a new connection, bounded by command_timeout;
                # if it fails, asyncpg terminates the connection)
                conn._cancel_current_command(self._loop.create_future())
            else:
                conn.terminate()

    def _report_leaks(self, acquired_before: float, now: float) -> None:
        """One warning per checkout held since before ``acquired_before``."""
        for record in self._records:
            if (
                record.state is IN_USE
                and not record.leak_reported
                and record.acquired_at < acquired_before
            ):
                record.leak_reported = True
                self._leaks += 1
                self.events.emit(ev.LeakSuspected(
                    node=self.name, pid=server_pid(record), held_s=now - record.acquired_at,
                    stack=format_stack(record.stack, record.holder),
                ))


async def periodically(
    pool_ref: weakref.ref[Upkeep], interval: float, work: Callable[[Upkeep], None]
) -> None:
    """Background upkeep; holds only a weak reference so a forgotten pool can die."""
    while True:
        await asyncio.sleep(interval)
        pool = pool_ref()
        if pool is None or pool._closing:
            return
        work(pool)
        del pool
