"""The pool core: one fair pool of asyncpg connections for one database node.

Shape (after httpcore and psycopg_pool): every decision — who gets a released connection,
whether to open another, whether a connection may be reused — is synchronous code that runs
without awaiting, so it is atomic on the event loop; the I/O it calls for (connect, ping,
rollback, close) runs afterwards, in tasks the pool tracks. The acquire and release fast
paths do no I/O at all.

Fairness: a caller that cannot be served at once joins a FIFO queue of :class:`Waiter`;
a released or newly opened connection goes straight to the oldest live waiter (direct
handoff), so a newcomer can never overtake someone already waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import time
import weakref
from bisect import bisect_left as _bisect_left
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .. import events as ev
from .._secrets import dsn_target
from ..deadline import _current as _deadline_var
from ..errors import (
    CircuitOpen,
    ConnectionFailed,
    DeadlineExceeded,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolState,
    PoolTimeout,
)
from ..events import EventBus
from ..protect.admission import Admission
from ..protect.breaker import BreakerState, CircuitBreaker, Transition
from ..protect.limiter import AdaptiveLimit
from . import _driver
from ._behind import roll_back_behind
from ._checkout import Checkout
from ._driver import PooledConnection
from ._leaks import caller_stack, format_stack, task_on
from ._observed import ObservedConnection, QueryObserver
from ._policy import Backoff, lifetime_deadline
from ._record import CloseReason, ConnState, Record
from ._waiter import Waiter
from ._watchdog import StatementWatchdog
from .config import PoolConfig, ResetPolicy
from .histogram import Histogram
from .stats import PoolStats

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from types import TracebackType

_monotonic = time.monotonic
_NEVER = float("inf")
# (enum members as module constants: reading ConnState.IDLE costs ~50 ns on Python 3.11)
_IN_USE, _IDLE = ConnState.IN_USE, ConnState.IDLE
_Future = asyncio.Future
# (module constants: no attribute lookup on the release path)
_release_state = _driver.release_state
_CONN_CLEAN, _CONN_CLOSED = _driver.CLEAN, _driver.CLOSED
_CLOSED = BreakerState.CLOSED


class Pool:
    """A pool of connections to one PostgreSQL node.

    Use ``async with pool.connection() as conn:`` (``conn`` is an ``asyncpg.Connection``),
    or :meth:`acquire` / :meth:`release` in pairs. At most ``pool_size + max_overflow``
    connections exist; ``min_size`` are kept open; overflow connections are closed as soon
    as they go idle.
    """

    def __init__(self, config: PoolConfig, *, events: EventBus | None = None) -> None:
        self._config = config
        #: where this pool's events go (logging and subscribed hooks)
        self.events = events if events is not None else EventBus(echo=config.echo_pool)
        self._idle: deque[Record] = deque()  # right end = most recently used (LIFO reuse)
        self._waiters: deque[Waiter] = deque()  # left end = oldest
        self._records: set[Record] = set()  # every open connection; changed on open/close only
        self._n_in_use = 0
        self._n_opening = 0
        self._opened = False
        self._closing = False
        self._admitting = False  # opened and not closing: the one flag acquire() reads
        self._closed = False
        self._drained: asyncio.Event | None = None
        # what release() returns when the connection is back at once (awaiting a done
        # future is a C call: no coroutine per release)
        self._done: asyncio.Future[None] | None = None
        # One timer for all waiters, set for the earliest deadline among them (not one timer
        # per waiter: creating and cancelling a timer per wait costs µs on the hot path).
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = _NEVER
        # Background work cancelled on close (connect attempts, maintenance) and I/O that
        # close() waits for instead (closing connections, restores that return a slot).
        self._workers: set[asyncio.Task[None]] = set()
        # The loop the pool was opened on (its connections belong to it). Kept, because
        # asyncio.get_running_loop() makes a getpid() system call on Python 3.11 (~0.13 µs),
        # too much for the paths every checkout takes.
        self._loop: asyncio.AbstractEventLoop = _NO_LOOP
        self._io: set[asyncio.Task[None]] = set()
        self._backoff = Backoff(config.reconnect_initial_delay, config.reconnect_max_delay)
        self._last_error: BaseException | None = None
        self._server_started_at = 0.0
        # Idle connections released before this instant are pinged before reuse: set when a
        # connection is found dead, since its siblings may have died with it.
        self._suspect_before = 0.0
        self._set_up_protection(config)
        self._apply_limits(config)
        # cumulative counters
        self._waited = 0
        self._timeouts = 0
        self._refusals = 0
        self._cancelled = 0
        self._created = 0
        self._connect_errors = 0
        self._closed_by: Counter[str] = Counter()
        self._pings = 0
        self._ping_failures = 0
        self._restores = 0
        self._server_restarts = 0
        self._leaks = 0
        # durations (seconds): acquire wait (its count: the acquires), hold (use), connection
        # creation, statements
        self._h_wait = Histogram()
        self._h_use = Histogram()
        self._h_create = Histogram()
        self._h_query = Histogram()
        self._shed = 0
        self._circuit_refusals = 0
        # statements are timed (histogram, slow-query log) by connections of this class
        self._observer: QueryObserver | None = None
        self._connection_class = PooledConnection
        if config.query_stats or config.slow_query_threshold is not None:
            self._observer = QueryObserver(
                node=config.name, events=self.events, histogram=self._h_query,
                slow_threshold_s=config.slow_query_threshold,
                log_params=config.log_query_params,
            )
            self._connection_class = ObservedConnection
        self._watchdog = (StatementWatchdog(config.command_timeout)
                          if config.command_timeout else None)

    def _set_up_protection(self, config: PoolConfig) -> None:
        """Admission of waiters, the circuit breaker, the adaptive concurrency limit."""
        self._admission = (
            Admission(config.admission, on_change=self._overload_changed)
            if config.admission is not None else None
        )
        self._breaker = (
            CircuitBreaker(config.breaker, on_transition=self._breaker_changed)
            if config.breaker is not None else None
        )
        self._limiter: AdaptiveLimit | None = None
        if config.limiter is not None:
            bounds = dataclasses.replace(
                config.limiter, max_limit=config.max_size,
                min_limit=min(config.limiter.min_limit, config.max_size),
                initial=min(config.limiter.initial, config.max_size),
            )
            self._limiter = AdaptiveLimit(bounds, on_change=self._limit_changed)

    def _apply_limits(self, config: PoolConfig) -> None:
        # Copied to plain attributes: the hot paths read them on every call.
        self._min_size = config.min_size
        self._pool_size = config.pool_size
        self._max_size = config.max_size
        self._max_waiting = config.max_waiting
        self._acquire_timeout = config.acquire_timeout
        self._ping_window = config.ping_after_idle if config.pre_ping else float("inf")
        self._always_reset = config.reset is ResetPolicy.ALWAYS
        self._leak_threshold = config.leak_threshold
        limiter = self._limiter
        self._limit = config.max_size if limiter is None else min(limiter.limit, config.max_size)

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> PoolConfig:
        return self._config

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
        self._spawn(_periodically(weakref.ref(self), self._config.maintenance_interval,
                                  Pool.maintain))
        if self._watchdog is not None:
            self._spawn(_periodically(weakref.ref(self), self._watchdog.interval_s,
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
                    node=self.name, pid=_pid(record), held_s=now - record.acquired_at,
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

    # ------------------------------------------------------------------ acquire

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

    def _shed_now(self, waiting: int, retry_after: float, expected: float) -> PoolExhausted:
        """Refuse a caller at once under overload (admission said no)."""
        self._shed += 1
        self.events.emit(ev.Refused(node=self.name, reason="overload", waiting=waiting,
                                    retry_after_s=retry_after))
        return PoolExhausted(
            f"overloaded: expected wait {expected * 1000:.0f} ms behind {waiting} callers; "
            f"retry in {retry_after * 1000:.0f} ms",
            node=self.name, state=self._state(), retry_after_s=retry_after,
        )

    def _circuit_open(self, now: float) -> CircuitOpen:
        assert self._breaker is not None
        self._circuit_refusals += 1
        retry = self._breaker.retry_after(now)
        self.events.emit(ev.Refused(node=self.name, reason="circuit_open",
                                    waiting=len(self._waiters), retry_after_s=retry))
        error = CircuitOpen(
            f"circuit open after repeated connection failures; next probe in {retry:.1f} s",
            node=self.name, state=self._state(), retry_after_s=retry,
        )
        error.__cause__ = self._last_error
        return error

    def retry_after(self) -> float:
        """An estimate (seconds) of when a refused caller may succeed: the time for the
        current queue to drain at the observed hold time; the breaker's open period left
        while it is open."""
        now = _monotonic()
        if self._breaker is not None and self._breaker.state is not _CLOSED:
            return max(self._breaker.retry_after(now), 0.001)
        if self._admission is not None:
            return self._admission.retry_after(len(self._waiters), self._limit)
        uses = self._h_use
        n = uses.count
        hold = uses.sum_s / n if n else 0.01
        return max(0.001, (len(self._waiters) + 1) * hold / max(self._limit, 1))

    # ------------------------------------------------------------------ protection callbacks

    def _breaker_changed(self, change: Transition) -> None:
        self.events.emit(ev.BreakerChanged(node=self.name, old=change.old.value,
                                           new=change.new.value, reason=change.reason))
        if change.new is BreakerState.OPEN:
            # Fail fast: nobody keeps waiting for a node that is down.
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(self._circuit_open(change.at))

    def _overload_changed(self, overloaded: bool, queue_delay_s: float) -> None:
        self.events.emit(ev.OverloadChanged(node=self.name, overloaded=overloaded,
                                            queue_delay_s=queue_delay_s))
        if overloaded and self._admission is not None and self._waiters:
            # Those admitted before the overload was seen may be queued for their whole
            # budget: hold them to the overload's bound too, so the standing queue goes.
            now = _monotonic()
            cap = now + self._admission.max_wait(_NEVER)
            for waiter in self._waiters:
                if waiter.deadline > cap:
                    waiter.deadline, waiter.limit = cap, "shed"
            if cap < self._expiry_at:
                self._schedule_expiry(cap, now)

    def _limit_changed(self, old: int, new: int) -> None:
        self._limit = min(new, self._max_size)
        self.events.emit(ev.LimitChanged(node=self.name, old=old, new=new))
        if new > old:
            self._serve_waiters_from_idle()
            self._grow()

    def _serve_waiters_from_idle(self) -> None:
        """The limit rose: idle connections go to waiters, up to the new limit."""
        now = _monotonic()
        while self._waiters and self._idle and self._n_in_use < self._limit:
            record = self._idle.pop()
            record.state = _IN_USE
            self._n_in_use += 1
            if now >= record.expires_at:
                self._retire(record, self._stale_reason(record))
                continue
            if record.conn.is_closed():
                self._retire(record, CloseReason.ERROR)
                continue
            self._hand_on(record, now)

    def _emit_timeout(self, waited_s: float, reason: str) -> None:
        self.events.emit(ev.TimedOut(node=self.name, waited_s=waited_s, reason=reason))

    def _not_admitting(self) -> PoolClosed:
        if self._closing:
            return PoolClosed("pool is closed", node=self.name, state=self._state())
        return PoolClosed("pool is not open: call `await pool.open()` first", node=self.name)

    def _schedule_expiry(self, when: float, now: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = self._loop.call_later(when - now, self._expire_due)

    def _expire_due(self) -> None:
        """Timer callback: fail every waiter whose deadline has passed, then set the timer
        for the earliest deadline left. Served waiters are already out of the queue."""
        self._expiry = None
        self._expiry_at = _NEVER
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

    def _forget(self, waiter: Waiter) -> None:
        # ValueError: already popped by a handoff it refused
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

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

    # ------------------------------------------------------------------ release

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
            self._retire(record, CloseReason.DISCARDED)
            return self._released()
        state = _release_state(conn)
        if state == _CONN_CLOSED:
            self._connection_lost(record)
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

    def _stale_reason(self, record: Record) -> CloseReason:
        """Why ``record``, past its ``expires_at`` (checked at acquire, release and in
        maintenance), must not be used again: older than the server's latest start (which
        sets ``expires_at`` to minus infinity, see :meth:`_connect`), or past its lifetime."""
        if record.server_started_at < self._server_started_at:
            return CloseReason.SERVER_RESTARTED
        return CloseReason.LIFETIME

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
                self._retire(record, CloseReason.DISCARDED)
            else:
                self._reuse(record, _monotonic())
            return
        self._last_error = error
        if _driver.is_connection_lost(error) or record.conn.is_closed():
            self._connection_lost(record)
        else:
            self._retire(record, CloseReason.RESET_FAILED)

    def _connection_lost(self, record: Record) -> None:
        """A checked-out connection turned out dead: retire it and make idle siblings
        prove themselves with a ping before reuse (the server may have restarted)."""
        self._suspect_before = _monotonic()
        self._retire(record, CloseReason.ERROR)

    # ------------------------------------------------------------------ decisions

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

    def _close_record(self, record: Record, reason: CloseReason) -> None:
        """Close ``record`` in the background and count why. For an idle record the caller
        has already taken it off the idle stack; in-use records go through ``_retire``."""
        record.state = ConnState.CLOSED
        self._records.discard(record)
        self._closed_by[reason.value] += 1
        self.events.emit(ev.ConnectionClosed(
            node=self.name, reason=reason.value, age_s=_monotonic() - record.created_at))
        self._track(_driver.close_quietly(record.conn, self._config.release_timeout))

    def _total(self) -> int:
        return len(self._idle) + self._n_in_use + self._n_opening

    def _grow(self) -> None:
        """Start connection attempts for waiters not yet covered and to keep ``min_size``,
        within ``max_size`` and at most ``max_concurrent_connects`` at a time (after a
        failure, each attempt first waits out the backoff: no stampede)."""
        if self._closing or not self._opened:
            return
        total = self._total()
        servable = min(len(self._waiters), self._limit - self._n_in_use) - len(self._idle)
        wanted = max(servable - self._n_opening, self._min_size - total)
        limit = self._config.max_concurrent_connects
        while wanted > 0 and total < self._max_size and self._n_opening < limit:
            self._n_opening += 1
            total += 1
            wanted -= 1
            self._spawn(self._open_one())

    async def _open_one(self) -> None:
        try:
            delay = self._backoff.delay()
            if delay:
                await asyncio.sleep(delay)
            record = await self._connect()
        except asyncio.CancelledError:
            self._n_opening -= 1
            raise
        except Exception as exc:
            self._n_opening -= 1
            self._backoff.failed()
            if self._breaker is not None:
                self._breaker.record_failure(_monotonic())
            self._last_error = self._connection_failed(exc)
            self._last_error.__cause__ = exc
            self.events.emit(ev.ConnectFailed(
                node=self.name, error=_driver.describe_error(exc, self._config),
                attempt=self._backoff.failures, next_delay_s=self._backoff.delay(),
            ))
            self._grow()
            return
        self._n_opening -= 1
        self._backoff.succeeded()
        if self._breaker is not None:
            self._breaker.record_success(_monotonic())
        self._n_in_use += 1
        if self._closing:
            self._retire(record, CloseReason.POOL_CLOSED)
            return
        self._hand_on(record)
        self._grow()

    async def _connect(self) -> Record:
        """Open one connection and learn the server's start time (restart detection)."""
        begun = _monotonic()
        try:
            conn = await _driver.open_connection(
                self._config, connection_class=self._connection_class,
                watched=self._watchdog is not None, observed=self._observer is not None)
            try:
                started = await _driver.server_started_at(conn, self._config.connect_timeout)
            except BaseException:
                conn.terminate()
                raise
        except Exception:
            self._connect_errors += 1
            raise
        self._created += 1
        conn._pw_observer = self._observer
        now = _monotonic()
        self._h_create.observe(now - begun)
        self.events.emit(ev.ConnectionOpened(
            node=self.name, pid=conn.get_server_pid(), duration_s=now - begun))
        if started > self._server_started_at:
            if self._server_started_at:
                self._server_restarts += 1
                self.events.emit(ev.ServerRestarted(
                    node=self.name, invalidated=self._invalidate_older(started)))
            self._server_started_at = started
        # (a connection to a server older than one seen already is stale from the start)
        expires = (lifetime_deadline(now, self._config.max_lifetime, self._config.lifetime_jitter)
                   if started >= self._server_started_at else -_NEVER)
        record = Record(conn, self, now=now, expires_at=expires, server_started_at=started)
        self._records.add(record)
        return record

    def _invalidate_older(self, started: float) -> int:
        """The server restarted at ``started``: close the idle connections opened before,
        and mark those in use stale (one comparison on the hot paths finds them); returns
        how many idle ones were closed."""
        for record in self._records:
            if record.server_started_at < started:
                record.expires_at = -_NEVER
        keep = [r for r in self._idle if r.server_started_at >= started]
        for record in self._idle:
            if record.server_started_at < started:
                self._close_record(record, CloseReason.SERVER_RESTARTED)
        dropped = len(self._idle) - len(keep)
        self._idle = deque(keep)
        return dropped

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
                node=self.name, pid=_pid(record), running_s=running, action=action))
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
                record.state is _IN_USE
                and not record.leak_reported
                and record.acquired_at < acquired_before
            ):
                record.leak_reported = True
                self._leaks += 1
                self.events.emit(ev.LeakSuspected(
                    node=self.name, pid=_pid(record), held_s=now - record.acquired_at,
                    stack=format_stack(record.stack, record.holder),
                ))

    def _connection_failed(self, exc: BaseException) -> ConnectionFailed:
        reason = _driver.describe_error(exc, self._config)
        return ConnectionFailed(
            f"cannot connect to {self._config_target()}: {reason}",
            node=self.name, state=self._state(),
        )

    def _config_target(self) -> str:
        return dsn_target(self._config.dsn)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        """Run background work that close() cancels. It runs in a fresh context: work done
        for the pool does not inherit the deadline of the caller that triggered it."""
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def _track(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        """Run I/O that must finish even if its caller is cancelled; close() awaits it."""
        task = self._loop.create_task(coro, context=contextvars.Context())
        self._io.add(task)
        task.add_done_callback(self._io.discard)
        return task

    # ------------------------------------------------------------------ stats

    def _state(self) -> PoolState:
        idle = len(self._idle)
        return PoolState(
            total=idle + self._n_in_use + self._n_opening, in_use=self._n_in_use, idle=idle,
            waiting=len(self._waiters), max_size=self._max_size,
        )

    def stats(self) -> PoolStats:
        """A snapshot of the current counts and the cumulative counters."""
        idle = len(self._idle)
        total = idle + self._n_in_use + self._n_opening
        c = self._config
        return PoolStats(
            name=c.name, min_size=c.min_size, pool_size=c.pool_size,
            max_overflow=c.max_overflow, max_size=c.max_size, max_waiting=c.max_waiting,
            connections=total, connections_idle=idle, connections_in_use=self._n_in_use,
            connections_opening=self._n_opening,
            connections_overflow=max(0, total - c.pool_size),
            requests_waiting=len(self._waiters), closed=self._closing,
            acquires_total=self._h_wait.count, acquires_waited_total=self._waited,
            acquire_wait_ms_total=self._h_wait.sum_s * 1000.0,
            acquire_timeouts_total=self._timeouts,
            acquire_refusals_total=self._refusals, acquire_cancelled_total=self._cancelled,
            connections_created_total=self._created,
            connection_errors_total=self._connect_errors,
            connections_closed_total=dict(self._closed_by), pings_total=self._pings,
            ping_failures_total=self._ping_failures, restores_total=self._restores,
            server_restarts_total=self._server_restarts, leaks_total=self._leaks,
            acquire_shed_total=self._shed, circuit_refusals_total=self._circuit_refusals,
            breaker_state=self._breaker.state.value if self._breaker else "disabled",
            concurrency_limit=self._limit,
            overloaded=self._admission.overloaded if self._admission else False,
            histograms={
                "wait": self._h_wait.snapshot(), "use": self._h_use.snapshot(),
                "create": self._h_create.snapshot(), "query": self._h_query.snapshot(),
            },
        )

    def __repr__(self) -> str:
        status = "closed" if self._closing else ("open" if self._opened else "new")
        return f"<Pool {self.name!r} {status} {self._state()}>"


_OURS = globals()  # the pool's own frames, skipped in an acquiring stack

_NO_LOOP: Any = None  # Pool._loop until open()


def _pid(record: Record) -> int | None:
    conn = record.conn
    return None if conn.is_closed() else conn.get_server_pid()


async def _periodically(
    pool_ref: weakref.ref[Pool], interval: float, work: Callable[[Pool], None]
) -> None:
    """Background upkeep; holds only a weak reference so a forgotten pool can die."""
    while True:
        await asyncio.sleep(interval)
        pool = pool_ref()
        if pool is None or pool._closing:
            return
        work(pool)
        del pool
