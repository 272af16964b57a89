"""``poolwarden.fastapi``: the public name of :mod:`poolwarden.integrations.fastapi`.

This module does not shadow the ``fastapi`` package: imports are absolute, so inside
poolwarden ``import fastapi`` is still FastAPI itself.
"""

from .integrations.fastapi import (
    BUDGET_SCOPE_KEY,
    DEFAULT_DEADLINE_HEADER,
    CancelOnDisconnectMiddleware,
    Connection,
    DatabaseDep,
    DeadlineMiddleware,
    ErrorAnswer,
    HealthRoutes,
    PoolwardenState,
    ReadSession,
    RequestBudget,
    WriteSession,
    add_exception_handlers,
    answer_for,
    error_response,
    get_database,
    health_router,
    install,
    lifespan,
    raw_connection,
    read_session,
    route_deadline,
    state_of,
    write_session,
)

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
