"""SQLAlchemy on the pool core: an ``AsyncEngine`` whose connections come from a poolwarden
:class:`~poolwarden.pool.Pool`, sessions that commit or roll back, and a sync engine with the
same settings for scripts and migrations.

How the async engine is wired (SQLAlchemy 2.x pool hooks):

- :class:`CorePool` is a ``sqlalchemy.pool.Pool`` whose ``_do_get`` acquires from the core
  and whose ``_do_return_conn`` releases to it, so SQLAlchemy checkouts get the core's
  fairness, limits, acquire timeout and stats. The core's own errors (:class:`PoolTimeout`,
  :class:`PoolExhausted`, :class:`PoolClosed`) reach the caller unwrapped: SQLAlchemy wraps
  only DBAPI errors raised during checkout.
- One SQLAlchemy connection record is kept per asyncpg connection, so the dialect's setup
  and the adapter's prepared-statement cache survive across checkouts; it is forgotten when
  the core closes the connection (asyncpg termination listener).
- SQLAlchemy never closes a core connection itself. When it invalidates one (a disconnect,
  a cancelled query, a failed reset), the connection goes back to the core to be closed:
  counted as ``error`` when it is already dead, ``discarded`` otherwise. SQLAlchemy's
  pool-wide invalidation is turned off; the core already makes idle siblings of a dead
  connection prove themselves with a ping.
- Reset on return: SQLAlchemy rolls back the transaction it knows of (no round trip when
  there is none); the core then finds the connection clean and does nothing. Whatever
  SQLAlchemy did not know of (a ``BEGIN`` in autocommit mode) the core rolls back. At most
  one round trip either way.
- Pre-ping and recycling are the core's (``pre_ping`` window, ``max_lifetime``); the
  SQLAlchemy pool does neither.
- The dialect is asyncpg's with one change: it leaves the connection's ``json``/``jsonb``
  codecs as the core set them and decodes JSON itself, so that a connection shared with the
  raw path returns the same values on both paths whichever path touched it first.

Statements are timed for the core's query histogram and slow-query log (the core's
``query_stats`` / ``slow_query_threshold``): SQLAlchemy runs them as asyncpg prepared
statements, which the raw path's :class:`~poolwarden.pool._observed.ObservedConnection`
does not see, so the dialect times its cursor calls (``do_execute``) and reports each to
the connection's :class:`~poolwarden.pool._observed.QueryObserver` — once per cursor
execution (one per batch of an "insertmanyvalues" INSERT). The dialect rather than engine
events: any ``*_cursor_execute`` listener sends every statement of the engine through
SQLAlchemy's event dispatch, which costs more than the statement's own Python work. Two
things stay with the raw path, which does see them, so that nothing is counted twice:
``executemany`` (the asyncpg dialect calls ``Connection.executemany``) and transaction
control (``BEGIN``/``COMMIT``/``ROLLBACK`` go through asyncpg's ``Transaction``). A
statement's time is from before the cursor call to after it: the prepare round trip when
the statement is new to the connection and, for the first statement of a transaction, the
``BEGIN`` sent just before it are included; rows a server-side cursor streams later are
not.

``command_timeout`` is the core's statement watchdog's on this path too (see
:mod:`poolwarden.pool._watchdog`): the dialect's cursor calls and the transaction's
``COMMIT``/``ROLLBACK`` arm no asyncpg timer each. A statement the watchdog stops raises
:class:`~poolwarden.errors.StatementTimeout` (a ``TimeoutError``) from the cursor call or the
commit, and the core closes the connection at release; SQLAlchemy's rollback on return of
such a connection is skipped quietly when it fails (the session ends with the connection).

``engine.dispose()`` forgets SQLAlchemy's per-connection state but does not close the core
or its connections: whoever opened the core closes it. ``Connection.detach()`` is not
supported: the core closes a detached connection (to own a connection, ``pool.acquire()``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.pool import Pool as _SAPool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet

from .pool import Pool, PoolConfig, PooledConnection
from .pool._checkout import stopped_statement_error

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

    from .pool._driver import StatementSection
    from .pool._observed import QueryObserver

__all__ = [
    "ASYNC_DRIVERNAME",
    "CorePool",
    "create_async_engine_on",
    "create_sync_engine",
    "session_factory",
    "session_scope",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ASYNC_DRIVERNAME = "postgresql+poolwarden_asyncpg"
"""The URL driver name of engines built on a core (the asyncpg dialect, see the module doc)."""

SYNC_DRIVERNAME = "postgresql+psycopg"

# Engine arguments that configure SQLAlchemy's own pool: on a core they belong to PoolConfig.
_CORE_OWNED = frozenset({
    "pool", "poolclass", "pool_size", "max_overflow", "pool_timeout", "pool_recycle",
    "pool_pre_ping", "pool_use_lifo", "pool_reset_on_return", "creator", "async_creator",
})


class PoolwardenAsyncpgDialect(PGDialect_asyncpg):
    """asyncpg's dialect, minus the per-connection JSON codecs: those would change what the
    raw path gets back from a connection SQLAlchemy has used. JSON is decoded by
    SQLAlchemy's type instead (same values, parsed with the engine's ``json_deserializer``).

    Its cursor calls report to the core connection's query observer, when it has one (see
    the module doc); ``executemany`` is the raw path's to see."""

    supports_native_json_deserialization = False
    supports_statement_cache = True  # nothing here changes how statements compile

    async def setup_asyncpg_json_codec(self, conn: Any) -> None:
        return None

    async def setup_asyncpg_jsonb_codec(self, conn: Any) -> None:
        return None

    def do_execute(
        self, cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        self._execute(cursor, statement, parameters)

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any = None) -> None:
        self._execute(cursor, statement, None)

    def _execute(self, cursor: Any, statement: str, parameters: Any) -> None:
        """One cursor execution (``parameters`` ``None``: sent without a parameter list),
        bounded by the core's statement watchdog and reported to the connection's observer
        (its error too), as far as the core has them."""
        call = (statement,) if parameters is None else (statement, parameters)
        conn = cursor._connection
        watched: StatementSection | None = getattr(conn, "_pw_watched", None)
        observer: QueryObserver | None = getattr(conn, "_pw_observer", None)
        if watched is None and observer is None:
            cursor.execute(*call)
            return
        start = _monotonic()
        if watched is not None:
            watched.watch_outside()
        try:
            cursor.execute(*call)
        except BaseException as exc:
            if observer is not None:
                error: BaseException = exc
                if exc.__cause__ is not None and isinstance(exc, self.loaded_dbapi.Error):
                    # the dialect's DBAPI error wraps asyncpg's ("raise ... from"): report
                    # the driver's error class, as the raw path does
                    error = exc.__cause__
                # asyncpg's paramstyle is positional: parameters are a sequence
                observer.observe(statement, parameters or (), _monotonic() - start, error)
            if isinstance(exc, Exception):
                _raise_if_stopped(conn, exc)
            raise
        finally:
            if watched is not None:
                watched.unwatch_outside()
        if observer is not None:
            observer.observe(statement, parameters or (), _monotonic() - start, None)

    def do_commit(self, dbapi_connection: Any) -> None:
        self._end_transaction(super().do_commit, dbapi_connection, commit=True)

    def do_rollback(self, dbapi_connection: Any) -> None:
        self._end_transaction(super().do_rollback, dbapi_connection, commit=False)

    @staticmethod
    def _end_transaction(end: Callable[[Any], None], dbapi_connection: Any, *,
                         commit: bool) -> None:
        """``COMMIT`` or ``ROLLBACK`` (``end``) under the core's statement watchdog. After
        the watchdog stopped a statement of this checkout, the core closes the connection
        at release and its transaction ends with it: a commit raises StatementTimeout
        (nothing of it can be committed); a rollback that fails there (a dead or
        still-cancelling connection) is skipped, the caller having been told already."""
        conn = dbapi_connection._connection
        watched: StatementSection | None = getattr(conn, "_pw_watched", None)
        if watched is None:
            end(dbapi_connection)
            return
        if commit:
            _raise_if_stopped(conn, None)
        watched.watch_outside()
        try:
            end(dbapi_connection)
        except Exception as exc:
            if commit:
                _raise_if_stopped(conn, exc)
                raise
            record = conn._pw_record
            if record is None or not record.timed_out:
                raise
        finally:
            watched.unwatch_outside()


def _raise_if_stopped(conn: PooledConnection, exc: Exception | None) -> None:
    """The core's watchdog stopped a statement of this checkout (``exc``: what came out of
    it, if anything): raise what the raw path raises then,
    :class:`~poolwarden.errors.StatementTimeout` (a ``TimeoutError``). Never for a
    cancellation: that goes on as it is."""
    record = conn._pw_record
    if record is not None and record.timed_out:
        raise stopped_statement_error(record) from exc


_monotonic = time.monotonic

registry.register(ASYNC_DRIVERNAME.replace("+", "."), __name__, "PoolwardenAsyncpgDialect")


class _CoreRecord(_ConnectionRecord):
    """SQLAlchemy's record of one core connection; ``core_conn`` is set while it is checked
    out (the connection to give back), ``None`` once given back."""

    __slots__ = ("core_conn",)

    def __init__(self, pool: CorePool, conn: PooledConnection) -> None:
        self.core_conn: PooledConnection | None = conn
        super().__init__(pool, connect=False)


class CorePool(_SAPool):
    """A SQLAlchemy pool that holds no connections: it borrows them from a poolwarden core.

    Built by :func:`create_async_engine_on`; not meant to be constructed directly.
    """

    def __init__(
        self,
        core: Pool,
        *,
        prepared_statement_cache_size: int = 100,
        echo: Any = None,
        logging_name: str | None = None,
        _dispatch: Any = None,
        dialect: Any = None,
    ) -> None:
        self._core = core
        self._cache_size = prepared_statement_cache_size
        # asyncpg connection -> its record; an entry leaves when the core closes the connection
        self._records: dict[PooledConnection, _CoreRecord] = {}
        super().__init__(
            self._adapt, echo=echo, logging_name=logging_name, reset_on_return="rollback",
            pre_ping=False, _dispatch=_dispatch, dialect=dialect,
        )

    @property
    def core(self) -> Pool:
        return self._core

    # -------------------------------------------------------------- checkout / checkin

    def _do_get(self) -> ConnectionPoolEntry:
        # Raises the core's PoolTimeout / PoolExhausted / PoolClosed as they are.
        conn = _run(self._core.acquire())
        record = self._records.get(conn)
        if record is None:
            record = self._adopt(conn, _CoreRecord(self, conn))
        else:
            record.core_conn = conn
        return record

    def _adapt(self, rec: ConnectionPoolEntry) -> DBAPIConnection:
        """The creator: wrap the record's core connection in the dialect's adapter (once per
        connection; SQLAlchemy then runs its connect events on it)."""
        record = cast(_CoreRecord, rec)
        conn = record.core_conn
        if conn is None:
            # SQLAlchemy recycles a record in place (soft invalidation): the old connection
            # went back to the core in _close_connection; take another.
            conn = _run(self._core.acquire())
            record.core_conn = conn
            self._adopt(conn, record)

        async def ready() -> PooledConnection:
            return conn

        dbapi = cast(Any, self._dialect).loaded_dbapi
        return cast("DBAPIConnection", dbapi.connect(
            async_creator_fn=ready, prepared_statement_cache_size=self._cache_size,
        ))

    def _adopt(self, conn: PooledConnection, record: _CoreRecord) -> _CoreRecord:
        self._records[conn] = record
        conn.add_termination_listener(self._forget)
        return record

    def _forget(self, conn: Any) -> None:
        self._records.pop(conn, None)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        rec = cast(_CoreRecord, record)
        conn, rec.core_conn = rec.core_conn, None
        if conn is None:
            return  # already given back by _close_connection
        # No adapter left (detach(), or a setup interrupted before SQLAlchemy could close
        # it): never hand the connection on.
        self._give_back(conn, discard=rec.dbapi_connection is None)

    def _close_connection(
        self, connection: DBAPIConnection, *, terminate: bool = False
    ) -> None:
        """SQLAlchemy asks to close a connection (invalidation, failed setup, recycle): the
        core closes it instead, and counts why."""
        conn = cast(PooledConnection, cast(Any, connection)._connection)
        record = self._records.get(conn)
        if record is None or record.core_conn is not conn:
            return  # not checked out through us: the core (or its holder) owns it
        record.core_conn = None
        self._give_back(conn, discard=True)

    def _give_back(self, conn: PooledConnection, *, discard: bool) -> None:
        if discard:
            self._forget(conn)
            # A dead connection goes back undiscarded: the core counts it as lost (reason
            # "error") and pings its idle siblings before reuse.
            discard = not conn.is_closed()
        greenlet = in_greenlet()
        if not greenlet and not _loop_running():
            # Garbage collection of a connection never closed, outside the event loop.
            logger.error("poolwarden: a connection was garbage-collected outside the "
                         "event loop; its pool slot could not be returned")
            return
        release = self._core._give_back(conn, False, discard)
        if greenlet and not release.done():  # a rollback or reset runs first
            await_(release)
        # (outside a greenlet — garbage collection on the loop — any rollback goes on in the
        # background, tracked by the core)

    def _invalidate(
        self,
        connection: PoolProxiedConnection,
        exception: BaseException | None = None,
        _checkin: bool = True,
    ) -> None:
        # Only this connection: SQLAlchemy would otherwise recycle every connection older
        # than now. The core already pings idle siblings of a connection found dead.
        if _checkin and connection.is_valid:
            connection.invalidate(exception)

    # -------------------------------------------------------------- pool API

    def recreate(self) -> CorePool:
        return CorePool(
            self._core, prepared_statement_cache_size=self._cache_size, echo=self.echo,
            logging_name=self._orig_logging_name, _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def dispose(self) -> None:
        """Forget SQLAlchemy's state of idle connections; the core keeps them open."""
        for conn, record in list(self._records.items()):
            if record.core_conn is None:
                self._records.pop(conn, None)
                conn.remove_termination_listener(self._forget)

    def status(self) -> str:
        return f"CorePool over {self._core!r}"

    def __repr__(self) -> str:
        return f"<CorePool records={len(self._records)} core={self._core!r}>"


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """``await_(coro)`` without the two greenlet switches when ``coro`` finishes without
    suspending — the core's acquire and release fast paths never suspend. Must be called
    where ``await_`` may be (inside SQLAlchemy's greenlet, on the event loop's thread)."""
    try:
        pending = coro.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    return await_(_finish(coro, pending))


@types.coroutine
def _finish(coro: Coroutine[Any, Any, _T], pending: Any) -> Generator[Any, Any, _T]:
    """The rest of ``await coro`` after its first step ran in :func:`_run`: the task waits
    on what ``coro`` yielded, then ``coro`` goes on — with the task's cancellation thrown
    into it, exactly as a plain ``await`` would deliver it."""
    while True:
        try:
            yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation: coro must see it to clean up
            step: Callable[[], Any] = functools.partial(coro.throw, exc)
        else:
            step = functools.partial(coro.send, None)
        try:
            pending = step()
        except StopIteration as done:
            return cast(_T, done.value)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# ------------------------------------------------------------------ public API


def create_async_engine_on(pool: Pool, **engine_kwargs: Any) -> AsyncEngine:
    """An ``AsyncEngine`` (asyncpg) whose connections are checked out from ``pool``.

    ``engine_kwargs`` go to ``create_async_engine`` (``echo``, ``echo_pool``,
    ``pool_logging_name``, ``execution_options``, ``json_serializer``...), plus
    ``prepared_statement_cache_size`` for SQLAlchemy's per-connection statement cache
    (default: the core's ``statement_cache_size``). Pool sizing, timeouts, pre-ping and
    recycling belong to the core's :class:`PoolConfig`; passing them raises ``ArgumentError``.

    Checkouts raise the core's :class:`~poolwarden.PoolTimeout`,
    :class:`~poolwarden.PoolExhausted` and :class:`~poolwarden.PoolClosed` unwrapped.
    ``engine.dispose()`` does not close ``pool``.
    """
    owned = sorted(_CORE_OWNED.intersection(engine_kwargs))
    if owned:
        raise ArgumentError(
            f"{', '.join(owned)}: set on the core's PoolConfig, not on an engine built on it"
        )
    sa_pool = CorePool(
        pool,
        prepared_statement_cache_size=engine_kwargs.pop(
            "prepared_statement_cache_size", pool.config.statement_cache_size
        ),
        echo=engine_kwargs.pop("echo_pool", None),
        logging_name=engine_kwargs.pop("pool_logging_name", None),
    )
    return create_async_engine(_public_url(pool.config.dsn), pool=sa_pool, **engine_kwargs)


def session_factory(engine: AsyncEngine, **kwargs: Any) -> async_sessionmaker[AsyncSession]:
    """An ``async_sessionmaker`` for ``engine`` with ``expire_on_commit=False`` (objects stay
    usable after the commit, which matters in async code where lazy loads cannot happen)."""
    kwargs.setdefault("expire_on_commit", False)
    return async_sessionmaker(engine, **kwargs)


@asynccontextmanager
async def session_scope(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """``async with session_scope(factory) as session:`` — commit when the block succeeds,
    roll back when it raises (cancellation included), close always. The block's exception
    propagates; a failure of the rollback itself is logged, not raised over it."""
    session = factory()
    try:
        yield session
        await session.commit()
    except BaseException:
        try:
            await session.rollback()
        except Exception:
            logger.warning("poolwarden: rollback after a failed session scope failed",
                           exc_info=True)
        raise
    finally:
        await session.close()


def create_sync_engine(config: PoolConfig, **kw: Any) -> sqlalchemy.Engine:
    """A sync engine (psycopg 3) with ``config``'s settings, for scripts and migrations.

    Mapped: ``pool_size``, ``max_overflow``, ``acquire_timeout`` → ``pool_timeout``,
    ``max_lifetime`` → ``pool_recycle``, ``pre_ping`` → ``pool_pre_ping``,
    ``connect_timeout`` (whole seconds, at least 2, as libpq requires), ``application_name``,
    and every server setting (timezone, statement/lock/idle-in-transaction timeouts, extra
    ``server_settings``) as libpq ``options=-c ...``; ``ssl`` when it is a mode name
    (``require``, ``verify-full``...). Not mapped: ``command_timeout`` (no libpq
    equivalent: use ``statement_timeout``), an ``ssl.SSLContext`` (put ``sslmode`` /
    ``sslrootcert`` in the DSN) and the asyncpg ``init`` hook.

    ``kw`` goes to ``sqlalchemy.create_engine`` and overrides the above (``connect_args``
    are merged). The engine's ``repr`` / ``str`` mask the password.
    """
    connect_args: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(config.connect_timeout)),
        "application_name": config.application_name,
        "options": _libpq_options(config.all_server_settings()),
    }
    if isinstance(config.ssl, str):
        connect_args["sslmode"] = config.ssl
    try:
        url: URL | str = make_url(config.dsn).set(drivername=SYNC_DRIVERNAME)
    except ArgumentError:  # a key=value DSN: libpq parses it itself
        url = f"{SYNC_DRIVERNAME}://"
        connect_args["conninfo"] = config.dsn
    connect_args.update(kw.pop("connect_args", {}))
    options: dict[str, Any] = {
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "pool_timeout": config.acquire_timeout,
        "pool_recycle": config.max_lifetime,
        "pool_pre_ping": config.pre_ping,
        "connect_args": connect_args,
    }
    options.update(kw)
    return sqlalchemy.create_engine(url, **options)


def _public_url(dsn: str) -> URL:
    """The engine's URL: where the core points, for display; never the password (the engine
    does not connect with it, the core does)."""
    try:
        url = make_url(dsn)
    except ArgumentError:  # a key=value DSN
        return URL.create(ASYNC_DRIVERNAME)
    return url.set(drivername=ASYNC_DRIVERNAME, password=None, query={})


def _libpq_options(settings: Mapping[str, str]) -> str:
    """``-c name=value`` for each setting, with libpq's escaping of spaces and backslashes."""
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace(" ", "\\ ")

    return " ".join(f"-c {escape(name)}={escape(value)}" for name, value in settings.items())
