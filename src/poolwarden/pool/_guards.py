"""The protections' glue: how the pool wires in the circuit breaker, overload admission
and the adaptive concurrency limit (the policies themselves live in :mod:`poolwarden.protect`),
refuses callers when they say so, and reacts when they change state."""

from __future__ import annotations

import dataclasses
import time

from .. import events as ev
from ..errors import CircuitOpen, PoolExhausted
from ..protect.admission import Admission
from ..protect.breaker import BreakerState, CircuitBreaker, Transition
from ..protect.limiter import AdaptiveLimit
from ._base import BREAKER_CLOSED, IN_USE, NEVER, PoolBase
from ._record import CloseReason
from .config import PoolConfig

__all__ = ["Guards"]

_monotonic = time.monotonic


class Guards(PoolBase):
    """The pool's part that applies its protections."""

    def _set_up_protection(self, config: PoolConfig) -> None:
        """Admission of waiters, the circuit breaker, the adaptive concurrency limit."""
        self._admission = (
            Admission(config.admission, on_change=self._overload_changed)
            if config.admission is not None else None
        )
        self._breaker = (
            CircuitBreaker(config.breaker, on_transition=self._breaker_changed)
            if config.breaker is not None else None
        )
        self._limiter: AdaptiveLimit | None = None
        if config.limiter is not None:
            bounds = dataclasses.replace(
                config.limiter, max_limit=config.max_size,
                min_limit=min(config.limiter.min_limit, config.max_size),
                initial=min(config.limiter.initial, config.max_size),
            )
            self._limiter = AdaptiveLimit(bounds, on_change=self._limit_changed)

    def _shed_now(self, waiting: int, retry_after: float, expected: float) -> PoolExhausted:
        """Refuse a caller at once under overload (admission said no)."""
        self._shed += 1
        self.events.emit(ev.Refused(node=self.name, reason="overload", waiting=waiting,
                                    retry_after_s=retry_after))
        return PoolExhausted(
            f"overloaded: expected wait {expected * 1000:.0f} ms behind {waiting} callers; "
            f"retry in {retry_after * 1000:.0f} ms",
            node=self.name, state=self._state(), retry_after_s=retry_after,
        )

    def _circuit_open(self, now: float) -> CircuitOpen:
        assert self._breaker is not None
        self._circuit_refusals += 1
        retry = self._breaker.retry_after(now)
        self.events.emit(ev.Refused(node=self.name, reason="circuit_open",
                                    waiting=len(self._waiters), retry_after_s=retry))
        error = CircuitOpen(
            f"circuit open after repeated connection failures; next probe in {retry:.1f} s",
            node=self.name, state=self._state(), retry_after_s=retry,
        )
        error.__cause__ = self._last_error
        return error

    def retry_after(self) -> float:
        """An estimate (seconds) of when a refused caller may succeed: the time for the
        current queue to drain at the observed hold time; the breaker's open period left
        while it is open."""
        now = _monotonic()
        if self._breaker is not None and self._breaker.state is not BREAKER_CLOSED:
            return max(self._breaker.retry_after(now), 0.001)
        if self._admission is not None:
            return self._admission.retry_after(len(self._waiters), self._limit)
        uses = self._h_use
        n = uses.count
        hold = uses.sum_s / n if n else 0.01
        return max(0.001, (len(self._waiters) + 1) * hold / max(self._limit, 1))

    def _breaker_changed(self, change: Transition) -> None:
        self.events.emit(ev.BreakerChanged(node=self.name, old=change.old.value,
                                           new=change.new.value, reason=change.reason))
        if change.new is BreakerState.OPEN:
            # Fail fast: nobody keeps waiting for a node that is down.
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(self._circuit_open(change.at))

    def _overload_changed(self, overloaded: bool, queue_delay_s: float) -> None:
        self.events.emit(ev.OverloadChanged(node=self.name, overloaded=overloaded,
                                            queue_delay_s=queue_delay_s))
        if overloaded and self._admission is not None and self._waiters:
            # Those admitted before the overload was seen may be queued for their whole
            # budget: hold them to the overload's bound too, so the standing queue goes.
            now = _monotonic()
            cap = now + self._admission.max_wait(NEVER)
            for waiter in self._waiters:
                if waiter.deadline > cap:
                    waiter.deadline, waiter.limit = cap, "shed"
            if cap < self._expiry_at:
                self._schedule_expiry(cap, now)

    def _limit_changed(self, old: int, new: int) -> None:
        self._limit = min(new, self._max_size)
        self.events.emit(ev.LimitChanged(node=self.name, old=old, new=new))
        if new > old:
            self._serve_waiters_from_idle()
            self._grow()

    def _serve_waiters_from_idle(self) -> None:
        """The limit rose: idle connections go to waiters, up to the new limit."""
        now = _monotonic()
        while self._waiters and self._idle and self._n_in_use < self._limit:
            record = self._idle.pop()
            record.state = IN_USE
            self._n_in_use += 1
            if now >= record.expires_at:
                self._retire(record, self._stale_reason(record))
                continue
            if record.conn.is_closed():
                self._retire(record, CloseReason.ERROR)
                continue
            self._hand_on(record, now)
