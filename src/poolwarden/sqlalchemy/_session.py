"""The ``AsyncSession`` of :func:`~poolwarden.sqlalchemy.session_factory`: SQLAlchemy's, with
its calls into the sync ORM run on kept greenlets (:mod:`._greenlets`) rather than on a
greenlet created per call.

Covered: ``execute`` / ``scalar`` / ``scalars``, ``get`` / ``get_one``, ``flush``,
``commit``, ``rollback``, ``close``, ``refresh``, ``merge``, ``delete``, ``run_sync`` and the
transaction objects of ``session.begin()`` / ``begin_nested()``. The rest is SQLAlchemy's
own. The exit of ``async with session:`` stays SQLAlchemy's (the close in a task of its own,
finished even when the caller is cancelled): a session's close ends its connections one by
one, and an interrupted one could leave a connection unreturned until garbage collection.
The close leaves the root rollback of the connections the session checked out to the core,
behind their release (savepoints still open are rolled back first, by SQLAlchemy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction
from sqlalchemy.ext.asyncio.result import _ensure_sync_result
from sqlalchemy.ext.asyncio.session import _EXECUTE_OPTIONS
from sqlalchemy.util import EMPTY_DICT, immutabledict

from ._greenlets import greenlet_call
from ._pool import closing

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Result
    from sqlalchemy.sql.base import Executable

__all__ = ["CoreAsyncSession", "CoreAsyncSessionTransaction"]

_T = TypeVar("_T")


def _buffered(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """The execution options of a buffered ORM execution (what AsyncSession adds)."""
    return immutabledict(options).union(_EXECUTE_OPTIONS) if options else _EXECUTE_OPTIONS


class CoreAsyncSession(AsyncSession):
    """``AsyncSession`` whose calls run on kept greenlets."""

    async def execute(
        self,
        statement: Executable,
        params: Any = None,
        *,
        execution_options: Mapping[str, Any] = EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Result[Any]:
        result = await greenlet_call(
            self.sync_session.execute, statement, params=params,
            execution_options=_buffered(execution_options), bind_arguments=bind_arguments,
            **kw,
        )
        return await _ensure_sync_result(result, self.execute)

    async def scalar(
        self,
        statement: Executable,
        params: Any = None,
        *,
        execution_options: Mapping[str, Any] = EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Any:
        return await greenlet_call(
            self.sync_session.scalar, statement, params=params,
            execution_options=_buffered(execution_options), bind_arguments=bind_arguments,
            **kw,
        )

    async def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        return await greenlet_call(self.sync_session.get, entity, ident, **kw)

    async def get_one(self, entity: Any, ident: Any, **kw: Any) -> Any:
        return await greenlet_call(self.sync_session.get_one, entity, ident, **kw)

    async def refresh(
        self, instance: object, attribute_names: Any = None, with_for_update: Any = None
    ) -> None:
        await greenlet_call(
            self.sync_session.refresh, instance, attribute_names=attribute_names,
            with_for_update=with_for_update,
        )

    async def merge(self, instance: _T, **kw: Any) -> _T:
        return await greenlet_call(self.sync_session.merge, instance, **kw)

    async def delete(self, instance: object) -> None:
        await greenlet_call(self.sync_session.delete, instance)

    async def flush(self, objects: Any = None) -> None:
        await greenlet_call(self.sync_session.flush, objects=objects)

    async def commit(self) -> None:
        await greenlet_call(self.sync_session.commit)

    async def rollback(self) -> None:
        await greenlet_call(self.sync_session.rollback)

    async def close(self) -> None:
        session = self.sync_session
        transaction = session.get_transaction()
        if transaction is not None:
            # The connections the session checked out itself end with this close: their
            # transactions are rolled back by the core after release.
            for connection, _, _, owned in transaction._connections.values():
                if owned:
                    closing(connection)
        await greenlet_call(session.close)

    async def run_sync(self, fn: Callable[..., _T], *arg: Any, **kw: Any) -> _T:
        return await greenlet_call(fn, self.sync_session, *arg, **kw)

    def begin(self) -> CoreAsyncSessionTransaction:
        return CoreAsyncSessionTransaction(self)

    def begin_nested(self) -> CoreAsyncSessionTransaction:
        return CoreAsyncSessionTransaction(self, nested=True)


class CoreAsyncSessionTransaction(AsyncSessionTransaction):
    """``AsyncSessionTransaction`` whose calls run on kept greenlets."""

    async def rollback(self) -> None:
        await greenlet_call(self._sync_transaction().rollback)

    async def commit(self) -> None:
        await greenlet_call(self._sync_transaction().commit)

    async def start(self, is_ctxmanager: bool = False) -> CoreAsyncSessionTransaction:
        session = self.session.sync_session
        self.sync_transaction = self._assign_proxied(
            await greenlet_call(session.begin_nested if self.nested else session.begin)
        )
        if is_ctxmanager:
            self.sync_transaction.__enter__()
        return self

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        await greenlet_call(self._sync_transaction().__exit__, type_, value, traceback)
