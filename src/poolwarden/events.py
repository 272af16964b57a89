"""Typed pool events, sent to Python logging and to subscribed hooks.

Every event is a frozen dataclass naming its node and the wall-clock time it happened,
plus the fields that describe it; no field ever holds a password (errors are described
from the driver's error class and the masked target, statements carry no parameters unless
their logging was enabled explicitly).

Two kinds of events, by frequency:

* rare ones (connect failures, leaks, slow queries, breaker and limit changes, ping
  failures, closes, refusals, timeouts) are always built and always logged, at their level;
* per-operation ones (:class:`Acquired`, :class:`Released`) are built only when someone
  listens — a subscribed hook or ``DB_ECHO_POOL`` — so that they cost one attribute read
  otherwise (``bus.active``).

``DB_ECHO_POOL=true`` logs every event at INFO (``echo=True`` on the bus). A hook is any
callable taking an :class:`Event`; a hook that raises is logged once and never breaks the
pool.

Log records carry the event's fields as attributes (``record.event``, ``record.node``, …)
for structured formatters; the message is one readable line.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

logger = logging.getLogger("poolwarden.events")

DEBUG, INFO, WARNING = logging.DEBUG, logging.INFO, logging.WARNING


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event: which node, and when (``time.time()``)."""

    kind: ClassVar[str] = "event"
    level: ClassVar[int] = DEBUG
    node: str
    at: float = field(default_factory=time.time)

    def fields(self) -> dict[str, Any]:
        """The event's fields (``node``, ``at`` and its own), for logs and exporters."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        own = " ".join(
            f"{k}={_fmt(v)}" for k, v in self.fields().items() if k not in {"node", "at", "stack"}
        )
        return f"pool {self.node!r}: {self.kind} {own}".rstrip()


def _with_stack(line: str, stack: str | None) -> str:
    if not stack:
        return f"{line} (start the pool with leak detection to see where it was acquired)"
    return f"{line}; {stack.rstrip()}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------- connection lifecycle


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionOpened(Event):
    kind: ClassVar[str] = "connect"
    level: ClassVar[int] = DEBUG
    pid: int
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectFailed(Event):
    """A connection attempt failed; the pool retries after ``next_delay_s`` (backoff)."""

    kind: ClassVar[str] = "connect_failed"
    level: ClassVar[int] = WARNING
    error: str
    attempt: int  # consecutive failures so far
    next_delay_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    kind: ClassVar[str] = "close"
    level: ClassVar[int] = DEBUG
    reason: str  # a CloseReason value
    age_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PingFailed(Event):
    kind: ClassVar[str] = "ping_failed"
    level: ClassVar[int] = WARNING
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerRestarted(Event):
    """A new connection saw a later server start: older connections are invalidated."""

    kind: ClassVar[str] = "server_restarted"
    level: ClassVar[int] = WARNING
    invalidated: int


# ---------------------------------------------------------------- checkout


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquired(Event):
    kind: ClassVar[str] = "acquire"
    level: ClassVar[int] = DEBUG
    wait_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Released(Event):
    kind: ClassVar[str] = "release"
    level: ClassVar[int] = DEBUG
    hold_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused(Event):
    """Refused at once, nothing sent: ``reason`` is ``queue_full``, ``overload``,
    ``circuit_open`` or ``deadline``."""

    kind: ClassVar[str] = "refusal"
    level: ClassVar[int] = INFO
    reason: str
    waiting: int
    retry_after_s: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TimedOut(Event):
    kind: ClassVar[str] = "timeout"
    level: ClassVar[int] = INFO
    waited_s: float
    reason: str  # "acquire_timeout" | "deadline" | "shed"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementStopped(Event):
    """A statement ran past ``command_timeout``; the pool cancelled it (``action="cancel"``)
    or, when the server did not answer the cancel, closed the connection (``"terminate"``)."""

    kind: ClassVar[str] = "statement_timeout"
    level: ClassVar[int] = WARNING
    pid: int | None
    running_s: float
    action: str  # "cancel" | "terminate"


@dataclass(frozen=True, slots=True, kw_only=True)
class LeakSuspected(Event):
    """A connection held longer than the leak threshold; ``stack`` is where it was acquired."""

    kind: ClassVar[str] = "leak"
    level: ClassVar[int] = WARNING
    pid: int | None
    held_s: float
    stack: str | None

    def describe(self) -> str:
        return _with_stack(Event.describe(self), self.stack)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldAtClose(Event):
    """Still checked out when the pool closed (after the drain timeout)."""

    kind: ClassVar[str] = "held_at_close"
    level: ClassVar[int] = WARNING
    pid: int | None
    held_s: float
    stack: str | None

    def describe(self) -> str:
        return _with_stack(Event.describe(self), self.stack)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowQuery(Event):
    kind: ClassVar[str] = "slow_query"
    level: ClassVar[int] = WARNING
    duration_s: float
    statement: str  # truncated
    params: str | None = None  # only when parameter logging is enabled
    error: str | None = None


# ---------------------------------------------------------------- protection and topology


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerChanged(Event):
    kind: ClassVar[str] = "breaker"
    level: ClassVar[int] = WARNING
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChanged(Event):
    """The adaptive concurrency limit moved."""

    kind: ClassVar[str] = "limit"
    level: ClassVar[int] = DEBUG
    old: int
    new: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OverloadChanged(Event):
    """Admission entered or left overload mode (queue delay above its target)."""

    kind: ClassVar[str] = "overload"
    level: ClassVar[int] = WARNING
    overloaded: bool
    queue_delay_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TopologyChanged(Event):
    kind: ClassVar[str] = "topology"
    level: ClassVar[int] = WARNING
    role: str
    detail: str


class EventHook(Protocol):
    """A subscriber: called synchronously, on the event loop, for every event."""

    def __call__(self, event: Event, /) -> None: ...


class EventBus:
    """Where one pool's events go: logging, and the subscribed hooks.

    ``active`` is true when every event is wanted (a hook is subscribed, or ``echo``); the
    pool reads it before building a per-operation event.
    """

    __slots__ = ("_broken", "_echo", "_hooks", "active")

    def __init__(self, *, echo: bool = False) -> None:
        self._hooks: list[EventHook] = []
        self._echo = echo
        self._broken: set[int] = set()
        self.active = echo

    @property
    def echo(self) -> bool:
        return self._echo

    @echo.setter
    def echo(self, value: bool) -> None:
        self._echo = value
        self.active = value or bool(self._hooks)

    def subscribe(self, hook: EventHook) -> Callable[[], None]:
        """Send every event to ``hook`` from now on; returns the function that unsubscribes."""
        self._hooks.append(hook)
        self.active = True

        def unsubscribe() -> None:
            if hook in self._hooks:
                self._hooks.remove(hook)
            self.active = self._echo or bool(self._hooks)

        return unsubscribe

    def emit(self, event: Event) -> None:
        level = INFO if self._echo and event.level < INFO else event.level
        if logger.isEnabledFor(level):
            extra = {"event": event.kind, **event.fields()}
            logger.log(level, event.describe(), extra=extra)
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                if id(hook) not in self._broken:
                    self._broken.add(id(hook))
                    logger.exception("event hook %r raised; later errors are not logged", hook)

    def __repr__(self) -> str:
        return f"<EventBus hooks={len(self._hooks)} echo={self._echo}>"
