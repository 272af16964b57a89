"""FastAPI dependencies as ``Annotated`` types: sessions, a raw connection, the database.

::

    @app.post("/users")
    async def create_user(body: UserIn, session: WriteSession) -> UserOut: ...

    @app.get("/users/{id}")
    async def get_user(id: int, session: ReadSession) -> UserOut: ...

    @app.get("/report")
    async def report(conn: Connection) -> list[Row]: ...

Release happens when the endpoint returns, not after the response is sent: the dependencies
are declared with FastAPI's ``scope="function"``, whose exit code runs as soon as the
endpoint (and the serialisation of its return value) is done. Without it (FastAPI's default,
``scope="request"``), a ``StreamingResponse`` would keep the connection checked out — and a
transaction open — for as long as a slow client takes to read it. So: fetch what a stream
needs before returning it; the stream itself must not use the session.

- :data:`WriteSession`: an ``AsyncSession`` that commits when the endpoint returns normally
  and rolls back when it raises (``HTTPException`` included) or is cancelled (client
  disconnect, shutdown). The commit runs before the response is sent: a failed commit is an
  error answer, never a 200.
- :data:`ReadSession`: for reads. It asks for ``read_only`` work, which the topology layer
  will route to a replica; today the primary serves it.
- :data:`Connection`: a raw ``asyncpg`` connection (the fastest path), released on return;
  use ``async with conn.transaction():`` for atomic work.
- :data:`DatabaseDep`: the application's :class:`~poolwarden.database.Database`.

All of them acquire within the request's deadline (the pool core reads it from the context
the deadline middleware sets) and raise the errors of :mod:`poolwarden.errors`, which the
exception handlers turn into 503s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ...database import Database
from ...pool import PooledConnection
from ._state import state_of

__all__ = [
    "Connection",
    "DatabaseDep",
    "ReadSession",
    "WriteSession",
    "get_database",
    "raw_connection",
    "read_session",
    "write_session",
]


def get_database(request: Request) -> Database:
    """The application's database (raises ``RuntimeError`` without the poolwarden lifespan)."""
    return state_of(request).database


async def write_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session that commits on success and rolls back on error or cancellation."""
    async with state_of(request).database.session() as session:
        yield session


async def read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session for reads (``read_only``: replicas may serve it once routing exists)."""
    async with state_of(request).database.session(read_only=True) as session:
        yield session


async def raw_connection(request: Request) -> AsyncIterator[PooledConnection]:
    """A pooled asyncpg connection for the endpoint, released when it returns."""
    async with state_of(request).database.connection() as conn:
        yield conn


WriteSession = Annotated[AsyncSession, Depends(write_session, scope="function")]
"""An ``AsyncSession``: commit on success, rollback on error; released when the endpoint returns."""

ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
"""An ``AsyncSession`` for reads (``read_only``); released when the endpoint returns."""

Connection = Annotated[PooledConnection, Depends(raw_connection, scope="function")]
"""A raw asyncpg connection; released when the endpoint returns."""

DatabaseDep = Annotated[Database, Depends(get_database)]
"""The application's :class:`~poolwarden.database.Database`."""
