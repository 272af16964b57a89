"""Exception handlers: database trouble becomes a short JSON answer, never a 200 or a leak.

The decision is one pure function, :func:`answer_for`, from an exception to an
:class:`ErrorAnswer` (status, stable code, short detail, ``Retry-After``); the handlers only
log and render it. The mapping:

- refusals that are safe to retry — :class:`~poolwarden.errors.PoolExhausted`,
  :class:`~poolwarden.errors.PoolTimeout`, :class:`~poolwarden.errors.CircuitOpen`,
  :class:`~poolwarden.errors.PoolClosed`, :class:`~poolwarden.errors.ConnectionFailed`,
  a lost connection, too many connections, a serialization failure or deadlock, a
  cancelled statement — and an expired request deadline: **503** with ``Retry-After``
  (``error.retry_after_s`` rounded up, at least 1 s; else 1 s);
- an integrity violation (SQLSTATE class 23: unique, foreign key, check): **409**;
- :class:`~poolwarden.errors.CommitOutcomeUnknown`: **500** saying so (never "retry");
- any other database error: **500** ``database_error``.

Bodies are ``{"error": code, "detail": text}`` with fixed texts: no SQL, no DSN, no node
address, no stack. The log line names the route, the answer and the error's type, SQLSTATE
and message with passwords and DSNs masked — never SQLAlchemy's rendering of the
statement and its parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..._secrets import mask_dsn
from ...deadline import remaining
from ...errors import (
    CircuitOpen,
    CommitOutcomeUnknown,
    ConnectionFailed,
    DeadlineExceeded,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    PoolwardenError,
)
from ...pool._driver import describe_error, is_connection_lost
from ._state import STATE_ATTRIBUTE, PoolwardenState
from .middleware import budget_expired

__all__ = ["ErrorAnswer", "add_exception_handlers", "answer_for", "error_response"]

logger = logging.getLogger("poolwarden.fastapi")

DEFAULT_RETRY_AFTER_S = 1
MAX_LOGGED_CHARS = 300
# How deep to look through wrappers (SQLAlchemy's ``orig``, ``__cause__``) for the real error.
MAX_CHAIN = 6

# SQLSTATEs that mean "try again later", not "your request is wrong".
_TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "57014",  # query_canceled (statement_timeout, a cancelled statement)
    "57P01", "57P02", "57P03",  # admin/crash shutdown, cannot connect now
})
_TRANSIENT_CLASSES = ("08", "53")  # connection exceptions; insufficient resources


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """What to answer: HTTP ``status``, a stable machine ``code``, a short human ``detail``,
    and ``retry_after_s`` for a ``Retry-After`` header (``None``: no header)."""

    status: int
    code: str
    detail: str
    retry_after_s: int | None = None

    @property
    def refusal(self) -> bool:
        """A 503: the request was refused or cut short, and may be retried later."""
        return self.status == 503


_DB_ERROR = ErrorAnswer(500, "database_error", "internal database error")
_UNKNOWN_COMMIT = ErrorAnswer(
    500, "commit_outcome_unknown",
    "the write may or may not have been saved; check before trying again",
)
_CONFLICT = ErrorAnswer(409, "conflict", "the request conflicts with existing data")


def _unavailable(detail: str, error: BaseException | None = None) -> ErrorAnswer:
    hint = getattr(error, "retry_after_s", None)
    seconds = DEFAULT_RETRY_AFTER_S
    if isinstance(hint, int | float) and math.isfinite(hint) and hint > 0:
        seconds = max(1, math.ceil(hint))
    return ErrorAnswer(503, "database_unavailable", detail, seconds)


def _deadline(error: BaseException | None = None) -> ErrorAnswer:
    answer = _unavailable("the request's time budget ran out", error)
    return ErrorAnswer(503, "deadline_exceeded", answer.detail, answer.retry_after_s)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps: SQLAlchemy's ``orig`` and the ``__cause__`` chain."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < MAX_CHAIN:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(
            inner for inner in (getattr(current, "orig", None), current.__cause__)
            if isinstance(inner, BaseException)
        )


def answer_for(exc: BaseException, *, deadline_expired: bool = False) -> ErrorAnswer:
    """The answer for ``exc`` (see the module docstring). ``deadline_expired`` says that the
    request's deadline had passed when ``exc`` was raised: a bare ``TimeoutError`` is then
    the deadline's doing. Pure: no I/O, no clock."""
    chain = list(_chain(exc))
    for error in chain:
        if isinstance(error, PoolwardenError):
            return _answer_for_ours(error)
    if any(isinstance(error, TimeoutError) for error in chain):
        # Checked before "connection lost": TimeoutError is an OSError.
        return _deadline() if deadline_expired else _unavailable("database timeout, retry later")
    sqlstate = next((s for e in chain if isinstance(s := getattr(e, "sqlstate", None), str)), "")
    by_state = _answer_for_sqlstate(sqlstate, deadline_expired)
    if by_state is not None:
        return by_state
    if getattr(exc, "connection_invalidated", False) or any(
        is_connection_lost(error) for error in chain
    ):
        return _unavailable("database connection lost, retry later")
    return _DB_ERROR


def _answer_for_sqlstate(sqlstate: str, deadline_expired: bool) -> ErrorAnswer | None:
    if sqlstate.startswith("23"):
        return _CONFLICT
    if sqlstate == "57014" and deadline_expired:
        return _deadline()  # the statement was cancelled because the budget ran out
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_CLASSES):
        return _unavailable("database busy, retry later")
    return None


# Our refusals, most specific first (DeadlineExceeded is a PoolTimeout: handled before).
_REFUSALS: tuple[tuple[type[PoolwardenError], str], ...] = (
    (PoolExhausted, "overloaded, retry later"),
    (PoolTimeout, "overloaded, retry later"),
    (CircuitOpen, "database unavailable, retry later"),
    (PoolClosed, "shutting down, retry later"),
    (ConnectionFailed, "database unreachable, retry later"),
    (PoolError, "database unavailable, retry later"),
)


def _answer_for_ours(error: PoolwardenError) -> ErrorAnswer:
    if isinstance(error, CommitOutcomeUnknown):
        return _UNKNOWN_COMMIT
    if isinstance(error, DeadlineExceeded):
        return _deadline(error)
    for kind, detail in _REFUSALS:
        if isinstance(error, kind):
            return _unavailable(detail, error)
    return _DB_ERROR


def error_response(answer: ErrorAnswer) -> JSONResponse:
    """The JSON response for ``answer``: ``{"error": code, "detail": text}``, with
    ``Retry-After`` when set, and never cached."""
    headers = {"Cache-Control": "no-store"}
    if answer.retry_after_s is not None:
        headers["Retry-After"] = str(answer.retry_after_s)
    return JSONResponse(
        {"error": answer.code, "detail": answer.detail}, status_code=answer.status,
        headers=headers,
    )


def _describe(request: Request, exc: BaseException) -> str:
    """Type, SQLSTATE and message of the innermost driver or poolwarden error, masked."""
    chain = list(_chain(exc))
    inner = next(
        (e for e in chain if isinstance(e, PoolwardenError | asyncpg.PostgresError)), chain[-1]
    )
    state = getattr(request.app.state, STATE_ATTRIBUTE, None)
    if isinstance(state, PoolwardenState):
        text = describe_error(inner, state.database.pool.config)
    else:
        text = mask_dsn(f"{type(inner).__name__}: {inner}")
    sqlstate = getattr(inner, "sqlstate", None)
    if sqlstate:
        text = f"[{sqlstate}] {text}"
    if len(text) > MAX_LOGGED_CHARS:
        text = text[: MAX_LOGGED_CHARS - 1] + "…"
    return text


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for poolwarden, asyncpg and SQLAlchemy DBAPI errors."""
    answer = answer_for(exc, deadline_expired=budget_expired(request.scope))
    # Refusals come in floods under overload and the metrics count them: debug only.
    # Conflicts are the client's doing: info. A 500 is a bug or an outage: error.
    if answer.refusal:
        level = logging.DEBUG
    elif answer.status < 500:
        level = logging.INFO
    else:
        level = logging.ERROR
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s -> %d %s: %s", request.method, request.url.path,
                   answer.status, answer.code, _describe(request, exc))
    return error_response(answer)


async def handle_timeout(request: Request, exc: Exception) -> Response:
    """A bare ``TimeoutError``: a 503 when the request's deadline had passed (it was the
    deadline's doing); otherwise it is not ours to judge, and is raised on."""
    if not (budget_expired(request.scope) or _context_deadline_passed()):
        raise exc
    return await handle_database_error(request, exc)


def _context_deadline_passed() -> bool:
    left = remaining()
    return left is not None and left <= 0


def add_exception_handlers(app: Starlette) -> None:
    """Register the handlers on ``app`` (a FastAPI or Starlette application) for
    :class:`~poolwarden.errors.PoolwardenError`, asyncpg's errors, SQLAlchemy's
    ``DBAPIError`` (when SQLAlchemy is installed) and deadline ``TimeoutError`` s."""
    add = app.add_exception_handler
    for kind in (PoolwardenError, asyncpg.PostgresError, asyncpg.InterfaceError,
                 asyncpg.exceptions.InternalClientError):
        add(kind, handle_database_error)
    try:
        from sqlalchemy.exc import DBAPIError  # noqa: PLC0415 - optional extra
    except ImportError:  # pragma: no cover - the sqlalchemy extra is not installed
        pass
    else:
        add(DBAPIError, handle_database_error)
    add(TimeoutError, handle_timeout)
