"""The dialect of engines built on a core: asyncpg's, with its cursor calls and transaction ends
under the core's statement watchdog and reported to the core's query observer.

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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from ..pool import PooledConnection
from ..pool._checkout import stopped_statement_error
from ._pool import rollback_skipped

if TYPE_CHECKING:
    from ..pool._driver import StatementSection
    from ..pool._observed import QueryObserver

ASYNC_DRIVERNAME = "postgresql+poolwarden_asyncpg"
"""The URL driver name of engines built on a core."""


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
        if rollback_skipped(dbapi_connection):
            return
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
