"""The waiters' queue: a caller who cannot be served at once joins it (FIFO), leaves it
when served, cancelled or out of time. One timer serves every waiter, set for the earliest
deadline among them (a timer per waiter would cost µs on the hot path)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from .. import events as ev
from ..errors import DeadlineExceeded, PoolExhausted, PoolTimeout
from ._base import NEVER, PoolBase
from ._waiter import Waiter

__all__ = ["WaitQueue"]

_monotonic = time.monotonic
_Future = asyncio.Future


class WaitQueue(PoolBase):
    """The pool's part that queues, expires and forgets waiters."""

    def _enqueue(
        self, now: float, timeout: float | None, deadline: float | None, block: Waiter | None
    ) -> Waiter:
        """Queue a caller who cannot be served at once (the wait's first half): its
        ``block`` (``async with pool.connection()``), else a new waiter. Refused here when
        the queue is full or admission says the wait would be too long."""
        waiting = len(self._waiters)
        if waiting >= self._max_waiting:
            self._refusals += 1
            retry = self.retry_after()
            self.events.emit(ev.Refused(node=self.name, reason="queue_full",
                                        waiting=waiting, retry_after_s=retry))
            raise PoolExhausted(
                f"{waiting} callers already waiting (max_waiting={self._max_waiting})",
                node=self.name, state=self._state(), retry_after_s=retry,
            )
        limit = now + (self._acquire_timeout if timeout is None else timeout)
        why = "acquire_timeout"
        if deadline is not None and deadline < limit:
            limit, why = deadline, "deadline"
        admission = self._admission
        if admission is not None:
            budget = limit - now
            retry_after = admission.admit(waiting, self._limit, budget, now)
            if retry_after is not None:
                raise self._shed_now(waiting, retry_after, admission.expected_wait(
                    waiting, self._limit))
            cap = now + admission.max_wait(budget)
            if cap < limit:
                limit, why = cap, "shed"
        waiter = Waiter() if block is None else block
        waiter.future = _Future(loop=self._loop)  # (loop.create_future() without its frame)
        waiter.since = now
        waiter.deadline = limit
        waiter.limit = why
        self._waiters.append(waiter)
        if limit < self._expiry_at:
            self._schedule_expiry(limit, now)
        if len(self._idle) + self._n_in_use + self._n_opening < self._max_size:  # (_total())
            self._grow()
        return waiter

    def _abandon(self, waiter: Waiter) -> None:
        """A waiting caller was cancelled. Served in the same loop step as it was cancelled:
        pass the connection on, not lose it."""
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self._hand_on(future.result())
        else:
            self._forget(waiter)
        self._cancelled += 1

    def _forget(self, waiter: Waiter) -> None:
        # ValueError: already popped by a handoff it refused
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _schedule_expiry(self, when: float, now: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = self._loop.call_later(when - now, self._expire_due)

    def _expire_due(self) -> None:
        """Timer callback: fail every waiter whose deadline has passed, then set the timer
        for the earliest deadline left. Served waiters are already out of the queue."""
        self._expiry = None
        self._expiry_at = NEVER
        now = _monotonic()
        due = [w for w in self._waiters if w.deadline <= now]
        for waiter in due:
            self._expire(waiter)
        if self._waiters:
            self._schedule_expiry(min(w.deadline for w in self._waiters), now)

    def _expire(self, waiter: Waiter) -> None:
        """The waiter's time is up: it leaves the queue with a PoolTimeout."""
        if waiter.future.done():
            return
        self._forget(waiter)
        now = _monotonic()
        waited = now - waiter.since
        if self._limiter is not None:
            self._limiter.on_drop(now)
        error: PoolTimeout | PoolExhausted
        if waiter.limit == "shed":  # overload admission's bound, not the caller's budget
            self._shed += 1
            error = PoolExhausted(
                f"overloaded: shed after waiting {waited * 1000:.0f} ms",
                node=self.name, state=self._state(), retry_after_s=self.retry_after(),
            )
        else:
            self._timeouts += 1
            if waiter.limit == "deadline":
                error = DeadlineExceeded("deadline passed while waiting for a connection",
                                         node=self.name, state=self._state(), waited_s=waited)
            else:
                error = PoolTimeout("no connection available", node=self.name,
                                    state=self._state(), waited_s=waited)
        self._emit_timeout(waited, waiter.limit)
        error.__cause__ = self._last_error
        waiter.future.set_exception(error)
