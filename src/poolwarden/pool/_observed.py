"""Statement timing on the raw asyncpg path: the query-time histogram and the slow-query log.

:class:`ObservedConnection` is the :class:`PooledConnection` the pool hands out when query
stats or the slow-query log are on. Its statements are timed in two places, each with two
``time.monotonic()`` reads, and reported to the connection's :class:`QueryObserver`, also
when they raise (reported, then re-raised):

- ``fetch``, ``fetchrow``, ``fetchval``, ``execute`` with arguments, ``executemany`` and
  ``fetchmany`` — everything asyncpg runs inside its statement section — by the
  connection's :class:`~poolwarden.pool._driver.StatementSection`, which stands in for that
  section. No wrapper coroutine: measured, a wrapper around each method cost ~0.7 µs per
  statement, the section ~0.25 µs. The statement's text and arguments are read from
  asyncpg's frame only when the observer wants them (a slow statement, a tap).
- ``execute`` without arguments (asyncpg's simple query protocol, outside the section) by
  the :meth:`ObservedConnection.execute` override.

Why not asyncpg's ``add_query_logger``: a query logger costs a ``loop.call_soon`` per
statement and is not called for ``PreparedStatement`` execution. What the pool does not
see is exactly what SQLAlchemy runs (``prepare()`` + prepared statements), which
:mod:`poolwarden.sqlalchemy` times in its dialect's cursor calls instead — so no statement is
counted twice. What the pool does see on both paths: transaction control that asyncpg's
``Transaction`` sends through ``execute`` (``BEGIN``, ``COMMIT``, ``ROLLBACK``, savepoints)
— each a round trip of its own, and a slow ``COMMIT`` is worth logging. Not observed:
statements run through a ``PreparedStatement`` or a cursor obtained from ``prepare()``/
``cursor()`` on the raw path, ``COPY``, and :meth:`ObservedConnection.reset` (the pool's
session reset, not the application's work). The rows of an ``executemany`` given as an
iterator (consumed by the call) are not shown in a slow-query report.

:class:`QueryObserver` keeps the per-statement work small: one histogram observation (a
``bisect`` and an increment), one comparison with the slow threshold, one check for taps.
Everything about a slow statement — whitespace collapsing, masking, truncation, the
parameters' ``repr`` — happens only when a statement is slow. Parameters are never put in
an event unless ``log_params`` is set; SQL password literals (``PASSWORD '...'``) and DSN
passwords inside a statement are masked.

Taps (:func:`tap_queries`) let an exporter (the OpenTelemetry adapter) see every observed
statement of one pool without the pool knowing about it: they are keyed by the pool's
:class:`~poolwarden.events.EventBus`, so connections opened before or after the tap is set
all report to it.
"""

from __future__ import annotations

import logging
import math
import re
import reprlib
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from .._secrets import MASK, mask_dsn
from ..events import EventBus, SlowQuery
from ._driver import PooledConnection
from .histogram import Histogram

__all__ = ["ObservedConnection", "QueryObserver", "QueryTap", "format_statement", "tap_queries"]

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

#: how much of a statement (after collapsing whitespace) a slow-query event shows
DEFAULT_MAX_STATEMENT_CHARS = 300
_ELLIPSIS = "…"
# `PASSWORD 'secret'` in CREATE/ALTER ROLE (also unterminated, as when cut short)
_SQL_PASSWORD = re.compile(r"(?P<head>\bpassword\s+)'(?:[^']|'')*(?:'|$)", re.IGNORECASE)


class QueryTap(Protocol):
    """Called after every observed statement of a tapped pool, on the event loop."""

    def __call__(self, statement: str, elapsed_s: float, error: BaseException | None, /) -> None:
        ...


class _Taps(list[QueryTap]):
    """The taps of one event bus. Holds the bus so that its ``id`` (the registry key)
    cannot be reused while this list exists."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__()
        self.bus = bus
        self.broken: set[int] = set()  # ids of taps that raised (logged once)


# id(bus) -> its taps. Weak values: an entry lives while an observer or a tap holds it.
_TAPS: weakref.WeakValueDictionary[int, _Taps] = weakref.WeakValueDictionary()


def _taps_for(bus: EventBus) -> _Taps:
    taps = _TAPS.get(id(bus))
    if taps is None:
        taps = _TAPS[id(bus)] = _Taps(bus)
    return taps


def tap_queries(events: EventBus, tap: QueryTap) -> Callable[[], None]:
    """Call ``tap(statement, elapsed_s, error)`` after every statement observed on the pool
    whose bus is ``events`` (also on connections opened later); returns the function that
    removes the tap. A tap that raises is logged once and never breaks a statement."""
    taps = _taps_for(events)
    taps.append(tap)

    def untap() -> None:
        if tap in taps:
            taps.remove(tap)

    # the closure holds `taps`, so the registry entry lives as long as the tap may be removed
    return untap


_reprs = reprlib.Repr()
_reprs.maxlevel = 3
_reprs.maxlist = _reprs.maxtuple = _reprs.maxdict = _reprs.maxset = 20
_reprs.maxstring = _reprs.maxother = DEFAULT_MAX_STATEMENT_CHARS


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + _ELLIPSIS


def format_statement(statement: str, max_chars: int = DEFAULT_MAX_STATEMENT_CHARS) -> str:
    """``statement`` as a slow-query event shows it: whitespace collapsed to single spaces,
    password literals and DSN passwords masked, cut to ``max_chars`` ending in ``…``."""
    # Bounded work for huge statements: only a prefix can be shown anyway.
    text = " ".join(statement[: max_chars * 4].split())
    text = _SQL_PASSWORD.sub(lambda m: f"{m['head']}'{MASK}'", text)
    return _truncate(mask_dsn(text), max_chars)


def _format_params(args: Sequence[Any], max_chars: int) -> str:
    # reprlib bounds the work on big argument lists (executemany with many rows)
    return _truncate(_reprs.repr(args), max_chars)


class QueryObserver:
    """Where an observed connection reports its statements: the pool's query histogram,
    the slow-query log (a :class:`~poolwarden.events.SlowQuery` event on ``events``) and
    any taps on ``events``.

    ``slow_threshold_s``: statements that take longer are reported (``None``: never).
    ``log_params``: put the statement's parameters (``repr``, truncated) in the event;
    off by default because parameters hold personal data and secrets.
    """

    __slots__ = ("events", "histogram", "log_params", "max_statement_chars", "node",
                 "report_above_s", "slow_threshold_s", "taps")

    def __init__(
        self,
        *,
        node: str,
        events: EventBus,
        histogram: Histogram,
        slow_threshold_s: float | None,
        log_params: bool,
        max_statement_chars: int = DEFAULT_MAX_STATEMENT_CHARS,
    ) -> None:
        if max_statement_chars < 1:
            raise ValueError("max_statement_chars must be >= 1")
        self.node = node
        self.events = events
        self.slow_threshold_s = slow_threshold_s
        self.log_params = log_params
        self.max_statement_chars = max_statement_chars
        self.histogram = histogram
        # statements slower than this are reported (inf: none)
        self.report_above_s = math.inf if slow_threshold_s is None else slow_threshold_s
        self.taps = _taps_for(events)

    def observe(
        self, statement: str, args: Sequence[Any], elapsed_s: float, error: BaseException | None
    ) -> None:
        """Record one statement that took ``elapsed_s`` seconds (``error``: what it raised).

        Never raises: it runs on the caller's statement path, also while an exception of
        the statement is propagating. (The statement section writes this method out, see
        :class:`~poolwarden.pool._driver.StatementSection`.)"""
        self.histogram.observe(elapsed_s)
        if elapsed_s > self.report_above_s or self.taps:
            self.report(statement, args, elapsed_s, error)

    def report(
        self, statement: str, args: Sequence[Any], elapsed_s: float, error: BaseException | None
    ) -> None:
        """What :meth:`observe` does for a statement that is slow or tapped: the slow-query
        log and the taps."""
        if elapsed_s > self.report_above_s:
            self._report_slow(statement, args, elapsed_s, error)
        if self.taps:
            self._call_taps(statement, elapsed_s, error)

    def _report_slow(
        self, statement: str, args: Sequence[Any], elapsed_s: float, error: BaseException | None
    ) -> None:
        try:
            limit = self.max_statement_chars
            self.events.emit(SlowQuery(
                node=self.node, duration_s=elapsed_s,
                statement=format_statement(statement, limit),
                params=_format_params(args, limit) if self.log_params and args else None,
                error=None if error is None else type(error).__name__,
            ))
        except Exception as exc:  # a report must never fail the statement it reports
            logger.error(  # noqa: TRY400 - no traceback: it might show the parameters
                "slow-query report failed: %s", type(exc).__name__
            )

    def _call_taps(self, statement: str, elapsed_s: float, error: BaseException | None) -> None:
        for tap in self.taps:
            try:
                tap(statement, elapsed_s, error)
            except Exception:
                if id(tap) not in self.taps.broken:
                    self.taps.broken.add(id(tap))
                    logger.exception("query tap %r raised; later errors are not logged", tap)

    def __repr__(self) -> str:
        return (f"<QueryObserver node={self.node!r} slow_threshold_s={self.slow_threshold_s} "
                f"log_params={self.log_params} taps={len(self.taps)}>")


_execute = PooledConnection.execute  # the undecorated method, looked up once
_reset = PooledConnection.reset


class ObservedConnection(PooledConnection):
    """A :class:`PooledConnection` whose statements are timed and reported to
    ``_pw_observer`` (a :class:`QueryObserver`, or ``None``: then nothing is timed).

    Statements with arguments, ``fetch*`` and ``executemany`` are timed by the connection's
    :class:`~poolwarden.pool._driver.StatementSection`; this class adds ``execute`` without
    arguments (which asyncpg sends outside that section: the simple query protocol, also
    transaction control) and keeps the pool's session reset out. Same methods and
    signatures as ``asyncpg.Connection``; use it exactly like one.
    """

    __slots__ = ()

    def execute(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, str]:
        if args or self._pw_observer is None:  # (with arguments: timed by the section)
            return _execute(self, query, *args, timeout=timeout)  # type: ignore[no-any-return]
        return self._execute_timed(query, timeout)

    async def _execute_timed(self, query: str, timeout: float | None) -> str:
        observer: QueryObserver = self._pw_observer
        start = _monotonic()
        try:
            result: str = await _execute(self, query, timeout=timeout)
        except BaseException as exc:
            observer.observe(query, (), _monotonic() - start, exc)
            raise
        observer.observe(query, (), _monotonic() - start, None)
        return result

    async def reset(self, *, timeout: float | None = None) -> None:
        """asyncpg's session reset, not observed: its ``ROLLBACK`` and reset query are the
        pool's housekeeping, not the application's statements."""
        observer, self._pw_observer = self._pw_observer, None
        try:
            await _reset(self, timeout=timeout)
        finally:
            self._pw_observer = observer
