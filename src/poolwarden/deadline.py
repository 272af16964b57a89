"""The caller's deadline: one per task, carried in a context variable.

``async with poolwarden.deadline(0.5):`` (or ``db.deadline(0.5)``, or the FastAPI request
middleware) bounds everything the block does with the database: the wait for a connection,
each statement's client-side timeout, and — inside transactions and sessions — the server's
``statement_timeout``. Deadlines nest: an inner block can only shorten the budget, never
extend it. Leaving a block, normally or by an exception, restores the deadline that was in
force before it.

A task created inside the block inherits the deadline (context variables are copied into
new tasks). That is right for work the request waits for, and wrong for work that outlives
it: a background job spawned from a request handler would die with the request's budget.
Such work states its own budget explicitly, in place of the one it inherited:

- ``deadline(60, replace=True)`` — the block's deadline is exactly this one, even if it is
  later than the deadline in force (blocks nested inside it shorten it as usual);
- ``no_deadline()`` — the block runs with no deadline at all.

Put the block at the top of the spawned coroutine, or around the ``create_task`` call (the
task's copy of the context is taken there). Replacing is for work that is not the caller's:
inside a request's own work, a plain nested ``deadline`` keeps the caller's budget binding.

Instants are ``time.monotonic()`` seconds, like every deadline in the pool.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Self

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


class _Block:
    """A ``with``/``async with`` block that puts a deadline (or none) in force and restores
    the previous one on exit. Entered at most once at a time. Subclasses set ``_token`` to
    ``None`` and write ``__enter__`` out (entered once per request: no extra calls)."""

    __slots__ = ("_token",)

    _token: Token[float | None] | None

    def _entered_twice(self) -> RuntimeError:
        return RuntimeError(f"{type(self).__name__}: this block is already entered")

    def __enter__(self) -> Self:
        raise NotImplementedError

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, e, tb)


class deadline(_Block):
    """Bound the work of the block to ``seconds`` from now (or to the instant ``at``).

    The effective deadline is the earlier of this one and any deadline already in force;
    with ``replace=True`` it is exactly this one, even if later (module docstring: for work
    that outlives the caller, such as a background job spawned from a request). Works as
    ``with`` and ``async with``. Re-entering the same object is not allowed.

    Raises ``ValueError`` naming the bad value: neither or both of ``seconds`` and ``at``,
    a value that is not a number (or is NaN), negative ``seconds``, a non-bool ``replace``.
    For no deadline at all, use :class:`no_deadline`.
    """

    __slots__ = ("at", "replace")

    def __init__(
        self, seconds: float | None = None, *, at: float | None = None, replace: bool = False
    ) -> None:
        self._token = None
        if seconds is None and at is None:
            raise ValueError(
                "deadline: give exactly one of `seconds` or `at=`, got neither "
                "(for no deadline at all, use no_deadline())"
            )
        if seconds is not None and at is not None:
            raise ValueError(
                f"deadline: give exactly one of `seconds` or `at=`, got seconds={seconds!r} "
                f"and at={at!r}"
            )
        value = seconds if seconds is not None else at
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"deadline: expected a number of seconds, got {value!r}")
        if seconds is not None and seconds < 0:
            raise ValueError(f"deadline: seconds must be >= 0, got {seconds!r}")
        if not isinstance(replace, bool):
            # TRY004: every bad argument of this module is a ValueError, one thing to catch
            raise ValueError(  # noqa: TRY004
                f"deadline: replace must be True or False, got {replace!r}")
        self.at = time.monotonic() + seconds if seconds is not None else float(value)
        self.replace = replace

    def __enter__(self) -> Self:
        if self._token is not None:
            raise self._entered_twice()
        if not self.replace:
            outer = _current.get()
            if outer is not None and outer < self.at:
                self.at = outer
        self._token = _current.set(self.at)
        return self

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def __repr__(self) -> str:
        kind = " (replacing)" if self.replace else ""
        return f"<deadline in {self.remaining() * 1000:.0f} ms{kind}>"


class no_deadline(_Block):
    """Run the block with no deadline at all, whatever deadline is in force outside it.

    For work that must not inherit its caller's budget (module docstring). A ``deadline``
    nested inside the block bounds it again. Works as ``with`` and ``async with``;
    re-entering the same object is not allowed.
    """

    __slots__ = ()

    def __init__(self) -> None:
        self._token = None

    def __enter__(self) -> Self:
        if self._token is not None:
            raise self._entered_twice()
        self._token = _current.set(None)
        return self

    def __repr__(self) -> str:
        return "<no_deadline>"
