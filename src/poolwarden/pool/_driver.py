"""The boundary with asyncpg: opening connections, classifying errors, restoring state.

Everything that touches asyncpg internals lives here, so that a driver upgrade has one
place to check. The pool hands out :class:`PooledConnection` — a plain asyncpg
``Connection`` subclass with one extra slot — rather than a proxy object: a proxy costs an
attribute lookup on every call, and the Python client is the bottleneck.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import asyncpg

from .._secrets import scrub

if TYPE_CHECKING:
    from ._record import Record
    from .config import PoolConfig


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that belongs to a poolwarden pool.

    Use it exactly like ``asyncpg.Connection``. Do not keep it after releasing it: once
    released it may already serve another task.
    """

    __slots__ = ("_pw_record",)

    _pw_record: Record | None


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


def is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection it came from can no longer be used."""
    return isinstance(exc, _CONNECTION_LOST)


async def open_connection(config: PoolConfig) -> PooledConnection:
    """Open and set up one connection; raises the driver's error (the caller wraps it).

    ``connect_timeout`` bounds the whole handshake and ``command_timeout`` is set on the
    connection, so that a blackholed server can never hang a caller forever. Server
    settings travel in the startup packet: no extra round trip.
    """
    conn: PooledConnection = await asyncpg.connect(
        config.dsn,
        timeout=config.connect_timeout,
        command_timeout=config.command_timeout,
        statement_cache_size=config.statement_cache_size,
        server_settings=config.all_server_settings(),
        ssl=config.ssl,
        connection_class=PooledConnection,
    )
    conn._pw_record = None
    try:
        if config.init is not None:
            async with asyncio.timeout(config.command_timeout):
                await config.init(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def server_started_at(conn: PooledConnection, timeout: float) -> float:
    """The server's start time (epoch seconds): a newer value means the server restarted."""
    started = await conn.fetchval(
        "SELECT extract(epoch FROM pg_postmaster_start_time())::float8", timeout=timeout
    )
    return float(started)


CLEAN, NEEDS_RESTORE, CLOSED = 0, 1, 2


def release_state(conn: PooledConnection) -> int:
    """At release, in one call (this is the hot path): ``CLOSED`` when the connection is
    gone, ``NEEDS_RESTORE`` when a transaction is open or failed or a cancelled query is
    still being cancelled on the server, else ``CLEAN``."""
    protocol = conn._protocol
    if conn._aborted or protocol is None or not protocol.is_connected():
        return CLOSED
    if protocol.is_in_transaction() or conn._top_xact is not None or protocol._is_cancelling():
        return NEEDS_RESTORE
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
            await conn.reset()
        elif protocol.is_in_transaction() or conn._top_xact is not None:
            # A transaction object whose __aexit__ never ran (cancelled task) would make
            # the next user's conn.transaction() a savepoint: forget it, then roll back.
            conn._top_xact = None
            await conn.execute("ROLLBACK")


async def ping(conn: PooledConnection, timeout: float) -> None:
    """One round trip proving the connection and the server are alive; raises if not."""
    await conn.execute("SELECT 1", timeout=timeout)


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

