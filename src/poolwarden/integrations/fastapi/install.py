"""One call that wires poolwarden into a FastAPI application (besides the lifespan)."""

from __future__ import annotations

from fastapi import FastAPI

from .disconnect import CancelOnDisconnectMiddleware
from .errors import add_exception_handlers
from .middleware import DEFAULT_DEADLINE_HEADER, DeadlineMiddleware
from .routes import HealthRoutes, health_router

__all__ = ["install"]


def install(
    app: FastAPI,
    *,
    routes: HealthRoutes | None = None,
    health: bool = True,
    default_deadline_s: float | None = None,
    deadline_header: str | None = DEFAULT_DEADLINE_HEADER,
    deadlines: bool = True,
    cancel_on_disconnect: bool = True,
    exception_handlers: bool = True,
) -> FastAPI:
    """Add poolwarden's routes, exception handlers and middleware to ``app``; returns it.

    - ``routes`` / ``health``: where the health, pool and metrics routes go
      (:class:`HealthRoutes`; default paths), or ``health=False`` for none;
    - ``default_deadline_s`` / ``deadline_header`` / ``deadlines``: the request deadline
      middleware (:class:`DeadlineMiddleware`): the application's default budget, the
      caller's budget header, or ``deadlines=False`` for no middleware;
    - ``cancel_on_disconnect``: cancel a request's work when its client goes away
      (:class:`CancelOnDisconnectMiddleware`);
    - ``exception_handlers``: database errors → 503/409/500 JSON (:mod:`.errors`).

    Call it before the application starts (middleware cannot be added afterwards). The
    lifespan is separate: ``FastAPI(lifespan=poolwarden.fastapi.lifespan(...))``.
    """
    if health:
        app.include_router(health_router(routes))
    if exception_handlers:
        add_exception_handlers(app)
    if deadlines:
        app.add_middleware(
            DeadlineMiddleware, header=deadline_header, default_s=default_deadline_s
        )
    if cancel_on_disconnect:
        # Added last, so outermost: a disconnect cancels everything inside, deadlines included.
        app.add_middleware(CancelOnDisconnectMiddleware)
    return app
