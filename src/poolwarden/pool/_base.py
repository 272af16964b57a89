"""The pool's state, and the small helpers every part of the pool uses.

:class:`~poolwarden.pool.core.Pool` is put together from parts, one module each, all
subclasses of :class:`PoolBase`:

- :mod:`.core` — the fair pool itself: open and close, acquire, release, the handoff;
- :mod:`._queue` — the waiters' queue: joining it, leaving it, its one expiry timer;
- :mod:`._opening` — opening connections: how many, when, and server-restart detection;
- :mod:`._guards` — the protections' glue: circuit breaker, admission, adaptive limit;
- :mod:`._upkeep` — background upkeep: lifetimes, idle closing, leaks, the statement watchdog.

``PoolBase`` sets up the state they share. A method one part calls in another is declared
here for the type checker only (under ``TYPE_CHECKING``): at run time the call finds the
part's own method, with no indirection on the hot paths.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import Counter, deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import events as ev
from ..errors import CircuitOpen, PoolClosed, PoolExhausted, PoolState
from ..events import EventBus
from ..protect.breaker import BreakerState
from . import _driver
from ._driver import PooledConnection
from ._observed import ObservedConnection, QueryObserver
from ._policy import Backoff
from ._record import CloseReason, ConnState, Record
from ._waiter import Waiter
from ._watchdog import StatementWatchdog
from .config import PoolConfig, ResetPolicy
from .histogram import Histogram
from .stats import PoolStats

if TYPE_CHECKING:
    from ..protect.admission import Admission
    from ..protect.breaker import CircuitBreaker
    from ..protect.limiter import AdaptiveLimit

__all__ = ["PoolBase", "server_pid"]

_monotonic = time.monotonic
NEVER = float("inf")
# (enum members as module constants: reading ConnState.IDLE costs ~50 ns on Python 3.11)
IN_USE, IDLE = ConnState.IN_USE, ConnState.IDLE
BREAKER_CLOSED = BreakerState.CLOSED
_NO_LOOP: Any = None  # PoolBase._loop until open()


def server_pid(record: Record) -> int | None:
    """The server process behind ``record``, ``None`` once its connection is closed."""
    conn = record.conn
    return None if conn.is_closed() else conn.get_server_pid()


class PoolBase:
    """The state of a pool of connections to one PostgreSQL node (see the module doc for
    the parts that make up :class:`~poolwarden.pool.core.Pool`)."""

    _admission: Admission | None
    _breaker: CircuitBreaker | None
    _limiter: AdaptiveLimit | None

    if TYPE_CHECKING:  # the parts' methods that other parts call (see the module doc)

        def _set_up_protection(self, config: PoolConfig) -> None: ...
        def _hand_on(self, record: Record, now: float | None = None) -> None: ...
        def _retire(self, record: Record, reason: CloseReason) -> None: ...
        def _grow(self) -> None: ...
        def _schedule_expiry(self, when: float, now: float) -> None: ...
        def retry_after(self) -> float: ...
        def _circuit_open(self, now: float) -> CircuitOpen: ...
        def _shed_now(self, waiting: int, retry_after: float,
                      expected: float) -> PoolExhausted: ...
        def _overload_changed(self, overloaded: bool, queue_delay_s: float) -> None: ...

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
        self._expiry_at = NEVER
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

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> PoolConfig:
        return self._config

    def _total(self) -> int:
        return len(self._idle) + self._n_in_use + self._n_opening

    def _state(self) -> PoolState:
        idle = len(self._idle)
        return PoolState(
            total=idle + self._n_in_use + self._n_opening, in_use=self._n_in_use, idle=idle,
            waiting=len(self._waiters), max_size=self._max_size,
        )

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

    def _close_record(self, record: Record, reason: CloseReason) -> None:
        """Close ``record`` in the background and count why. For an idle record the caller
        has already taken it off the idle stack; in-use records go through ``_retire``."""
        record.state = ConnState.CLOSED
        self._records.discard(record)
        self._closed_by[reason.value] += 1
        self.events.emit(ev.ConnectionClosed(
            node=self.name, reason=reason.value, age_s=_monotonic() - record.created_at))
        self._track(_driver.close_quietly(record.conn, self._config.release_timeout))

    def _stale_reason(self, record: Record) -> CloseReason:
        """Why ``record``, past its ``expires_at`` (checked at acquire, release and in
        maintenance), must not be used again: older than the server's latest start (which
        sets ``expires_at`` to minus infinity, see :meth:`_connect`), or past its lifetime."""
        if record.server_started_at < self._server_started_at:
            return CloseReason.SERVER_RESTARTED
        return CloseReason.LIFETIME

    def _emit_timeout(self, waited_s: float, reason: str) -> None:
        self.events.emit(ev.TimedOut(node=self.name, waited_s=waited_s, reason=reason))

    def _not_admitting(self) -> PoolClosed:
        if self._closing:
            return PoolClosed("pool is closed", node=self.name, state=self._state())
        return PoolClosed("pool is not open: call `await pool.open()` first", node=self.name)

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
