"""The retry policy without a server: which errors are retried, the backoff's bounds (full
jitter under a doubling window), the attempt cap, and the caller's deadline as a stop."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState

from poolwarden import (
    CircuitOpen,
    CommitOutcomeUnknown,
    ConfigurationError,
    ConnectionFailed,
    DeadlineExceeded,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    deadline,
)
from poolwarden.protect.retry import RetryPolicy, call_with_retry, retryable
from poolwarden.protect.sa_transactions import driver_error

NODE = "primary"

# Errors that say the server rolled back and a rerun may succeed.
ROLLED_BACK = [asyncpg.SerializationError("could not serialize"),
               asyncpg.DeadlockDetectedError("deadlock detected")]
# Errors that say the connection is gone.
LOST = [asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        asyncpg.InternalClientError("protocol out of step"),
        ConnectionResetError("reset by peer"),
        BrokenPipeError("broken pipe")]
# Errors that must never be retried, whatever the attempt got to.
NEVER = [PoolTimeout("no connection available", node=NODE, state=None, waited_s=1.0),
         DeadlineExceeded("deadline passed", node=NODE, state=None, waited_s=0.3),
         PoolExhausted("queue full", node=NODE, retry_after_s=0.5),
         CircuitOpen("breaker open", node=NODE, retry_after_s=1.0),
         PoolClosed("pool closed", node=NODE),
         CommitOutcomeUnknown("lost during COMMIT", node=NODE),
         asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
         TimeoutError(),
         asyncpg.UniqueViolationError("duplicate key value"),
         asyncpg.ForeignKeyViolationError("violates foreign key constraint"),
         asyncpg.PostgresSyntaxError("syntax error at or near"),
         asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
         ValueError("the work's own bug")]

PROGRESS = [pytest.param(read_only, commit_sent, id=f"read_only={read_only}-sent={commit_sent}")
            for read_only in (False, True) for commit_sent in (False, True)]


def name(exc: BaseException) -> str:
    return type(exc).__name__


@pytest.mark.parametrize("exc", ROLLED_BACK, ids=name)
@pytest.mark.parametrize(("read_only", "commit_sent"), PROGRESS)
def test_serialization_failure_and_deadlock_are_retried_even_when_commit_answered_them(
    exc: BaseException, read_only: bool, commit_sent: bool
) -> None:
    """The server answered with 40001/40P01 and rolled back: a rerun is safe at any stage."""
    assert retryable(exc, read_only=read_only, commit_sent=commit_sent)


@pytest.mark.parametrize("exc", LOST, ids=name)
def test_connection_loss_is_retried_only_before_commit_was_sent_unless_read_only(
    exc: BaseException,
) -> None:
    """A lost connection before COMMIT went out rolled back; after it, only a read-only
    transaction may run again (it wrote nothing)."""
    assert retryable(exc, read_only=False, commit_sent=False)
    assert not retryable(exc, read_only=False, commit_sent=True)
    assert retryable(exc, read_only=True, commit_sent=True)


def test_a_failed_connect_is_retried_since_nothing_was_sent() -> None:
    """A connection that could not be opened carried no statement."""
    assert retryable(ConnectionFailed("cannot connect", node=NODE), read_only=False,
                     commit_sent=False)


@pytest.mark.parametrize("exc", NEVER, ids=name)
@pytest.mark.parametrize(("read_only", "commit_sent"), PROGRESS)
def test_refusals_timeouts_and_sql_errors_are_never_retried(
    exc: BaseException, read_only: bool, commit_sent: bool
) -> None:
    """Pool refusals and timeouts (the budget is spent, or retrying adds load), an unknown
    commit outcome, cancelled statements and ordinary SQL errors: final."""
    assert not retryable(exc, read_only=read_only, commit_sent=commit_sent)


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt()], ids=name)
def test_cancellation_and_interrupts_are_never_retried(exc: BaseException) -> None:
    """Not even when the connection is known lost before COMMIT: they are not failures."""
    assert not retryable(exc, read_only=True, commit_sent=False, connection_lost=True)


def test_a_caller_that_saw_the_connection_close_can_say_so() -> None:
    """asyncpg raises a plain InterfaceError for a statement on a connection that already
    closed; the caller that checked ``conn.is_closed()`` passes ``connection_lost=True``."""
    closed = asyncpg.InterfaceError("cannot perform operation: connection is closed")
    assert not retryable(closed, read_only=False, commit_sent=False)
    assert retryable(closed, read_only=False, commit_sent=False, connection_lost=True)
    assert not retryable(closed, read_only=False, commit_sent=True, connection_lost=True)


def test_sqlalchemy_wrappers_are_unwrapped_to_the_driver_error() -> None:
    """``DBAPIError.orig`` and the adapter's ``__cause__`` lead to asyncpg's error."""
    root = asyncpg.SerializationError("could not serialize")
    wrapped = DBAPIError("COMMIT", None, root)
    assert driver_error(wrapped) is root
    assert retryable(driver_error(wrapped), read_only=False, commit_sent=True)
    plain = TimeoutError()
    assert driver_error(plain) is plain


# ------------------------------------------------------------------ policy and loop


def test_default_policy_is_valid_and_frozen() -> None:
    """The defaults (3 attempts, 50 ms doubling to 1 s) validate; a policy is immutable."""
    policy = RetryPolicy()
    assert (policy.attempts, policy.initial_backoff_s, policy.max_backoff_s) == (3, 0.05, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 5  # type: ignore[misc]


def test_invalid_policy_names_every_bad_field_at_once() -> None:
    """Every invalid field is reported in one ConfigurationError, named ``retry.<field>``."""
    with pytest.raises(ConfigurationError) as failed:
        RetryPolicy(attempts=0, initial_backoff_s=-1.0, max_backoff_s=float("nan"))
    assert [p.variable for p in failed.value.problems] == [
        "retry.attempts", "retry.initial_backoff_s", "retry.max_backoff_s"]
    with pytest.raises(ConfigurationError) as failed:
        RetryPolicy(attempts=True, initial_backoff_s=2.0, max_backoff_s=1.0)
    assert [p.variable for p in failed.value.problems] == ["retry.attempts",
                                                           "retry.max_backoff_s"]


def sleeper(record: list[float]) -> Callable[[float], Awaitable[None]]:
    async def sleep(seconds: float) -> None:
        record.append(seconds)
    return sleep


async def test_attempt_cap_bounds_the_runs_and_each_sleep_stays_in_its_doubling_window() -> None:
    """6 attempts in all, 5 sleeps; the n-th sleep is in [0, min(max, initial * 2**(n-1))];
    the last error is raised unchanged."""
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.01, max_backoff_s=0.04)
    sleeps: list[float] = []
    errors: list[Exception] = []

    async def attempt() -> None:
        errors.append(asyncpg.SerializationError(f"attempt {len(errors) + 1}"))
        raise errors[-1]

    with pytest.raises(asyncpg.SerializationError) as failed:
        await call_with_retry(attempt, policy, retry_if=lambda e: True,
                              sleep=sleeper(sleeps))
    assert failed.value is errors[-1]
    assert len(errors) == 6
    windows = [0.01, 0.02, 0.04, 0.04, 0.04]
    assert [policy.backoff_window_s(n) for n in range(1, 6)] == windows
    assert len(sleeps) == 5
    assert all(0 <= s <= w for s, w in zip(sleeps, windows, strict=True))


def test_backoff_is_full_jitter_over_the_whole_window() -> None:
    """Draws spread over [0, window], not bunched near the window (full jitter)."""
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0)
    retrying = policy.retrying(lambda e: True)
    state = RetryCallState(retrying, fn=None, args=(), kwargs={})
    state.attempt_number = 3  # window 0.4
    draws = [retrying.wait(state) for _ in range(2000)]
    assert all(0 <= d <= 0.4 for d in draws)
    assert min(draws) < 0.02
    assert max(draws) > 0.38


async def test_success_after_retries_returns_the_result() -> None:
    """Two retryable failures, then success: the result comes back from the third run."""
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return "done"

    result = await call_with_retry(attempt, RetryPolicy(attempts=3), retry_if=lambda e: True,
                                   sleep=sleeper([]))
    assert (result, calls) == ("done", 3)


@pytest.mark.parametrize("exc", [asyncpg.UniqueViolationError("dup"), asyncio.CancelledError()],
                         ids=name)
async def test_rejected_errors_and_cancellation_leave_after_one_run_without_sleeping(
    exc: BaseException,
) -> None:
    """An error the classifier rejects, or a cancellation, ends the loop at once."""
    sleeps: list[float] = []
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise exc

    with pytest.raises(type(exc)):
        await call_with_retry(
            attempt, RetryPolicy(attempts=5),
            retry_if=lambda e: retryable(e, read_only=False, commit_sent=False),
            sleep=sleeper(sleeps),
        )
    assert (calls, sleeps) == (1, [])


async def test_no_policy_means_one_run() -> None:
    """``policy=None``: one run, even for an error that would be retried."""
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.SerializationError("could not serialize")

    with pytest.raises(asyncpg.SerializationError):
        await call_with_retry(attempt, None, retry_if=lambda e: True)
    assert calls == 1


def test_the_stop_reads_the_callers_deadline() -> None:
    """Stop when the drawn sleep would reach the deadline; no deadline, no such stop."""
    policy = RetryPolicy(attempts=100)
    retrying = policy.retrying(lambda e: True)
    state = RetryCallState(retrying, fn=None, args=(), kwargs={})
    state.upcoming_sleep = 0.2
    assert not retrying.stop(state)
    with deadline(10):
        assert not retrying.stop(state)
    with deadline(0.1):
        assert retrying.stop(state)
    state.attempt_number = 100
    assert retrying.stop(state)  # the attempt cap


async def test_the_deadline_bounds_the_retries_in_real_time() -> None:
    """With a cap of 1000 the loop still ends before a 0.3 s deadline: no sleep is started
    that would end past it, and the last error is raised."""
    policy = RetryPolicy(attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05)
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.SerializationError("could not serialize")

    started = time.monotonic()
    with pytest.raises(asyncpg.SerializationError):
        async with deadline(0.3):
            await call_with_retry(attempt, policy, retry_if=lambda e: True)
    elapsed = time.monotonic() - started
    assert elapsed < 0.3 + 0.05
    assert 2 <= calls < 1000
