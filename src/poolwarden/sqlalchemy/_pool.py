"""The SQLAlchemy pool of engines built on a core (SQLAlchemy 2.x pool hooks).

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
- Reset on return: the ``ROLLBACK`` that ends a checkout — the close of a connection or of
  a session with its transaction still open, i.e. every ``async with engine.connect()``
  block that did not commit — runs behind the release: SQLAlchemy skips it (see
  :func:`closing`), the core sends it and hands the connection on once it is answered
  (:mod:`poolwarden.pool._behind`). The caller does not wait for that round trip, and the
  slot stays taken until it is through; a rollback that fails costs the connection, not
  the slot. A rollback the caller asks for (``conn.rollback()``) is SQLAlchemy's, waited
  for as before. Whatever SQLAlchemy did not know of (a ``BEGIN`` in autocommit mode) the
  core rolls back too. At most one round trip either way.
- Pre-ping and recycling are the core's (``pre_ping`` window, ``max_lifetime``); the
  SQLAlchemy pool does neither.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import types
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.pool import Pool as _SAPool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import await_

from ..pool import Pool, PooledConnection

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.engine.interfaces import DBAPIConnection

logger = logging.getLogger("poolwarden.sqlalchemy")

_T = TypeVar("_T")


class _CoreRecord(_ConnectionRecord):
    """SQLAlchemy's record of one core connection; ``core_conn`` is set while it is checked
    out (the connection to give back), ``None`` once given back. ``closing`` is set by
    :func:`closing` for the rest of a checkout that is ending."""

    __slots__ = ("closing", "core_conn")

    def __init__(self, pool: CorePool, conn: PooledConnection) -> None:
        self.core_conn: PooledConnection | None = conn
        self.closing = False
        super().__init__(pool, connect=False)


def closing(connection: Connection) -> None:
    """``connection`` is about to be closed: its transaction, if any, is rolled back by the
    core after release, in the background, instead of by SQLAlchemy before it.

    Called just before a close (of the connection, or of the session that owns it). The
    root ``ROLLBACK`` of that close is then skipped (:func:`rollback_skipped`); savepoint
    rollbacks before it still run. The flag ends with the checkout."""
    fairy = connection._dbapi_connection
    if fairy is not None:
        record = fairy._connection_record
        if type(record) is _CoreRecord:
            record.closing = True


def rollback_skipped(dbapi_connection: Any) -> bool:
    """For the dialect's ``do_rollback``: ``True`` when the checkout of ``dbapi_connection``
    (SQLAlchemy's proxy of it) is closing, in which case its transaction is left to the core
    — the adapter forgets it, the core rolls it back once the connection is released."""
    record = getattr(dbapi_connection, "_connection_record", None)
    if type(record) is not _CoreRecord or not record.closing:
        return False
    record.closing = False
    dbapi_connection.dbapi_connection._transaction = None
    return True


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
        rec.closing = False
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
        if not _loop_running():
            # Garbage collection of a connection never closed, outside the event loop.
            logger.error("poolwarden: a connection was garbage-collected outside the "
                         "event loop; its pool slot could not be returned")
            return
        # A rollback or reset that must run first goes on in the background, tracked by the
        # core, which hands the slot on once it is through (or closes the connection).
        self._core._give_back(conn, False, discard, wait=False)

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

