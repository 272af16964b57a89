"""FastAPI integration (the ``fastapi`` extra); also importable as :mod:`poolwarden.fastapi`.

::

    from fastapi import FastAPI
    from poolwarden import Database
    from poolwarden.fastapi import ReadSession, WriteSession, install, lifespan

    app = install(FastAPI(lifespan=lifespan(Database.from_env)), default_deadline_s=2.0)

    @app.get("/users/{user_id}")
    async def get_user(user_id: int, session: ReadSession) -> dict[str, object]: ...

- :func:`lifespan` — open the pools warm, monitor them, drain and close on shutdown;
  composes with the application's own lifespan (``then=``).
- :data:`WriteSession`, :data:`ReadSession`, :data:`Connection`, :data:`DatabaseDep` —
  ``Annotated`` dependencies, released as soon as the endpoint returns.
- :func:`install` — health/pool/metrics routes (:class:`HealthRoutes`), exception handlers
  (503 + ``Retry-After``), the request deadline middleware (:class:`DeadlineMiddleware`,
  per route :func:`route_deadline`) and :class:`CancelOnDisconnectMiddleware`.
"""

from ._state import PoolwardenState, state_of
from .dependencies import (
    Connection,
    DatabaseDep,
    ReadSession,
    WriteSession,
    get_database,
    raw_connection,
    read_session,
    write_session,
)
from .disconnect import CancelOnDisconnectMiddleware
from .errors import ErrorAnswer, add_exception_handlers, answer_for, error_response
from .install import install
from .lifespan import lifespan
from .middleware import (
    BUDGET_SCOPE_KEY,
    DEFAULT_DEADLINE_HEADER,
    DeadlineMiddleware,
    RequestBudget,
    route_deadline,
)
from .routes import HealthRoutes, health_router

__all__ = [
    "BUDGET_SCOPE_KEY",
    "DEFAULT_DEADLINE_HEADER",
    "CancelOnDisconnectMiddleware",
    "Connection",
    "DatabaseDep",
    "DeadlineMiddleware",
    "ErrorAnswer",
    "HealthRoutes",
    "PoolwardenState",
    "ReadSession",
    "RequestBudget",
    "WriteSession",
    "add_exception_handlers",
    "answer_for",
    "error_response",
    "get_database",
    "health_router",
    "install",
    "lifespan",
    "raw_connection",
    "read_session",
    "route_deadline",
    "state_of",
    "write_session",
]
