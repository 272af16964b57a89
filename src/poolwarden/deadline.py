"""The caller's deadline: one per task, carried in a context variable.

``async with poolwarden.deadline(0.5):`` (or ``db.deadline(0.5)``, or the FastAPI request
middleware) bounds everything the block does with the database: the wait for a connection,
each statement's client-side timeout, and — inside transactions and sessions — the server's
``statement_timeout``. Deadlines nest: an inner block can only shorten the budget, never
extend it. A task created inside the block inherits the deadline (context variables are
copied into new tasks).

Instants are ``time.monotonic()`` seconds, like every deadline in the pool.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType

_current: ContextVar[float | None] = ContextVar("poolwarden_deadline", default=None)

#: read on hot paths: ``current_deadline()`` is ``_current.get()``
current_deadline = _current.get


def remaining(now: float | None = None) -> float | None:
    """Seconds left before the current deadline (negative once passed), ``None`` if unset."""
    at = _current.get()
    if at is None:
        return None
    return at - (time.monotonic() if now is None else now)


def bounded(timeout: float | None, now: float | None = None) -> float | None:
    """``timeout`` shortened to the time left before the current deadline (if any)."""
    left = remaining(now)
    if left is None:
        return timeout
    return left if timeout is None or left < timeout else timeout


class deadline:
    """Bound the work of the block to ``seconds`` from now (or to the instant ``at``).

    The effective deadline is the earlier of this one and any deadline already in force.
    Works as ``with`` and ``async with``. Re-entering the same object is not allowed.
    """

    __slots__ = ("_token", "at")

    def __init__(self, seconds: float | None = None, *, at: float | None = None) -> None:
        if (seconds is None) == (at is None):
            raise ValueError("deadline: give exactly one of `seconds` or `at=`")
        value = seconds if seconds is not None else at
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"deadline: expected a number of seconds, got {value!r}")
        if seconds is not None and seconds < 0:
            raise ValueError(f"deadline: seconds must be >= 0, got {seconds!r}")
        self.at = time.monotonic() + seconds if seconds is not None else float(value)
        self._token: Token[float | None] | None = None

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def __enter__(self) -> deadline:
        if self._token is not None:
            raise RuntimeError("deadline: this block is already entered")
        outer = _current.get()
        if outer is not None and outer < self.at:
            self.at = outer
        self._token = _current.set(self.at)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)

    async def __aenter__(self) -> deadline:
        return self.__enter__()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, e, tb)

    def __repr__(self) -> str:
        return f"<deadline in {self.remaining() * 1000:.0f} ms>"
