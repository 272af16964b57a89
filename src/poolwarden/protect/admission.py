"""Admission control for the pool's wait queue: refuse at once what would wait too long.

Pure policy: no I/O, no clock of its own (``now`` is passed in, monotonic seconds).

A plain FIFO queue under sustained overload fills up until everyone waits about as long as
they can bear: 500 callers on a pool that serves 1000 uses a second all wait half a second,
and the pool serves nobody faster for it. This policy keeps the queue short instead and tells
the excess at once, with a ``Retry-After``, so that those who get in are served fast.

Rules, checked by :meth:`Admission.admit` when a caller would have to queue:

* never admit a caller who would time out in the queue anyway: the expected wait,
  ``(ahead + 1) * hold_s / servers`` (``hold_s`` is the mean time a connection is held, an
  EWMA), must not exceed its budget;
* while *overloaded*, the expected wait must also be under ``overload_wait_s``, and the
  queue is kept at about half of that, its *standing level*: past it, only a caller whose
  appointment (below) has come is admitted.

Overload is detected as CoDel (Nichols and Jacobson) detects a standing queue: it is entered
when the delay of served waiters stayed at or above ``target_s`` for a whole ``interval_s``
(a burst that drains within the interval is what a queue is for), and left as soon as a waiter
is served in less than ``target_s`` or the queue runs dry.

Retry-After is an *appointment*. Telling every refused caller "the queue will have room in
2 ms" would bring them all back at once, to be refused again; and while more callers arrive
than the pool serves, any queue fills to the admission limit, so everyone would wait the whole
``overload_wait_s``. Instead appointments are handed out a little more than one connection use
apart (``hold_s / servers`` x :data:`APPOINTMENT_SPACING`), starting when the queue will have
drained to its standing level. An appointment that has come is a ticket: the next arrival
takes it and is admitted past the standing level (up to ``overload_wait_s``). So the refused
come back at slightly less than the rate the pool serves, newcomers top the queue up to its
standing level, the queue neither runs dry nor grows, and the wait stays near that level.
A ticket not taken within ``overload_wait_s`` of its time lapses (its caller gave up).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigProblem, ConfigurationError

STANDING = 0.5
"""While overloaded, the queue is kept at this fraction of ``overload_wait_s`` (and a refused
caller is given an appointment for when the queue will have drained to that level)."""

APPOINTMENT_SPACING = 1.05
"""Appointments are this many connection uses apart: returning callers alone come back at 95%
of the pool's rate, so they never grow the queue; newcomers make up the rest."""

MAX_BOOKED = 100_000
"""At most this many appointments are remembered (later ones get a time but no ticket)."""


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """Tuning of :class:`Admission`. Durations in seconds. Raises
    :class:`~poolwarden.errors.ConfigurationError` listing every invalid field."""

    target_s: float = 0.005  # acceptable standing queue delay (CoDel's target)
    interval_s: float = 0.1  # above target this long means overload (CoDel's interval)
    overload_wait_s: float = 0.05  # while overloaded, admit only if the wait is under this
    hold_alpha: float = 0.1  # EWMA weight of each hold-time sample
    hold_prior_s: float = 0.01  # the hold time assumed until the first sample
    min_retry_after_s: float = 0.001
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        out: list[ConfigProblem] = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                out.append(ConfigProblem(f"admission.{name}", rule, repr(getattr(self, name))))

        for name in ("target_s", "interval_s", "overload_wait_s", "min_retry_after_s",
                     "max_retry_after_s"):
            need(0.0 < getattr(self, name) < math.inf, name, "must be a finite number > 0 seconds")
        need(0.0 <= self.hold_prior_s < math.inf, "hold_prior_s",
             "must be a finite number >= 0 seconds")
        need(not self.overload_wait_s <= self.target_s, "overload_wait_s", "must be > target_s")
        need(0.0 < self.hold_alpha <= 1.0, "hold_alpha", "must be in (0, 1]")
        need(not self.max_retry_after_s < self.min_retry_after_s, "max_retry_after_s",
             "must be >= min_retry_after_s")
        if out:
            raise ConfigurationError(out)


class Admission:
    """The admission policy of one pool's wait queue.

    ``overloaded`` and ``hold_s`` are plain attributes. ``on_change(overloaded, queue_delay_s)``
    is called when overload mode is entered or left, with the queue delay that decided it.
    """

    __slots__ = ("_booked", "_config", "_dry_since", "_first_above", "_last_return", "_on_change",
                 "_sampled", "hold_s", "overloaded")

    def __init__(
        self, config: AdmissionConfig = AdmissionConfig(), *,
        on_change: Callable[[bool, float], None] | None = None,
    ) -> None:
        self._config = config
        self._on_change = on_change
        self.overloaded = False
        self.hold_s = config.hold_prior_s
        self._sampled = False
        self._first_above: float | None = None  # when the delay may count as standing
        self._dry_since: float | None = None  # overloaded, and the queue ran dry then
        self._last_return = -math.inf  # the latest appointment handed out
        self._booked: deque[float] = deque()  # appointments not yet taken, oldest first

    # ------------------------------------------------------------------ measurements

    def on_hold(self, hold_s: float) -> None:
        """A connection was released after being held ``hold_s``. The first sample replaces
        the prior; later ones move the EWMA. A negative or non-finite one is ignored."""
        if not 0.0 <= hold_s < math.inf:
            return
        if self._sampled:
            self.hold_s += self._config.hold_alpha * (hold_s - self.hold_s)
        else:
            self.hold_s = hold_s
            self._sampled = True

    def on_served(self, sojourn_s: float, now: float) -> None:
        """A queued waiter was handed a connection after waiting ``sojourn_s``. Enters
        overload when the delay has stayed at or above ``target_s`` for ``interval_s``;
        leaves it when a delay under ``target_s`` is seen."""
        config = self._config
        if sojourn_s < config.target_s:
            self._first_above = None
            self._dry_since = None
            self._set(False, sojourn_s)
            return
        self._dry_since = None
        if self._first_above is None:
            self._first_above = now + config.interval_s
        elif now >= self._first_above:
            self._set(True, sojourn_s)

    def on_queue_empty(self, now: float) -> None:
        """A connection found nobody waiting. Outside overload that ends a building delay.
        While overloaded, the queue running dry for a moment is expected (refused callers
        come back at their appointments): overload ends only when it has stayed dry —
        no waiter served late in between — for ``interval_s``. Leaving at the first gap
        would admit every returning caller at once and rebuild the long queue."""
        self._first_above = None
        if not self.overloaded:
            return
        if self._dry_since is None:
            self._dry_since = now
        elif now - self._dry_since >= self._config.interval_s:
            self._dry_since = None
            self._set(False, 0.0)

    # ------------------------------------------------------------------ decisions

    def expected_wait(self, ahead: int, servers: int) -> float:
        """How long a caller with ``ahead`` waiters before it can expect to wait when all
        ``servers`` connections are busy: ``(ahead + 1) * hold_s / servers``."""
        return (max(ahead, 0) + 1) * self.hold_s / max(servers, 1)

    def admit(self, ahead: int, servers: int, budget_s: float, now: float) -> float | None:
        """``None`` to admit a caller that would queue behind ``ahead`` waiters; otherwise it
        is refused and this is its ``retry_after_s`` (an appointment, see the module doc).

        Refused when the expected wait exceeds ``budget_s`` (it would time out anyway); while
        overloaded, also when it exceeds ``overload_wait_s``, or the queue's standing level
        and no appointment has come."""
        wait = self.expected_wait(ahead, servers)
        if not self.overloaded:
            if wait <= budget_s:
                return None
            return self._appointment(wait, max(budget_s, 0.0) * STANDING, servers, now)
        config = self._config
        standing = config.overload_wait_s * STANDING
        if wait <= budget_s and wait <= config.overload_wait_s:
            ticket = self._take_ticket(now)
            if ticket or wait <= standing:
                return None
        return self._appointment(wait, min(max(budget_s, 0.0) * STANDING, standing), servers, now)

    def retry_after(self, waiting: int, servers: int) -> float:
        """Time until the queue of ``waiting`` has drained to a length admitted while
        overloaded, clamped to ``[min_retry_after_s, max_retry_after_s]``. For refusals that
        :meth:`admit` did not decide (a full queue); it books no appointment."""
        standing = self._config.overload_wait_s * STANDING
        return self._clamp(self.expected_wait(waiting, servers) - standing)

    def max_wait(self, budget_s: float) -> float:
        """How long an admitted waiter may stay queued: its budget; while overloaded at most
        ``max(interval_s, 2 * overload_wait_s)`` too, so that a waiter the estimate was wrong
        about is shed (told to come back) instead of going stale in the queue."""
        if not self.overloaded:
            return budget_s
        config = self._config
        return min(budget_s, max(config.interval_s, 2.0 * config.overload_wait_s))

    # ------------------------------------------------------------------ internals

    def _take_ticket(self, now: float) -> bool:
        """Take the oldest appointment that has come, if any."""
        booked = self._drop_lapsed(now)
        if booked and booked[0] <= now:
            booked.popleft()
            return True
        return False

    def _appointment(self, wait: float, level: float, servers: int, now: float) -> float:
        """Book the next appointment: when the queue will have drained to ``level`` of
        expected wait, and at least one spacing after the previous appointment."""
        spacing = self.hold_s / max(servers, 1) * APPOINTMENT_SPACING
        when = max(now + wait - level, self._last_return + spacing)
        retry = self._clamp(when - now)
        self._last_return = now + retry
        booked = self._drop_lapsed(now)
        if len(booked) < MAX_BOOKED:
            booked.append(self._last_return)
        return retry

    def _drop_lapsed(self, now: float) -> deque[float]:
        """Forget the appointments missed by more than ``overload_wait_s``; returns the rest."""
        booked = self._booked
        lapsed = now - self._config.overload_wait_s
        while booked and booked[0] < lapsed:
            booked.popleft()
        return booked

    def _clamp(self, seconds: float) -> float:
        config = self._config
        if not seconds >= config.min_retry_after_s:  # also catches NaN
            return config.min_retry_after_s
        return min(seconds, config.max_retry_after_s)

    def _set(self, overloaded: bool, delay: float) -> None:
        if overloaded is not self.overloaded:
            self.overloaded = overloaded
            if self._on_change is not None:
                self._on_change(overloaded, delay)

    def __repr__(self) -> str:
        mode = "overloaded" if self.overloaded else "normal"
        return f"<Admission {mode} hold={self.hold_s * 1000:.3g}ms>"
