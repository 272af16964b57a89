"""A circuit breaker for one database node: stop sending work to a node that keeps failing.

Pure policy: no I/O, no clock of its own (every method takes ``now``, monotonic seconds), no
locks (the pool calls it from the event loop). The pool asks :meth:`CircuitBreaker.allow`
before it opens a connection or hands one out, and reports each outcome.

States (:class:`BreakerState`):

* ``CLOSED`` — normal. Opens on a run of ``consecutive_failures`` failures (a node that is
  down fails every call, so a run finds it quickly), or when at least ``failure_rate`` of the
  calls in the last ``window_s`` failed, once ``min_calls`` were seen in it (a node that fails
  one call in two never makes a long run).
* ``OPEN`` — every call is refused at once for the open period, then the next ``allow``
  moves to ``HALF_OPEN``. The first period is ``open_s``; each failed probe doubles it, up to
  ``max_open_s``, so a node that stays down is probed less and less often. Each period is
  shortened by up to ``jitter`` (a fraction, drawn once per opening) so that the processes that
  lost the same node do not all probe it in the same instant.
* ``HALF_OPEN`` — up to ``half_open_probes`` calls go through. While half open, any outcome
  reported is taken as a probe's: a success closes the breaker (and resets the period to
  ``open_s``), a failure opens it again for a doubled period.

The window is bucketed (:data:`BUCKETS` buckets of ``window_s / BUCKETS``): recording is O(1)
and the window slides one bucket at a time. Recording a success while closed — done on every
connection release — is a comparison, a counter reset and two increments.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigProblem, ConfigurationError

BUCKETS = 10
"""Buckets in the sliding window: the window's edge moves in steps of a tenth of it."""


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and for how long. Durations in seconds. Raises
    :class:`~poolwarden.errors.ConfigurationError` listing every invalid field."""

    consecutive_failures: int = 5  # a run of this many failures opens it
    failure_rate: float = 0.5  # or this fraction of failures over the window...
    window_s: float = 10.0  # ...a sliding window this long...
    min_calls: int = 20  # ...once at least this many calls were seen in it
    open_s: float = 2.0  # first open period; doubles after each failed probe
    max_open_s: float = 30.0
    half_open_probes: int = 1  # calls let through at once while half open
    jitter: float = 0.1  # each open period is shortened by up to this fraction

    def __post_init__(self) -> None:
        out: list[ConfigProblem] = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                out.append(ConfigProblem(f"breaker.{name}", rule, repr(getattr(self, name))))

        need(self.consecutive_failures >= 1, "consecutive_failures", "must be >= 1")
        need(0.0 < self.failure_rate <= 1.0, "failure_rate", "must be in (0, 1]")
        need(self.min_calls >= 1, "min_calls", "must be >= 1")
        for name in ("window_s", "open_s", "max_open_s"):
            need(0.0 < getattr(self, name) < math.inf, name, "must be a finite number > 0 seconds")
        need(not self.max_open_s < self.open_s, "max_open_s", "must be >= open_s")
        need(self.half_open_probes >= 1, "half_open_probes", "must be >= 1")
        need(0.0 <= self.jitter < 1.0, "jitter", "must be in [0, 1)")
        if out:
            raise ConfigurationError(out)


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state: from ``old`` to ``new`` because of ``reason``, at ``at`` (monotonic)."""

    old: BreakerState
    new: BreakerState
    reason: str
    at: float


class CircuitBreaker:
    """The breaker of one node. ``state`` is a plain attribute, read on the pool's hot path.

    ``on_transition`` is called synchronously on every real change of state, never for a call
    that leaves the state as it was. ``rand`` (uniform in [0, 1)) draws the jitter.
    """

    __slots__ = (
        "_calls", "_config", "_epoch", "_failures", "_on_transition", "_open_until",
        "_period", "_probes", "_rand", "_run", "_seen", "_slot", "_total_calls",
        "_total_failures", "_width", "state",
    )

    def __init__(
        self, config: BreakerConfig = BreakerConfig(), *,
        on_transition: Callable[[Transition], None] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._on_transition = on_transition
        self._rand = rand
        self._width = config.window_s / BUCKETS
        self.state = _CLOSED
        self._seen = 0.0  # the latest ``now`` given, for transitions without one
        self._clear()

    def _clear(self) -> None:
        self._calls = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._total_calls = 0
        self._total_failures = 0
        self._epoch = 0  # number of the window bucket now being filled
        self._slot = 0  # its index: epoch % BUCKETS
        self._run = 0  # consecutive failures
        self._probes = 0  # probe calls in flight while half open
        self._period = self._config.open_s  # the next open period, before jitter
        self._open_until = 0.0

    # ------------------------------------------------------------------ asking

    def allow(self, now: float) -> bool:
        """Whether a call may go to the node now. When the open period is over this moves to
        ``HALF_OPEN`` and counts the call as a probe; the caller must then report its outcome
        (:meth:`record_success`, :meth:`record_failure` or :meth:`record_abandoned`)."""
        state = self.state
        if state is _CLOSED:
            return True
        self._seen = now
        if state is _OPEN:
            if now < self._open_until:
                return False
            self._move(_HALF_OPEN, "open_period_over", now)
        if self._probes < self._config.half_open_probes:
            self._probes += 1
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until :meth:`allow` may say yes: 0.0 when closed or a probe slot is free;
        while open, the rest of the open period; while every probe slot is taken, ``open_s``
        (a guess: the probes' outcome decides)."""
        if self.state is _CLOSED:
            return 0.0
        if self.state is _OPEN:
            return max(0.0, self._open_until - now)
        return 0.0 if self._probes < self._config.half_open_probes else self._config.open_s

    # ------------------------------------------------------------------ outcomes

    def record_success(self, now: float) -> None:
        """A call succeeded. While closed: ends the failure run and counts the call. While
        half open: the probe succeeded, so the breaker closes. While open: ignored (a call
        let through before it opened)."""
        if self.state is _CLOSED:
            self._run = 0
            if now >= self._width * (self._epoch + 1):
                self._advance(now)
            self._calls[self._slot] += 1
            self._total_calls += 1
        elif self.state is _HALF_OPEN:
            self._seen = now
            self._clear()
            self._move(_CLOSED, "probe_succeeded", now)

    def record_failure(self, now: float) -> None:
        """A call failed. While closed: may open the breaker (a run, or the window's failure
        rate). While half open: the probe failed; open again for a doubled period. While
        open: ignored."""
        self._seen = now
        state = self.state
        if state is _HALF_OPEN:
            self._probes = 0
            self._period = min(self._period * 2.0, self._config.max_open_s)
            self._open(now, "probe_failed")
            return
        if state is _OPEN:
            return
        if now >= self._width * (self._epoch + 1):
            self._advance(now)
        self._run += 1
        self._calls[self._slot] += 1
        self._failures[self._slot] += 1
        self._total_calls += 1
        self._total_failures += 1
        config = self._config
        if self._run >= config.consecutive_failures:
            self._open(now, "consecutive_failures")
        elif (self._total_calls >= config.min_calls
              and self._total_failures >= config.failure_rate * self._total_calls):
            self._open(now, "failure_rate")

    def record_abandoned(self, now: float) -> None:
        """A call that :meth:`allow` let through ended with no outcome (it was cancelled).
        While half open this frees its probe slot; otherwise it changes nothing."""
        self._seen = now
        if self.state is _HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def reset(self, now: float | None = None) -> None:
        """Back to ``CLOSED`` with an empty window and the first open period. Reports a
        transition (reason ``reset``, at ``now`` or the latest time seen) if it was not
        closed."""
        self._clear()
        self._move(_CLOSED, "reset", self._seen if now is None else now)

    # ------------------------------------------------------------------ internals

    def _advance(self, now: float) -> None:
        """Move the window's head to the bucket holding ``now``, emptying the buckets that
        slid out. A ``now`` earlier than the head (a clock that went back) stays in it."""
        epoch = math.floor(now / self._width)
        if epoch <= self._epoch:
            return
        steps = min(epoch - self._epoch, BUCKETS)
        calls, failures = self._calls, self._failures
        for step in range(1, steps + 1):
            slot = (self._epoch + step) % BUCKETS
            self._total_calls -= calls[slot]
            self._total_failures -= failures[slot]
            calls[slot] = failures[slot] = 0
        self._epoch = epoch
        self._slot = epoch % BUCKETS

    def _open(self, now: float, reason: str) -> None:
        self._run = 0
        self._open_until = now + self._period * (1.0 - self._config.jitter * self._rand())
        self._move(_OPEN, reason, now)

    def _move(self, new: BreakerState, reason: str, now: float) -> None:
        old = self.state
        if new is old:
            return
        self.state = new
        if new is _HALF_OPEN:
            self._probes = 0
        if self._on_transition is not None:
            self._on_transition(Transition(old, new, reason, now))

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.state.value} run={self._run} "
            f"window={self._total_failures}/{self._total_calls} failed "
            f"open_period={self._period:g}s probes={self._probes}>"
        )
