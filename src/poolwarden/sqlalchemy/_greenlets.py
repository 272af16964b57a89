"""Sync SQLAlchemy calls run on kept greenlets.

SQLAlchemy's asyncio layer runs each call into its sync core (an ``execute``, a ``commit``, a
``close``) in a greenlet it creates for that call (``greenlet_spawn``). On Python 3.11 and
later a greenlet's first run maps a fresh chunk of memory for its frames and its end unmaps
it: two system calls and page faults per call, ~7 µs here, more than the Python work of a
checkout. :func:`greenlet_call` runs the call on a greenlet kept from an earlier call
instead, with the same protocol otherwise: ``sqlalchemy.util.await_`` inside it hands an
awaitable to the calling task, which awaits it and hands back the result, or throws the
exception in (a cancellation included); the call's own result or exception is the caller's.
The call runs in the calling task's ``contextvars`` context, as with ``greenlet_spawn``.

A kept greenlet waits between calls at the top of its loop, holding nothing of the last
call. At most :data:`KEPT` wait per thread; one more is left to end (garbage collection
ends a greenlet by throwing ``GreenletExit`` into it, which leaves its loop). A call that
never comes back (its task abandoned while awaiting) keeps its greenlet, which is not
reused.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from greenlet import GreenletExit, getcurrent, greenlet  # type: ignore[import-untyped]

__all__ = ["KEPT", "greenlet_call"]

_T = TypeVar("_T")
_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]  # fn, args, kwargs

KEPT = 64
"""The most idle greenlets kept per thread (about the number of calls in flight at once)."""


class _Outcome:
    """What a call came to."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error


_DONE = object()  # handed to the caller instead of an awaitable: the outcome is ready


class _Worker(greenlet):  # type: ignore[misc]  # greenlet's class is not typed for subclassing
    # What sqlalchemy.util.await_ (and in_greenlet) look for to accept a greenlet as theirs.
    __sqlalchemy_greenlet_provider__ = True

    def __init__(self) -> None:
        super().__init__(self._serve)
        # set by the caller before each switch in, taken back after: nothing of a call stays
        # referenced from an idle greenlet
        self.call: _Call | None = None
        self.outcome: _Outcome | None = None

    def _serve(self) -> None:
        while True:
            fn, args, kwargs = cast(_Call, self.call)
            self.call = None
            try:
                self.outcome = _Outcome(fn(*args, **kwargs), None)
            except GreenletExit:
                raise
            except BaseException as exc:  # the caller's, cancellation included
                self.outcome = _Outcome(None, exc)
            del fn, args, kwargs
            self.parent.switch(_DONE)


class _Kept(threading.local):
    def __init__(self) -> None:
        self.idle: list[_Worker] = []


_kept = _Kept()


async def greenlet_call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` where ``sqlalchemy.util.await_`` may be called (in a kept
    greenlet): what ``sqlalchemy.util.greenlet_spawn`` does, without a greenlet per call."""
    idle = _kept.idle
    worker = idle.pop() if idle else _Worker()
    driver = getcurrent()
    worker.parent = driver
    worker.gr_context = driver.gr_context
    worker.call = (fn, args, kwargs)
    step = worker.switch()
    while step is not _DONE:
        try:
            value = await step
        except BaseException:
            step = worker.throw(*sys.exc_info())
        else:
            step = worker.switch(value)
    outcome = cast(_Outcome, worker.outcome)
    worker.outcome = worker.gr_context = None
    if len(idle) < KEPT:
        idle.append(worker)
    if outcome.error is not None:
        try:
            raise outcome.error
        finally:
            del outcome
    return cast(_T, outcome.value)
