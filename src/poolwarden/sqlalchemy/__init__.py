"""SQLAlchemy on the pool core: an ``AsyncEngine`` whose connections come from a poolwarden
:class:`~poolwarden.pool.Pool`, sessions that commit or roll back, and a sync engine with the
same settings for scripts and migrations.

How the async engine is wired:

- :mod:`._pool`: SQLAlchemy's pool is a :class:`CorePool`, which checks connections out of
  the core and gives them back to it, so that SQLAlchemy checkouts get the core's fairness,
  limits, timeouts, health checks and stats.
- :mod:`._dialect`: the dialect is asyncpg's, its cursor calls under the core's statement
  watchdog and reported to the core's query observer. It leaves the connection's
  ``json``/``jsonb`` codecs as the core set them and decodes JSON itself, so that a
  connection shared with the raw path returns the same values on both paths whichever path
  touched it first.

``engine.dispose()`` forgets SQLAlchemy's per-connection state but does not close the core
or its connections: whoever opened the core closes it. ``Connection.detach()`` is not
supported: the core closes a detached connection (to own a connection, ``pool.acquire()``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ..pool import Pool, PoolConfig
from ._dialect import ASYNC_DRIVERNAME, PoolwardenAsyncpgDialect
from ._engine import CoreAsyncEngine
from ._pool import CorePool
from ._session import CoreAsyncSession

__all__ = [
    "ASYNC_DRIVERNAME",
    "CorePool",
    "PoolwardenAsyncpgDialect",
    "create_async_engine_on",
    "create_sync_engine",
    "session_factory",
    "session_scope",
]

logger = logging.getLogger(__name__)

SYNC_DRIVERNAME = "postgresql+psycopg"

# Engine arguments that configure SQLAlchemy's own pool: on a core they belong to PoolConfig.
_CORE_OWNED = frozenset({
    "pool", "poolclass", "pool_size", "max_overflow", "pool_timeout", "pool_recycle",
    "pool_pre_ping", "pool_use_lifo", "pool_reset_on_return", "creator", "async_creator",
})


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
    engine = create_async_engine(_public_url(pool.config.dsn), pool=sa_pool, **engine_kwargs)
    return CoreAsyncEngine(engine.sync_engine)


def session_factory(engine: AsyncEngine, **kwargs: Any) -> async_sessionmaker[AsyncSession]:
    """An ``async_sessionmaker`` for ``engine`` with ``expire_on_commit=False`` (objects stay
    usable after the commit, which matters in async code where lazy loads cannot happen),
    making :class:`~poolwarden.sqlalchemy._session.CoreAsyncSession` sessions (their calls
    run on kept greenlets) unless ``class_`` says otherwise."""
    kwargs.setdefault("expire_on_commit", False)
    kwargs.setdefault("class_", CoreAsyncSession)
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
