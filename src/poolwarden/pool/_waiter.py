"""A caller waiting for a connection (the pool hands one over by setting its future)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._record import Record


class Waiter:
    """One queued acquire. The handoff (``Pool._hand_on``) sets its future's result.

    A waiter that timed out or was cancelled has a done future and is skipped, so the
    releaser hands the connection to the next waiter instead of losing it. A waiter that is
    cancelled *after* being handed one gives the connection back itself
    (``Pool._abandon``).

    The pool fills the fields in when the caller joins the queue (:meth:`Pool._enqueue`):
    ``async with pool.connection()`` queues its block itself (a
    :class:`~poolwarden.pool._checkout.Checkout` is a waiter), so a caller who waits costs
    no object of its own.
    """

    __slots__ = ("deadline", "future", "limit", "since")

    future: asyncio.Future[Record]
    since: float
    deadline: float  # time.monotonic() instant after which it gives up
    # what set that instant: "acquire_timeout", the caller's "deadline", or "shed"
    # (overload admission caps how long a waiter may stay queued)
    limit: str

    def __repr__(self) -> str:
        future = getattr(self, "future", None)
        if future is None:
            return "<Waiter not queued>"
        state = "waiting" if not future.done() else "served_or_abandoned"
        return f"<Waiter {state} since={self.since:.3f}>"
