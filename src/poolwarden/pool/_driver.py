"""The boundary with asyncpg: opening connections, classifying errors, restoring state.

Everything that touches asyncpg internals lives here (and in :mod:`._behind`, the rollback
behind a release), so that a driver upgrade has two modules to check. The pool hands out
:class:`PooledConnection` — a plain asyncpg ``Connection`` subclass with one extra slot —
rather than a proxy object: a proxy costs an attribute lookup on every call, and the Python
client is the bottleneck.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from bisect import bisect_left as _bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import asyncpg

from .._secrets import scrub
from ..deadline import _current as _deadline_var
from ..deadline import no_deadline
from ..errors import PoolwardenError

if TYPE_CHECKING:
    from ._record import Record
    from .config import PoolConfig


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that belongs to a poolwarden pool.

    Use it exactly like ``asyncpg.Connection``. Do not keep it after releasing it: once
    released it may already serve another task.
    """

    __slots__ = ("_pw_observer", "_pw_record", "_pw_watched")

    _pw_record: Record | None
    _pw_observer: Any  # a query observer (see ``_observed``), or None
    # the statement section when the pool's watchdog enforces command_timeout, or None
    _pw_watched: StatementSection | None

    def _cancel_current_command(self, waiter: Any, cancel_waiter: Any = None) -> None:
        # asyncpg sends the CancelRequest from a new task bounded by command_timeout; it
        # must not inherit the caller's (by now expired) deadline, or the cancel would fail
        # at once and asyncpg would terminate this connection instead of cancelling.
        with no_deadline():
            super()._cancel_current_command(waiter, cancel_waiter)


# Errors after which the connection itself is unusable (the socket is gone or the server
# ended the session). Other errors (a syntax error, a constraint violation) leave it usable.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,  # class 08
    asyncpg.exceptions.AdminShutdownError,  # 57P01 pg_terminate_backend, shutdown
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.CannotConnectNowError,  # 57P03 server starting up / shutting down
    asyncpg.exceptions.IdleSessionTimeoutError,
    # The protocol is out of step with the server: seen when a FATAL (shutdown) arrives on
    # an idle connection just before its socket closes. It cannot be trusted again.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
)


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a statement that ran out of time: asyncpg's client-side timeout
    (``TimeoutError``) or the server's ``statement_timeout`` (57014), not a pool error."""
    if isinstance(exc, PoolwardenError):
        return False
    return isinstance(exc, TimeoutError | asyncpg.exceptions.QueryCanceledError)


def is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection it came from can no longer be used.

    ``TimeoutError`` is an ``OSError`` but not a lost connection: asyncpg cancels the
    timed-out statement and the connection stays usable (release waits for the cancel)."""
    return isinstance(exc, _CONNECTION_LOST) and not isinstance(exc, TimeoutError)


async def open_connection(
    config: PoolConfig, *, connection_class: type[PooledConnection] = PooledConnection,
    watched: bool = False, observed: bool = False,
) -> PooledConnection:
    """Open and set up one connection; raises the driver's error (the caller wraps it).

    ``connect_timeout`` bounds the whole handshake and ``command_timeout`` is set on the
    connection, so that a blackholed server can never hang a caller forever; each statement's
    timeout is further cut to the caller's deadline (see :func:`bind_deadline`). Server
    settings travel in the startup packet: no extra round trip.

    ``watched``: the pool's watchdog enforces ``command_timeout`` (see :func:`bind_deadline`);
    ``observed``: the pool times statements (the observer is set later, see
    :class:`StatementSection`).
    """
    conn: PooledConnection = await asyncpg.connect(
        config.dsn,
        timeout=config.connect_timeout,
        command_timeout=config.command_timeout,
        statement_cache_size=config.statement_cache_size,
        server_settings=config.all_server_settings(),
        ssl=config.ssl,
        connection_class=connection_class,
    )
    conn._pw_record = None
    conn._pw_observer = None
    section = install_section(conn) if watched or observed else None
    if observed and section is None:
        _warn_untimed()
    conn._pw_watched = bind_deadline(conn, watched=section if watched else None)
    try:
        if config.init is not None:
            async with asyncio.timeout(config.command_timeout):
                await config.init(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


_DEADLINE_CONFIGS: dict[type, type] = {}
_monotonic = time.monotonic
logger = logging.getLogger(__name__)
_warned_untimed: list[bool] = []


def _warn_untimed() -> None:
    if not _warned_untimed:
        _warned_untimed.append(True)
        logger.warning("this asyncpg (%s) does not have the statement section poolwarden "
                       "knows: statements with arguments are not timed", asyncpg.__version__)


class StatementSection:
    """Stands in for asyncpg's ``Connection._stmt_exclusive_section`` (same ``_acquired``
    flag, same error). asyncpg enters it around every statement of ``_execute`` (``fetch``,
    ``fetchrow``, ``fetchval``, ``execute`` with arguments) and ``_executemany``
    (``executemany``, ``fetchmany``), which makes it the cheapest place to see those
    statements: no wrapper coroutine, two clock reads.

    - ``relied``: the statement running in it took its timeout from the pool's watchdog
      (one given an explicit ``timeout=`` did not, and the watchdog leaves it alone).
    - ``outside``: how many callers have put statements sent outside the section under the
      watchdog too (:meth:`watch_outside`): the SQLAlchemy dialect's cursor calls and
      transaction control, which asyncpg sends as prepared statements and simple queries.
    - Statement timing: when the connection has a query observer (``_pw_observer``), each
      statement's duration and error go to it; the statement text and arguments are read
      from asyncpg's frame only when the observer needs them (a slow statement, a tap).
    """

    __slots__ = ("_acquired", "_conn", "outside", "relied", "started")

    def __init__(self, conn: PooledConnection) -> None:
        self._acquired = 0
        self._conn = conn
        self.outside = 0
        self.relied = False
        self.started = 0.0

    def watch_outside(self) -> None:
        """Until the matching :meth:`unwatch_outside`, statements sent outside the section
        (without an explicit ``timeout=`` or a deadline) are bounded by the watchdog too,
        not by a timer each. Only for code that awaits nothing but its statements in
        between: the watchdog reads "no progress" as "a statement is running"."""
        self.outside += 1
        self.relied = False

    def unwatch_outside(self) -> None:
        self.outside -= 1

    @property
    def busy(self) -> bool:
        """A statement that relies on the watchdog may be running."""
        return bool(self._acquired or self.outside) and self.relied

    def __enter__(self) -> None:
        if self._acquired:
            raise asyncpg.InterfaceError(
                "cannot perform operation: another operation is in progress")
        self._acquired = 1
        self.relied = False
        if self._conn._pw_observer is not None:
            self.started = _monotonic()

    def __exit__(self, et: object, error: BaseException | None, tb: object) -> None:
        self._acquired = 0
        observer = self._conn._pw_observer
        if observer is not None:
            elapsed = _monotonic() - self.started
            # QueryObserver.observe and Histogram.observe written out: two calls less on
            # every statement (~50 ns of the ~230 that timing costs)
            histogram = observer.histogram
            histogram.bucket_counts[_bisect_left(histogram.bounds_s, elapsed)] += 1
            histogram.sum_s += elapsed
            if elapsed > observer.report_above_s or observer.taps:
                # slow, or tapped: the statement itself is wanted
                found = sys._getframe(1).f_locals  # asyncpg's _execute / _executemany
                args = found.get("args", ())
                observer.report(str(found.get("query", "?")),
                                args if isinstance(args, Sequence) else (), elapsed, error)


def install_section(conn: PooledConnection) -> StatementSection | None:
    """Put a :class:`StatementSection` in place of asyncpg's exclusive section; ``None``
    when this asyncpg does not have the section we know (then nothing is changed)."""
    if getattr(getattr(conn, "_stmt_exclusive_section", None), "_acquired", None) != 0:
        return None
    section = conn._stmt_exclusive_section = StatementSection(conn)
    return section


def bind_deadline(
    conn: asyncpg.Connection, *, watched: StatementSection | None = None
) -> StatementSection | None:
    """Make every statement on ``conn`` time out at the caller's deadline (if earlier than
    ``command_timeout``); a statement started after the deadline fails before anything is
    sent. When this asyncpg does not look as expected nothing is changed (statements are
    bounded by ``command_timeout`` alone).

    How: asyncpg reads ``conn._config.command_timeout`` for every statement sent without an
    explicit ``timeout=``; we swap that namedtuple for a subclass whose ``command_timeout``
    is computed from the deadline context variable at that moment (one property call).

    ``watched``: the connection's statement section when the pool's statement watchdog
    enforces ``command_timeout`` for statements inside it (see :mod:`._watchdog`): those
    get no timer of their own unless a deadline is set; every other statement keeps
    asyncpg's timer. Returns the section if it is now watched (``None``: not watched, as
    when there is no ``command_timeout`` or this asyncpg is not the one we know).
    """
    config = conn._config
    base = type(config)
    fields = getattr(base, "_fields", ())
    if not isinstance(config, tuple) or "command_timeout" not in fields:
        return None
    section = watched if getattr(config, "command_timeout", None) else None
    cls = _DEADLINE_CONFIGS.get(base)
    if cls is None:
        index = fields.index("command_timeout")
        getitem = tuple.__getitem__
        monotonic = time.monotonic
        deadline_var_get = _deadline_var.get

        def command_timeout(self: Any) -> float | None:
            at = deadline_var_get()  # (current_deadline(), without its call)
            if at is None:
                section = self._pw_section
                if section is not None and (section._acquired or section.outside):
                    section.relied = True
                    return None  # the watchdog's
                configured: float | None = getitem(self, index)
                return configured
            configured = getitem(self, index)
            left = at - monotonic()
            # asyncpg raises TimeoutError for a timeout <= 0 before sending anything
            return left if configured is None or left < configured else configured

        # No __slots__: each instance carries the connection's statement section.
        cls = type(f"Deadline{base.__name__}", (base,),
                   {"command_timeout": property(command_timeout)})
        _DEADLINE_CONFIGS[base] = cls
    bound: Any = cls(*config)
    bound._pw_section = section
    conn._config = bound
    return section


async def server_started_at(conn: PooledConnection, timeout: float) -> float:
    """The server's start time (epoch seconds): a newer value means the server restarted."""
    # asyncpg.Connection's own methods: the pool's statements stay out of query stats
    started = await asyncpg.Connection.fetchval(
        conn, "SELECT extract(epoch FROM pg_postmaster_start_time())::float8", timeout=timeout
    )
    return float(started)


def statements_sent(conn: Any) -> int | None:
    """How many statements asyncpg has written on ``conn`` so far (its protocol's
    ``queries_count``, bumped right after each write), ``None`` if this asyncpg does not
    expose it — then callers must assume a statement went out."""
    count = getattr(getattr(conn, "_protocol", None), "queries_count", None)
    return count if isinstance(count, int) else None


CLEAN, NEEDS_RESTORE, CLOSED, NEEDS_ROLLBACK = 0, 1, 2, 3


def release_state(conn: PooledConnection) -> int:
    """At release, in one call (this is the hot path): ``CLOSED`` when the connection is
    gone, ``NEEDS_RESTORE`` when a cancelled query is still being cancelled on the server,
    ``NEEDS_ROLLBACK`` when a transaction is open or failed (and nothing else is needed),
    else ``CLEAN``."""
    protocol = conn._protocol
    if conn._aborted or protocol is None or not protocol.is_connected():
        return CLOSED
    if protocol._is_cancelling():
        return NEEDS_RESTORE
    if protocol.is_in_transaction() or conn._top_xact is not None:
        return NEEDS_ROLLBACK
    return CLEAN


async def restore(conn: PooledConnection, *, full: bool, timeout: float) -> None:
    """Bring ``conn`` back to a clean state, within ``timeout`` seconds; raises on failure.

    Waits for an in-flight cancellation, rolls back an open or failed transaction (also the
    one a cancelled ``async with conn.transaction()`` left behind), and with ``full`` runs
    asyncpg's complete session reset.
    """
    async with asyncio.timeout(timeout):
        protocol = conn._protocol
        if protocol._is_cancelling():
            await protocol._wait_for_cancellation(timeout)
        if conn.is_closed():
            raise asyncpg.ConnectionDoesNotExistError("connection closed while being restored")
        if full:
            await conn.reset(timeout=timeout)
        elif protocol.is_in_transaction() or conn._top_xact is not None:
            # A transaction object whose __aexit__ never ran (cancelled task) would make
            # the next user's conn.transaction() a savepoint: forget it, then roll back.
            conn._top_xact = None
            await asyncpg.Connection.execute(conn, "ROLLBACK", timeout=timeout)


async def ping(conn: PooledConnection, timeout: float) -> None:
    """One round trip proving the connection and the server are alive; raises if not."""
    await asyncpg.Connection.execute(conn, "SELECT 1", timeout=timeout)


async def close_quietly(conn: PooledConnection, timeout: float) -> None:
    """Close gracefully within ``timeout``, else terminate. Never raises."""
    try:
        await conn.close(timeout=timeout)
    except (Exception, asyncio.CancelledError):
        conn.terminate()


def describe_error(exc: BaseException, config: PoolConfig) -> str:
    """A one-line, password-free description of a driver error."""
    password = _password_of(config)
    return scrub(f"{type(exc).__name__}: {exc}", password)


def _password_of(config: PoolConfig) -> str | None:
    try:
        raw = urlsplit(config.dsn).password
    except ValueError:
        return None
    return unquote(raw) if raw else None


__all__ = ["PooledConnection", "is_connection_lost", "open_connection"]

