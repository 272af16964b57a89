"""Every error poolwarden raises: one base class, context on each, driver errors translated.

Errors about a pool carry a :class:`PoolState` — the counts at the moment of failure — and
the node's name, so that an exception in a log is enough to tell an exhausted pool from a
dead server. Messages never contain a password: DSNs are masked before they get here.
"""

from __future__ import annotations

from dataclasses import dataclass


class PoolwardenError(Exception):
    """Base class of every error raised by poolwarden."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One invalid setting: which variable, what was wrong, and the (masked) value given."""

    variable: str
    rule: str
    value: str | None = None

    def __str__(self) -> str:
        given = f" (got {self.value})" if self.value is not None else ""
        return f"{self.variable}: {self.rule}{given}"


class ConfigurationError(PoolwardenError, ValueError):
    """The configuration is invalid. ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{count} invalid setting{'s' if count != 1 else ''}:\n{lines}")


@dataclass(frozen=True, slots=True)
class PoolState:
    """The counts of one pool at one moment, carried by pool errors (all current values)."""

    total: int
    in_use: int
    idle: int
    waiting: int
    max_size: int

    def __str__(self) -> str:
        return (
            f"total={self.total}/{self.max_size} in_use={self.in_use} "
            f"idle={self.idle} waiting={self.waiting}"
        )


class PoolError(PoolwardenError):
    """An error about one pool (one database node).

    ``retry_after_s`` is set on refusals that are safe to retry later (queue full, circuit
    open, overload shed): the pool's estimate of when a retry may succeed, in seconds, for
    an HTTP ``Retry-After`` header. ``None`` when the pool has no estimate.
    """

    def __init__(
        self, message: str, *, node: str, state: PoolState | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.node = node
        self.state = state
        self.retry_after_s = retry_after_s
        suffix = f" [{state}]" if state is not None else ""
        super().__init__(f"pool {node!r}: {message}{suffix}")


class PoolClosed(PoolError):
    """The pool is closed or closing and admits no new work."""


class PoolExhausted(PoolError):
    """Refused at once: the wait queue is full (``max_waiting``). Nothing was sent to the server.

    Safe to retry later; maps to HTTP 503 with ``Retry-After``.
    """


class PoolTimeout(PoolError, TimeoutError):
    """No connection could be had before the acquire timeout or the caller's deadline.

    ``waited_s`` is how long the caller waited. When connections could not be opened, the
    last connection error is chained as ``__cause__``. Nothing was sent to the server.
    """

    def __init__(
        self, message: str, *, node: str, state: PoolState | None, waited_s: float,
        retry_after_s: float | None = None,
    ) -> None:
        self.waited_s = waited_s
        text = f"{message} after waiting {waited_s * 1000:.0f} ms"
        super().__init__(text, node=node, state=state, retry_after_s=retry_after_s)


class StatementTimeout(PoolError, TimeoutError):
    """A statement ran longer than ``command_timeout`` and the pool stopped it: cancelled
    on the server (the connection stays usable), or, when the server did not answer the
    cancel, by closing the connection. The statement's work was not done (inside a
    transaction, the transaction fails). ``running_s``: how long it had run."""

    def __init__(self, message: str, *, node: str, state: PoolState | None,
                 running_s: float) -> None:
        self.running_s = running_s
        super().__init__(message, node=node, state=state)


class DeadlineExceeded(PoolTimeout):
    """The caller's deadline (``db.deadline(...)``, a request budget) ran out: before a
    connection was had (nothing was sent), or while a statement ran (the statement was
    cancelled; inside a transaction, the transaction was rolled back).

    A :class:`PoolTimeout` and a ``TimeoutError``; maps to HTTP 503.
    """


class CircuitOpen(PoolError):
    """Refused at once: the node's circuit breaker is open after repeated connection
    failures. Nothing was sent to the server. ``retry_after_s`` is the time until the
    breaker lets a probe through."""


class CommitOutcomeUnknown(PoolError):
    """The connection was lost after ``COMMIT`` was sent and before its answer came back:
    the transaction may or may not have committed. Never retried automatically; the caller
    must check (e.g. by a unique key) before doing the work again. The driver error is
    chained as ``__cause__``."""


class ConnectionFailed(PoolError):
    """A new connection to the server could not be opened (unreachable, refused, auth, TLS)."""
