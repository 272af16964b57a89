"""Safe retry: which failures may be retried, and the loop that retries them.

A retry is safe only when the failed attempt cannot have changed anything:

- nothing was sent: a new connection could not be opened (:class:`ConnectionFailed`);
- the server rolled the transaction back and says that running it again may succeed:
  serialization failure (SQLSTATE ``40001``) and deadlock (``40P01``);
- the connection died before ``COMMIT`` was sent (the server rolls back the open
  transaction of a session that ends), or during read-only work at any point.

Never retried: a connection lost after ``COMMIT`` was sent (the transaction may have
committed; callers get :class:`~poolwarden.errors.CommitOutcomeUnknown`); timeouts, cancelled
statements and the pool's own refusals (the caller's budget is spent, or the node is
overloaded and a retry would add load where there is none to spare); every other SQL error
(a constraint violation or a syntax error does not go away by trying again).

The loop is tenacity's ``AsyncRetrying``: stop after ``attempts`` or when the next backoff
would end past the caller's deadline (:func:`poolwarden.deadline.remaining`), wait with full
jitter (``wait_random_exponential``: uniform in ``[0, window]``, the window doubling from
``initial_backoff_s`` up to ``max_backoff_s``), retry when our classifier says so, and
re-raise the last error unchanged. Why tenacity: it is already a dependency and each of those
pieces is one of its building blocks; its ``sleep=`` is injectable, so policy tests never
sleep; and the stop condition is an ordinary object that reads our deadline. stamina is a
thin, opinionated layer over tenacity: its backoff adds bounded jitter to an exponential
delay instead of full jitter, its time budget is a fixed number of seconds per call rather
than the caller's (context) deadline, and tests switch waiting off globally rather than
injecting a sleep — exactly the knobs we need. A hand-written loop would be short, but it
would be one more loop to get right under cancellation; tenacity's is well tested.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from ..deadline import remaining
from ..errors import ConfigProblem, ConfigurationError, ConnectionFailed, PoolError
from ..pool._driver import is_connection_lost

__all__ = [
    "RETRYABLE_SQLSTATES",
    "RetryPolicy",
    "call_with_retry",
    "retryable",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})
"""SQLSTATEs after which the server has rolled the transaction back and a rerun may succeed."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry: at most ``attempts`` runs in all (1 = never
    retry), sleeping between them a random time in ``[0, window]``, where the window is
    ``initial_backoff_s`` after the first failure and doubles after each one up to
    ``max_backoff_s`` ("full jitter": retries of many callers spread out instead of
    arriving together). Raises :class:`ConfigurationError` naming every invalid field."""

    attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigurationError(problems)

    def backoff_window_s(self, failures: int) -> float:
        """The longest sleep after the ``failures``-th failed attempt (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (failures - 1))

    def retrying(
        self, retry_if: Callable[[BaseException], bool], *, sleep: Sleep = asyncio.sleep
    ) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this policy: stops at the attempt cap or when the
        next sleep would end past the caller's deadline; re-raises the last error as is."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts) | _StopBeforeDeadline(self),
            wait=wait_random_exponential(multiplier=self.initial_backoff_s,
                                         max=self.max_backoff_s),
            retry=retry_if_exception(retry_if),
            sleep=sleep,
            reraise=True,
            before_sleep=_log_retry,
        )


def _problems(policy: RetryPolicy) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    attempts: object = policy.attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        problems.append(ConfigProblem("retry.attempts", "must be an integer >= 1", repr(attempts)))
    backoffs = (("initial_backoff_s", policy.initial_backoff_s),
                ("max_backoff_s", policy.max_backoff_s))
    valid = True
    for name, value in backoffs:
        if not _is_seconds(value):
            valid = False
            problems.append(ConfigProblem(f"retry.{name}", "must be a finite number of "
                                          "seconds >= 0", repr(value)))
    if valid and policy.max_backoff_s < policy.initial_backoff_s:
        problems.append(ConfigProblem("retry.max_backoff_s", "must be >= retry.initial_backoff_s",
                                      repr(policy.max_backoff_s)))
    return problems


def _is_seconds(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value) and value >= 0)


def retryable(
    exc: BaseException, *, read_only: bool, commit_sent: bool,
    connection_lost: bool | None = None,
) -> bool:
    """Whether the work that failed with ``exc`` may safely run again.

    ``read_only``: the work wrote nothing (a read-only transaction). ``commit_sent``: the
    failure came after ``COMMIT`` went out (for a statement outside a transaction, which
    commits by itself: after the statement went out). ``connection_lost`` overrides the
    classification of ``exc`` as a lost connection, for callers that know more (the
    connection turned out closed); by default it is :func:`is_connection_lost`.
    """
    if not isinstance(exc, Exception):
        return False  # cancellation and interpreter exit are never retried
    if isinstance(exc, PoolError):
        # Only a failed connect sent nothing and spent no budget on a refusal; timeouts,
        # deadlines, a full queue, an open circuit, a closed pool and an unknown commit
        # outcome are all final.
        return isinstance(exc, ConnectionFailed)
    # Before the connection-loss test: TimeoutError is an OSError, which counts as lost.
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return False
    if getattr(exc, "sqlstate", None) in RETRYABLE_SQLSTATES:
        return True  # the server answered and rolled back, even when it answered COMMIT
    lost = is_connection_lost(exc) if connection_lost is None else connection_lost
    return lost and (read_only or not commit_sent)


async def call_with_retry(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy | None,
    *,
    retry_if: Callable[[BaseException], bool],
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Run ``attempt()`` until it returns, ``retry_if`` rejects its error, ``policy.attempts``
    runs are spent, or the next backoff would end past the caller's deadline; return its
    result or raise its last error unchanged. ``policy=None``: one run, no retry."""
    if policy is None:
        return await attempt()
    return cast(T, await policy.retrying(retry_if, sleep=sleep)(attempt))


class _StopBeforeDeadline(stop_base):
    """Stop when the sleep before the next attempt would reach the caller's deadline: that
    attempt could only fail with a timeout, and the caller is better served by the real
    error now. No deadline: never stops."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, retry_state: RetryCallState) -> bool:
        left = remaining()
        if left is None:
            return False
        # tenacity >= 8.3 draws the sleep before asking the stop; older ones do not, and
        # then the longest possible sleep decides.
        upcoming: Any = getattr(retry_state, "upcoming_sleep", None)
        if not isinstance(upcoming, int | float):
            upcoming = self._policy.backoff_window_s(retry_state.attempt_number)
        return bool(upcoming >= left)


def _log_retry(retry_state: RetryCallState) -> None:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    logger.debug("poolwarden: attempt %d failed (%s); retrying in %.0f ms",
                 retry_state.attempt_number, type(error).__name__,
                 getattr(retry_state, "upcoming_sleep", 0.0) * 1000)
