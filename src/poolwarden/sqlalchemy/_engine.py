"""The ``AsyncEngine`` of engines built on a core: SQLAlchemy's, with its connections' and
transactions' calls into the sync core run on kept greenlets (:mod:`._greenlets`) rather
than on a greenlet created per call.

What is covered: checkout (``connect()``, ``begin()``), ``execute`` / ``scalar`` /
``scalars`` / ``exec_driver_sql``, ``commit``, ``rollback``, ``close``, ``run_sync``,
``invalidate``, and the transaction objects of ``conn.begin()`` / ``begin_nested()``. The
exit of ``async with engine.connect()`` closes in the caller's task, and the close leaves
its rollback to the core (see :meth:`CoreAsyncConnection.__aexit__`). Everything else
(``stream``, ``execution_options``, ``get_raw_connection``...) is SQLAlchemy's own,
unchanged. Engines made with ``engine.execution_options(...)`` are of this class too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction
from sqlalchemy.ext.asyncio.result import _ensure_sync_result

from ._greenlets import greenlet_call
from ._pool import closing

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import CursorResult
    from sqlalchemy.engine.interfaces import (
        CoreExecuteOptionsParameter,
        _CoreAnyExecuteParams,
        _DBAPIAnyExecuteParams,
    )
    from sqlalchemy.sql.base import Executable

__all__ = ["CoreAsyncConnection", "CoreAsyncEngine", "CoreAsyncTransaction"]

_T = TypeVar("_T")


class CoreAsyncConnection(AsyncConnection):
    """``AsyncConnection`` whose calls run on kept greenlets."""

    __slots__ = ()

    @classmethod
    def _regenerate_proxy_for_target(
        cls, target: Connection, **additional_kw: Any
    ) -> CoreAsyncConnection:
        return cls(CoreAsyncEngine._retrieve_proxy_for_target(target.engine), target)

    async def start(self, is_ctxmanager: bool = False) -> CoreAsyncConnection:
        if self.sync_connection:
            raise InvalidRequestError("connection is already started")
        self.sync_connection = self._assign_proxied(
            await greenlet_call(self.sync_engine.connect)
        )
        return self

    def begin(self) -> CoreAsyncTransaction:
        assert self._proxied
        return CoreAsyncTransaction(self)

    def begin_nested(self) -> CoreAsyncTransaction:
        assert self._proxied
        return CoreAsyncTransaction(self, nested=True)

    async def invalidate(self, exception: BaseException | None = None) -> None:
        await greenlet_call(self._proxied.invalidate, exception=exception)

    async def commit(self) -> None:
        await greenlet_call(self._proxied.commit)

    async def rollback(self) -> None:
        await greenlet_call(self._proxied.rollback)

    async def close(self) -> None:
        connection = self._proxied
        closing(connection)
        await greenlet_call(connection.close)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        # SQLAlchemy closes in a task of its own behind a shield, so that a cancellation
        # arriving meanwhile waits for the rollback to finish (~8 µs a checkout for the task).
        # Here the close runs in the caller's task and waits for nothing: the rollback that
        # ends the block runs behind the release, in the core (see ._pool.closing), so no
        # cancellation can interrupt it. (Should a close still wait for the server, a
        # cancellation there makes SQLAlchemy invalidate the connection, which goes back to
        # the core to be closed: slot back, nothing committed.)
        await self.close()

    async def exec_driver_sql(
        self,
        statement: str,
        parameters: _DBAPIAnyExecuteParams | None = None,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> CursorResult[Any]:
        result = await greenlet_call(
            self._proxied.exec_driver_sql, statement, parameters, execution_options
        )
        return await _ensure_sync_result(result, self.exec_driver_sql)

    async def execute(
        self,
        statement: Executable,
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> CursorResult[Any]:
        result = await greenlet_call(
            self._proxied.execute, statement, parameters, execution_options=execution_options
        )
        return await _ensure_sync_result(result, self.execute)

    async def run_sync(
        self, fn: Callable[..., _T], *arg: Any, **kw: Any
    ) -> _T:
        return await greenlet_call(fn, self._proxied, *arg, **kw)


class CoreAsyncTransaction(AsyncTransaction):
    """``AsyncTransaction`` whose calls run on kept greenlets."""

    __slots__ = ()

    async def close(self) -> None:
        await greenlet_call(self._proxied.close)

    async def rollback(self) -> None:
        await greenlet_call(self._proxied.rollback)

    async def commit(self) -> None:
        await greenlet_call(self._proxied.commit)

    async def start(self, is_ctxmanager: bool = False) -> CoreAsyncTransaction:
        connection = self.connection._proxied
        self.sync_transaction = self._assign_proxied(
            await greenlet_call(connection.begin_nested if self.nested else connection.begin)
        )
        if is_ctxmanager:
            self.sync_transaction.__enter__()
        return self

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        await greenlet_call(self._proxied.__exit__, type_, value, traceback)


class CoreAsyncEngine(AsyncEngine):
    """``AsyncEngine`` whose connections are :class:`CoreAsyncConnection`."""

    __slots__ = ()

    _connection_cls = CoreAsyncConnection

    @classmethod
    def _regenerate_proxy_for_target(cls, target: Engine, **additional_kw: Any) -> CoreAsyncEngine:
        return cls(target)

    def execution_options(self, **opt: Any) -> CoreAsyncEngine:
        return CoreAsyncEngine(self.sync_engine.execution_options(**opt))
