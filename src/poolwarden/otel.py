"""OpenTelemetry metrics for the pools, through ``opentelemetry-api`` (the ``otel`` extra).

``instrument(db)`` (a ``Database`` or a ``Pool``) creates the instruments of the
database-client connection-pool semantic conventions, every observation carrying
``db.client.connection.pool.name`` (the node name, never a DSN):

- asynchronous, read from the stats snapshot at each collection (``Pool.stats()`` does no
  I/O): ``db.client.connection.count`` (``db.client.connection.state`` = ``idle`` | ``used``),
  ``db.client.connection.max``, ``db.client.connection.idle.max``,
  ``db.client.connection.idle.min``, ``db.client.connection.pending_requests`` — observable
  up-down counters, as the conventions define them (current values, not deltas) — and
  ``db.client.connection.timeouts``, an observable counter (the cumulative total);
- histograms in seconds, recorded as things happen, from the pool's events:
  ``db.client.connection.create_time`` (:class:`~poolwarden.events.ConnectionOpened`),
  ``db.client.connection.wait_time`` (:class:`~poolwarden.events.Acquired`),
  ``db.client.connection.use_time`` (:class:`~poolwarden.events.Released`), and
  ``db.client.operation.duration`` per statement (from the pool's query observer, see
  :func:`poolwarden.pool._observed.tap_queries`; also with ``db.system.name`` =
  ``postgresql`` and, for a failed statement, ``error.type``). Bucket boundaries are
  advised as the core's (100 µs to 60 s, the same as the Prometheus exporter's), not the
  SDK's default millisecond-scale ones.

Cost: subscribing to a pool's events turns on its per-checkout events (``Acquired``,
``Released``; the core skips building them otherwise), and each becomes one histogram
record in the SDK — a few microseconds per checkout. Statements are timed whether or not
OpenTelemetry listens (``PoolConfig.query_stats``); the tap adds one record per statement.
The histograms count from ``instrument()`` on: instrument before opening the pools to see
their first connections.

Why both this and :mod:`poolwarden.metrics`: Prometheus' multiprocess mode needs real
metric objects fed from each worker's snapshot; an OpenTelemetry SDK aggregates in-process
and exports itself, so here the convention's instrument types are used directly.

The module imports without opentelemetry-api; :func:`instrument` then raises ``ImportError``
naming the ``poolwarden[otel]`` extra.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final, Union

from ._secrets import mask_dsn
from .events import Acquired, ConnectionOpened, Event, Released
from .pool import Pool, PoolStats
from .pool._observed import tap_queries
from .pool.histogram import DURATION_BOUNDS_S

try:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation, get_meter

    _HAVE_OTEL = True
except ImportError:  # the `otel` extra is not installed
    _HAVE_OTEL = False

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, MeterProvider

    from .database import Database

__all__ = ["POOL_NAME", "Instrumentation", "instrument", "otel_available"]

POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"
_SYSTEM: Final = {"db.system.name": "postgresql"}
_MISSING_EXTRA = ("OpenTelemetry metrics need opentelemetry-api: "
                  "pip install 'poolwarden[otel]'")
_METER_NAME = "poolwarden"

# (instrument name, unit, description, PoolStats field): current values
_UP_DOWN: Final[tuple[tuple[str, str, str, str], ...]] = (
    ("db.client.connection.max", "{connection}",
     "The maximum number of open connections allowed.", "max_size"),
    ("db.client.connection.idle.max", "{connection}",
     "The maximum number of idle open connections allowed.", "pool_size"),
    ("db.client.connection.idle.min", "{connection}",
     "The minimum number of idle open connections allowed.", "min_size"),
    ("db.client.connection.pending_requests", "{request}",
     "The number of current pending requests for an open connection.", "requests_waiting"),
)

Target = Union["Database", Pool]


def otel_available() -> bool:
    """Whether opentelemetry-api is installed (the ``otel`` extra)."""
    return _HAVE_OTEL


def _pools_of(target: Target) -> dict[str, Pool]:
    if isinstance(target, Pool):
        return {target.name: target}
    pools: dict[str, Pool] = target._pools
    return dict(pools)


def _by_node(stats: Mapping[str, PoolStats] | PoolStats) -> Mapping[str, PoolStats]:
    return {stats.name: stats} if isinstance(stats, PoolStats) else stats


class Instrumentation:
    """The OpenTelemetry instruments of one ``Database`` or ``Pool`` (see the module doc).

    Made by :func:`instrument`. :meth:`close` unsubscribes from the pools' events and makes
    the asynchronous instruments report nothing more (the API cannot remove an instrument).
    Holds the target weakly from the collection callbacks: a forgotten database is not kept
    alive by its meter. Also a context manager (closes on exit).
    """

    def __init__(self, target: Target, meter: Meter) -> None:
        self._target: weakref.ref[Target] = weakref.ref(target)
        self._closed = False
        self._pool_names = sorted(_pools_of(target))
        bounds = list(DURATION_BOUNDS_S)

        def histogram(name: str, description: str) -> Histogram:
            return meter.create_histogram(name, unit="s", description=description,
                                          explicit_bucket_boundaries_advisory=bounds)

        self._create = histogram("db.client.connection.create_time",
                                 "The time it took to create a new connection.")
        self._wait = histogram("db.client.connection.wait_time",
                               "The time it took to obtain an open connection from the pool.")
        self._use = histogram("db.client.connection.use_time",
                              "The time between borrowing a connection and returning it "
                              "to the pool.")
        self._operation = histogram("db.client.operation.duration",
                                    "Duration of database client operations.")
        meter.create_observable_up_down_counter(
            "db.client.connection.count", callbacks=[self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in state described "
                        "by the state attribute.",
        )
        for name, unit, description, field in _UP_DOWN:
            meter.create_observable_up_down_counter(
                name, callbacks=[self._observer_of(field)], unit=unit, description=description)
        meter.create_observable_counter(
            "db.client.connection.timeouts", callbacks=[self._observer_of(
                "acquire_timeouts_total")], unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
                        "obtain a connection from the pool.",
        )
        self._unsubscribe: list[Callable[[], None]] = []
        for name, pool in _pools_of(target).items():
            attributes = {POOL_NAME: mask_dsn(name)}
            self._unsubscribe.append(pool.events.subscribe(self._event_hook(attributes)))
            self._unsubscribe.append(tap_queries(pool.events, self._query_tap(attributes)))

    # ------------------------------------------------------------------ synchronous

    def _event_hook(self, attributes: dict[str, str]) -> Callable[[Event], None]:
        record_create, record_wait = self._create.record, self._wait.record
        record_use = self._use.record

        def hook(event: Event, /) -> None:
            if isinstance(event, Acquired):
                record_wait(event.wait_s, attributes)
            elif isinstance(event, Released):
                record_use(event.hold_s, attributes)
            elif isinstance(event, ConnectionOpened):
                record_create(event.duration_s, attributes)

        return hook

    def _query_tap(
        self, attributes: dict[str, str]
    ) -> Callable[[str, float, BaseException | None], None]:
        ok = {**attributes, **_SYSTEM}
        record = self._operation.record

        def tap(statement: str, elapsed_s: float, error: BaseException | None, /) -> None:
            record(elapsed_s, ok if error is None else {**ok, "error.type": type(error).__name__})

        return tap

    # ------------------------------------------------------------------ asynchronous

    def _snapshots(self) -> Mapping[str, PoolStats]:
        target = None if self._closed else self._target()
        if target is None:
            return {}
        return _by_node(target.stats())

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for node, stats in self._snapshots().items():
            name = mask_dsn(node)
            out.append(Observation(stats.connections_idle, {POOL_NAME: name, STATE: "idle"}))
            out.append(Observation(stats.connections_in_use, {POOL_NAME: name, STATE: "used"}))
        return out

    def _observer_of(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(stats, field), {POOL_NAME: mask_dsn(node)})
                    for node, stats in self._snapshots().items()]

        return observe

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop recording: unsubscribe from every pool; asynchronous instruments report
        nothing from now on. Idempotent."""
        self._closed = True
        while self._unsubscribe:
            self._unsubscribe.pop()()

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "recording"
        return f"<Instrumentation {state} pools={self._pool_names}>"


def instrument(target: Target, meter_provider: MeterProvider | None = None) -> Instrumentation:
    """Create the OpenTelemetry instruments for ``target`` (a ``Database``: every pool it
    has now; or one ``Pool``) on ``meter_provider`` (default: the global one).

    Raises ``ImportError`` naming the ``poolwarden[otel]`` extra when opentelemetry-api is
    not installed.
    """
    if not _HAVE_OTEL:
        raise ImportError(_MISSING_EXTRA)
    meter = get_meter(_METER_NAME, meter_provider=meter_provider)
    return Instrumentation(target, meter)
