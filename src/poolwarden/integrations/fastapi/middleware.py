"""Request deadlines: the time budget of each request feeds :mod:`poolwarden.deadline`.

:class:`DeadlineMiddleware` is a pure ASGI middleware (not ``BaseHTTPMiddleware``, which
runs the endpoint in another task and buffers streaming: deadlines live in a context
variable, and disconnects must reach the endpoint). For each HTTP request it works out the
budget and runs the rest of the application inside ``deadline(at=...)``, so that every wait
for a connection and every statement of the request ends by then
(:class:`~poolwarden.errors.DeadlineExceeded` → 503).

The budget of a request is the smaller of

- the caller's remaining budget, from a header (default ``X-Request-Timeout``), in seconds
  (``2.5``) or with a unit (``500ms``, ``2s``); a missing, malformed or negative value is
  ignored, ``0`` means "no time left" — a caller propagating its own deadline;
- the service's own limit: the route's (``dependencies=[route_deadline(30)]``) when it has
  one, else the application default (``default_s``); ``None`` means no limit of its own.

Budgets count from the request's arrival at the middleware. The header can only shorten
the service's limit; a route's limit replaces the application default (it may be longer).

Tasks an endpoint creates inherit the request's deadline. Work meant to outlive the request
(a background job) gives itself its own budget with ``deadline(..., replace=True)`` or runs
under ``no_deadline()`` (see :mod:`poolwarden.deadline`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ...deadline import deadline
from ...settings import parse_duration

__all__ = [
    "BUDGET_SCOPE_KEY",
    "DEFAULT_DEADLINE_HEADER",
    "DeadlineMiddleware",
    "RequestBudget",
    "budget_expired",
    "route_deadline",
]

DEFAULT_DEADLINE_HEADER = "X-Request-Timeout"
BUDGET_SCOPE_KEY = "poolwarden.budget"
"""The ASGI scope key holding the request's :class:`RequestBudget` (an extension key)."""


@dataclass(slots=True)
class RequestBudget:
    """The time budget of one request. Instants are ``time.monotonic()`` seconds.

    ``client_s``: the caller's budget from the header (``None`` when absent or invalid).
    ``limit_s``: the service's own limit in force (route or application default).
    ``at``: the deadline in force, the earlier of the two, ``None`` when neither is set.
    """

    started_at: float
    client_s: float | None
    limit_s: float | None

    @property
    def at(self) -> float | None:
        ends = [self.started_at + s for s in (self.client_s, self.limit_s) if s is not None]
        return min(ends) if ends else None

    def expired(self, now: float | None = None) -> bool:
        """Whether the deadline in force has passed (``False`` when there is none)."""
        at = self.at
        return at is not None and (time.monotonic() if now is None else now) >= at


def budget_expired(scope: Scope) -> bool:
    """Whether the request of ``scope`` has run out of its budget (``False`` without one)."""
    budget = scope.get(BUDGET_SCOPE_KEY)
    return isinstance(budget, RequestBudget) and budget.expired()


def parse_budget(raw: str) -> float | None:
    """Seconds in a budget header value (``"2.5"``, ``"500ms"``); ``None`` when it is not a
    duration or is negative — a bad header is ignored rather than failing the request."""
    try:
        seconds = parse_duration(raw)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class DeadlineMiddleware:
    """Pure ASGI middleware: runs each HTTP request inside its deadline (module docstring).

    ``header``: the name of the caller's budget header (``None``: no header is read).
    ``default_s``: the application's own limit for requests whose route sets none
    (``None``: no limit of its own).
    """

    def __init__(
        self, app: ASGIApp, *, header: str | None = DEFAULT_DEADLINE_HEADER,
        default_s: float | None = None,
    ) -> None:
        if default_s is not None and not default_s > 0:
            raise ValueError(f"default_s must be > 0 seconds or None, got {default_s!r}")
        self.app = app
        self.header = header.lower().encode("latin-1") if header else None
        self.default_s = default_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = RequestBudget(time.monotonic(), self._client_budget(scope), self.default_s)
        scope[BUDGET_SCOPE_KEY] = budget
        at = budget.at
        if at is None:
            await self.app(scope, receive, send)
            return
        with deadline(at=at):
            await self.app(scope, receive, send)

    def _client_budget(self, scope: Scope) -> float | None:
        if self.header is None:
            return None
        for name, value in scope["headers"]:
            if name == self.header:
                return parse_budget(value.decode("latin-1"))
        return None

    def __repr__(self) -> str:
        header = self.header.decode("latin-1") if self.header else None
        return f"<DeadlineMiddleware header={header!r} default_s={self.default_s}>"


def route_deadline(seconds: float) -> Any:
    """``@app.get(..., dependencies=[route_deadline(30)])``: this route's own limit, in place
    of the application default (a caller's shorter budget still wins).

    Returns a FastAPI ``Depends`` (function scope: the limit ends when the endpoint returns).
    Route dependencies run before the endpoint's own, so sessions and connections of the
    endpoint are bounded by it. Without :class:`DeadlineMiddleware` the limit counts from
    when the dependency runs.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError(f"route_deadline: seconds must be > 0, got {seconds!r}")

    async def apply_route_deadline(request: Request) -> AsyncIterator[None]:
        budget = request.scope.get(BUDGET_SCOPE_KEY)
        if not isinstance(budget, RequestBudget):
            budget = RequestBudget(time.monotonic(), None, None)
            request.scope[BUDGET_SCOPE_KEY] = budget
        budget.limit_s = float(seconds)
        at = budget.at
        assert at is not None  # a limit was just set
        # Replaced, not nested: the route's limit may be longer than the application default
        # the middleware applied (nesting can only shorten). The caller's budget is kept in
        # ``budget.at``. Same task and context as the endpoint, so the reset is exact.
        with deadline(at=at, replace=True):
            yield

    return Depends(apply_route_deadline, scope="function")
