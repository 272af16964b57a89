"""The pool core: one fair pool of asyncpg connections for one database node.

Shape (after httpcore and psycopg_pool): every decision — who gets a released connection,
whether to open another, whether a connection may be reused — is synchronous code that runs
without awaiting, so it is atomic on the event loop; the I/O it calls for (connect, ping,
rollback, close) runs afterwards, in tasks the pool tracks. The acquire and release fast
paths do no I/O at all.

Fairness: a caller that cannot be served at once joins a FIFO queue of :class:`Waiter`;
a released or newly opened connection goes straight to the oldest live waiter (direct
handoff), so a newcomer can never overtake someone already waiting.

This module is the centre: open and close, acquire, release and the handoff. The pool's
other parts (its queue, opening connections, protections, upkeep) are modules of their own;
:mod:`._base` lists them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import weakref
from bisect import bisect_left as _bisect_left
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import events as ev
from ..deadline import _current as _deadline_var
from ..errors import DeadlineExceeded, PoolClosed, PoolError
from . import _driver
from ._base import BREAKER_CLOSED, IDLE, IN_USE, server_pid
from ._behind import roll_back_behind
from ._checkout import Checkout
from ._driver import PooledConnection
from ._guards import Guards
from ._leaks import caller_stack, format_stack, task_on
from ._opening import Opening
from ._queue import WaitQueue
from ._record import CloseReason, ConnState, Record
from ._upkeep import Upkeep, periodically

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Pool"]

_monotonic = time.monotonic
# (module constants: no attribute lookup on the hot paths)
_IN_USE, _IDLE, _CLOSED = IN_USE, IDLE, BREAKER_CLOSED
_release_state = _driver.release_state
_CONN_CLEAN, _CONN_CLOSED = _driver.CLEAN, _driver.CLOSED


class Pool(WaitQueue, Guards, Opening, Upkeep):
    """A pool of connections to one PostgreSQL node.

    Use ``async with pool.connection() as conn:`` (``conn`` is an ``asyncpg.Connection``),
    or :meth:`acquire` / :meth:`release` in pairs. At most ``pool_size + max_overflow``
    connections exist; ``min_size`` are kept open; overflow connections are closed as soon
    as they go idle.
    """

    async def open(self, *, wait: bool = True) -> None:
        """Start the pool and warm it to ``min_size`` (at least one connection).

        With ``wait`` (default) the first connections are opened now and a failure raises
        :class:`ConnectionFailed` (fail fast on a wrong DSN or a down server); without it,
        warm-up happens in the background and acquirers wait for it.
        """
        if self._opened:
            return
        self._opened = True
        self._loop = asyncio.get_running_loop()
        self._admitting = True
        self._spawn(periodically(weakref.ref(self), self._config.maintenance_interval,
                                  Pool.maintain))
        if self._watchdog is not None:
            self._spawn(periodically(weakref.ref(self), self._watchdog.interval_s,
                                      Pool.check_statements))
        if not wait:
            self._grow()
            return
        try:
            for _ in range(max(1, self._min_size)):
                record = await self._connect()
                self._n_in_use += 1
                self._hand_on(record)
        except Exception as exc:
            await self.close(timeout=0)
            raise self._connection_failed(exc) from exc

    async def close(self, timeout: float = 10.0) -> None:
        """Stop admitting work, let in-flight holders finish for up to ``timeout`` seconds,
        then close every connection (terminating those still in use). Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._admitting = False
        state = self._state()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosed("pool closed", node=self.name, state=state))
        if self._expiry is not None:
            self._expiry.cancel()
        while self._idle:
            self._close_record(self._idle.popleft(), CloseReason.POOL_CLOSED)
        if self._n_in_use:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
            except TimeoutError:
                pass
        for task in list(self._workers):
            if task is not asyncio.current_task():
                task.cancel()
        now = _monotonic()
        for record in list(self._records):
            if record.state is ConnState.IN_USE:
                # Still held after the drain timeout: cut it off; a late release is ignored.
                self.events.emit(ev.HeldAtClose(
                    node=self.name, pid=server_pid(record), held_s=now - record.acquired_at,
                    stack=format_stack(record.stack, record.holder),
                ))
                record.conn.terminate()
                self._retire(record, CloseReason.POOL_CLOSED)
        pending = (self._workers | self._io) - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=max(timeout, self._config.release_timeout))
        self._closed = True

    async def __aenter__(self) -> Pool:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def resize(
        self,
        *,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        min_size: int | None = None,
    ) -> None:
        """Change the limits at runtime (validated like the configuration). Shrinking closes
        idle connections above the new size now and in-use ones as they are released."""
        changes: dict[str, Any] = {
            key: value
            for key, value in (
                ("pool_size", pool_size),
                ("max_overflow", max_overflow),
                ("min_size", min_size),
            )
            if value is not None
        }
        self._config = dataclasses.replace(self._config, **changes)
        self._apply_limits(self._config)
        while self._idle and self._total() > self._pool_size:
            self._close_record(self._idle.popleft(), CloseReason.RESIZED)
        self._grow()

    def connection(
        self, *, timeout: float | None = None, deadline: float | None = None, reset: bool = False
    ) -> Checkout:
        """``async with pool.connection() as conn:`` — acquire, then release on exit.

        ``reset=True`` asks for the full session reset on release (use it when the block
        sets session state: ``SET``, ``LISTEN``, advisory locks, temp tables). A
        connection-loss error leaving the block discards the connection.
        """
        return Checkout(self, timeout, deadline, reset)

    def acquire(
        self, *, timeout: float | None = None, deadline: float | None = None
    ) -> Coroutine[Any, Any, PooledConnection]:
        """``await pool.acquire()``: a connection for the caller's exclusive use; pair with
        :meth:`release`.

        ``timeout`` (seconds, default ``acquire_timeout``) bounds the wait; ``deadline``
        (a ``time.monotonic()`` instant) bounds it too, the earlier one wins.

        Raises :class:`PoolExhausted` at once when ``max_waiting`` callers already wait,
        :class:`PoolTimeout` when none could be had in time (also at once when the deadline
        has passed, without touching the server), :class:`PoolClosed` after :meth:`close`.

        (A plain method returning the acquiring coroutine: no coroutine frame of its own.)
        """
        return self._acquire(timeout, deadline, None)

    async def _acquire(  # noqa: PLR0912, PLR0915 - the hot path, written out on purpose
        self, timeout: float | None, deadline: float | None, block: Checkout | None
    ) -> PooledConnection:
        """:meth:`acquire`; for ``async with pool.connection()`` (``block``), the connection
        is also stored on the block, which then needs no coroutine of its own."""
        if not self._admitting:
            raise self._not_admitting()
        now = _monotonic()
        at = _deadline_var.get()
        if at is not None or deadline is not None:
            deadline = self._deadline_for(deadline, at, now)
        breaker = self._breaker
        if breaker is not None and breaker.state is not _CLOSED and not breaker.allow(now):
            raise self._circuit_open(now)
        idle = self._idle
        while idle and not self._waiters and self._n_in_use < self._limit:
            record = idle.pop()
            record.state = _IN_USE
            self._n_in_use += 1
            if now >= record.expires_at:
                self._retire(record, self._stale_reason(record))
                continue
            if record.conn.is_closed():
                # The server closed it while idle (terminated backend, restart): asyncpg saw
                # the EOF already, so this costs no round trip.
                self._connection_lost(record)
                continue
            if (
                now - record.idle_since > self._ping_window
                or record.idle_since < self._suspect_before
            ) and not await self._ping(record):
                continue
            record.acquired_at = now
            record.inflight = self._n_in_use
            self._h_wait.bucket_counts[0] += 1  # (Histogram.observe(0.0), written out)
            waited = 0.0
            break
        else:
            # The wait, written out here rather than in a coroutine of its own: one frame
            # less on the path that every caller of a busy pool takes.
            probe = breaker is not None and breaker.state is not _CLOSED  # (half-open)
            try:
                waiter = self._enqueue(now, timeout, deadline, block)
                try:
                    record = await waiter.future
                except asyncio.CancelledError:
                    self._abandon(waiter)
                    raise
            except BaseException:
                if probe and breaker is not None:  # a probe that never got one frees its slot
                    breaker.record_abandoned(_monotonic())
                raise
            # served: count the wait (Histogram.observe written out) and start the hold
            done = _monotonic()
            waited = done - now
            self._waited += 1
            wait = self._h_wait
            wait.bucket_counts[_bisect_left(wait.bounds_s, waited)] += 1
            wait.sum_s += waited
            if self._admission is not None:
                self._admission.on_served(waited, done)
            record.acquired_at = done
            record.inflight = self._n_in_use
        # Bookkeeping that is off unless asked for, written out (no call) for leak detection
        # on the hot path: the holding task and, for acquire(), the acquiring stack.
        # `async with pool.connection()` needs no stack: the holder's own stack shows the
        # block while it is held.
        if self._leak_threshold is not None:
            record.holder = task_on(self._loop)
            record.stack = None if block is not None else caller_stack(0, _OURS)
            record.leak_reported = False
        if self.events.active:
            self.events.emit(ev.Acquired(node=self.name, wait_s=waited))
        if block is not None:
            block._conn = record.conn
        return record.conn

    def _deadline_for(
        self, deadline: float | None, at: float | None, now: float
    ) -> float | None:
        """The earlier of an acquire's own deadline and the caller's (``at``); refused at
        once when it has passed, without touching the server."""
        if deadline is None or (at is not None and at < deadline):
            deadline = at
        if deadline is not None and deadline <= now:
            self._timeouts += 1
            self._emit_timeout(0.0, "deadline")
            raise DeadlineExceeded("deadline already passed", node=self.name,
                                   state=self._state(), waited_s=0.0)
        return deadline

    async def _ping(self, record: Record) -> bool:
        """Ping an idle connection before reuse; on failure it is closed and ``False``
        returned. The record counts as in use meanwhile."""
        self._pings += 1
        try:
            await _driver.ping(record.conn, self._config.connect_timeout)
        except asyncio.CancelledError:
            # The acquirer was cancelled mid-ping: the connection state is unknown.
            self._retire(record, CloseReason.PING_FAILED)
            raise
        except Exception as exc:
            self._ping_failures += 1
            self._suspect_before = _monotonic()
            self._last_error = exc
            self.events.emit(ev.PingFailed(
                node=self.name, error=_driver.describe_error(exc, self._config)))
            self._retire(record, CloseReason.PING_FAILED)
            return False
        record.idle_since = _monotonic()
        return True

    async def release(
        self, conn: PooledConnection, *, reset: bool = False, discard: bool = False
    ) -> None:
        """Give ``conn`` back. Never loses the slot, even if the caller is cancelled.

        An open or failed transaction is rolled back and a query still running is
        cancelled before reuse; with ``reset`` (or ``ResetPolicy.ALWAYS``) the full session
        reset runs too. A connection that cannot be cleaned, is past its lifetime, or is
        ``discard``-ed is closed instead. Raises :class:`PoolError` when ``conn`` is not
        checked out from this pool.
        """
        if getattr(conn, "_pw_record", None) is None:  # (not isinstance: asyncpg's
            # metaclass says any asyncpg connection is an instance of every subclass)
            raise PoolError("release of a connection that is not from this pool", node=self.name)
        await self._give_back(conn, reset, discard)

    def _give_back(
        self, conn: PooledConnection, reset: bool, discard: bool, wait: bool = True
    ) -> asyncio.Future[None]:
        """:meth:`release` without a coroutine: the connection is given back before this
        returns, and what it returns is already done unless a rollback or reset must run
        first (awaiting it waits for that, which goes on even if the caller is cancelled).
        ``async with pool.connection()`` and the SQLAlchemy path release through it; the
        latter does not ``wait``: its rollback then runs behind (:mod:`._behind`), without
        a task of its own, and the slot is handed on when it is through.
        (``conn`` is a :class:`PooledConnection`: :meth:`release` checks.)"""
        record = conn._pw_record
        if record is None or record.pool is not self or record.state is not _IN_USE:
            record = self._checked_out(conn)
            if record is None:
                return self._released()
        now = _monotonic()
        hold = now - record.acquired_at
        use = self._h_use  # (Histogram.observe, written out)
        use.bucket_counts[_bisect_left(use.bounds_s, hold)] += 1
        use.sum_s += hold
        if self._admission is not None:
            self._admission.on_hold(hold)
        if self._limiter is not None:
            self._limiter.on_sample(hold, record.inflight, now)
        if self.events.active:
            self.events.emit(ev.Released(node=self.name, hold_s=hold))
        if discard or record.timed_out:
            # (a stopped statement's CancelRequest could still hit the next user's statement)
            self._close_held(record, CloseReason.DISCARDED)
            return self._released()
        state = _release_state(conn)
        if state == _CONN_CLOSED:
            self._close_held(record, CloseReason.ERROR)
            return self._released()
        if state != _CONN_CLEAN or reset or self._always_reset:
            full = reset or self._always_reset
            if not wait and not full and state == _driver.NEEDS_ROLLBACK:
                # The caller goes on; the slot is handed on once the rollback is through.
                roll_back_behind(conn, self._config.release_timeout,
                                 functools.partial(self._restored, record))
                return self._released()
            # Shielded: if our caller is cancelled the restore still finishes and the slot
            # is still returned; the task is tracked so close() can wait for it.
            restoring = self._track(self._restore(record, full=full))
            return asyncio.shield(restoring) if wait else restoring
        breaker = self._breaker
        if now < record.expires_at and (breaker is None or breaker.state is _CLOSED):
            self._hand_on(record, now)  # (what _reuse does in the common case, inline)
        else:
            self._reuse(record, now)
        return self._done or self._released()

    def _released(self) -> asyncio.Future[None]:
        done = self._done
        if done is None:  # the first release: made once, on the pool's loop
            done = self._done = asyncio.get_running_loop().create_future()
            done.set_result(None)
        return done

    def _checked_out(self, conn: PooledConnection) -> Record | None:
        record: Record | None = getattr(conn, "_pw_record", None)
        if record is None or record.pool is not self:
            raise PoolError("release of a connection that is not from this pool", node=self.name)
        if record.state is ConnState.IN_USE:
            return record
        if record.state is ConnState.CLOSED:
            return None  # terminated by close() or retired while held: nothing to give back
        raise PoolError("connection released twice", node=self.name, state=self._state())

    def _reuse(self, record: Record, now: float) -> None:
        breaker = self._breaker
        if breaker is not None and breaker.state is not _CLOSED:
            # A probe's connection came back healthy: that closes a half-open breaker. While
            # closed the breaker counts connect attempts only (its failures are connect
            # failures), so a healthy release is not counted: no work on the hot path.
            breaker.record_success(now)
        if now < record.expires_at:
            self._hand_on(record, now)
        else:
            self._retire(record, self._stale_reason(record))

    async def _restore(self, record: Record, *, full: bool) -> None:
        try:
            await _driver.restore(record.conn, full=full, timeout=self._config.release_timeout)
        except (Exception, asyncio.CancelledError) as exc:
            self._restored(record, exc)
            return
        self._restored(record, None)

    def _restored(self, record: Record, error: BaseException | None) -> None:
        """A released connection's rollback or reset ended (``error``: how it failed): hand
        it on, or close it. Nothing to do when close() has cut it off meanwhile."""
        if record.state is not _IN_USE:
            return
        if error is None:
            self._restores += 1
            if record.timed_out:  # the watchdog's cancel could still hit the next user
                self._close_held(record, CloseReason.DISCARDED)
            else:
                self._reuse(record, _monotonic())
            return
        self._last_error = error
        lost = _driver.is_connection_lost(error) or record.conn.is_closed()
        self._close_held(record, CloseReason.ERROR if lost else CloseReason.RESET_FAILED)

    def _close_held(self, record: Record, reason: CloseReason) -> None:
        """Close a connection that came back from its holder unusable (``ERROR``: it was
        lost). While the breaker is not closed the holder may be its half-open probe, whose
        slot stays taken until an outcome is reported: a lost connection is the probe's
        failure; a discard, a stopped statement or a failed reset says nothing of the node,
        and only frees the slot (the next probe decides)."""
        breaker = self._breaker
        if breaker is not None and breaker.state is not _CLOSED:
            if reason is CloseReason.ERROR:
                breaker.record_failure(_monotonic())
            else:
                breaker.record_abandoned(_monotonic())
        if reason is CloseReason.ERROR:
            self._connection_lost(record)
        else:
            self._retire(record, reason)

    def _connection_lost(self, record: Record) -> None:
        """A checked-out connection turned out dead: retire it and make idle siblings
        prove themselves with a ping before reuse (the server may have restarted)."""
        self._suspect_before = _monotonic()
        self._retire(record, CloseReason.ERROR)

    def _hand_on(self, record: Record, now: float | None = None) -> None:
        """Give an in-use record to the oldest live waiter, else make it idle (or close it
        when it is above ``pool_size`` or the pool is closing). Synchronous: atomic."""
        waiters = self._waiters
        in_use = self._n_in_use  # (``record`` is counted in use)
        if in_use <= self._limit:
            while waiters:
                future = waiters.popleft().future  # (the waiter's offer, inline)
                if not future.done():
                    future.set_result(record)
                    return
            if self._admission is not None:
                self._admission.on_queue_empty(_monotonic() if now is None else now)
        idle = self._idle
        if self._closing or len(idle) + in_use + self._n_opening > self._pool_size:
            self._retire(record, CloseReason.POOL_CLOSED if self._closing else CloseReason.OVERFLOW)
            return
        self._n_in_use = in_use - 1
        record.state = _IDLE
        record.idle_since = _monotonic() if now is None else now
        idle.append(record)

    def _retire(self, record: Record, reason: CloseReason) -> None:
        """Close an in-use record in the background and replace it if callers need one."""
        self._n_in_use -= 1
        self._close_record(record, reason)
        if self._closing:
            if self._n_in_use == 0 and self._drained is not None:
                self._drained.set()
        else:
            self._grow()

    def __repr__(self) -> str:
        status = "closed" if self._closing else ("open" if self._opened else "new")
        return f"<Pool {self.name!r} {status} {self._state()}>"


_OURS = globals()  # the pool's own frames, skipped in an acquiring stack
