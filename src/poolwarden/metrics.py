"""Prometheus metrics for the pools: an adapter over :class:`~poolwarden.pool.PoolStats`.

Names follow the OpenTelemetry database-client connection-pool semantic conventions in their
Prometheus form (``db_client_connection_count{db_client_connection_state="idle|used"}``,
``db_client_connection_max`` …), labelled ``db_client_connection_pool_name`` with the node
name — never a DSN; poolwarden's own numbers carry the ``poolwarden_`` prefix.

Why real ``Gauge``/``Counter`` objects and not a custom collector: under prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, several gunicorn/uvicorn workers) a
scrape is answered by one worker that reads every worker's values from files; a custom
collector would only ever see the answering worker's pools. So each process copies its
snapshot into its own metric objects: :meth:`PoolMetrics.sync` sets the gauges and adds to
the counters what the cumulative ``*_total`` fields grew by since the last sync.
:class:`MetricsSync` does that in the background; call :meth:`MetricsSync.sync_now` in the
``/metrics`` route for values fresh at scrape time, then :func:`render`.

Optional dependency: this module is not imported by ``import poolwarden``. It imports
without prometheus-client too: :class:`NoopMetrics` (the no-op exporter behind the same
:class:`MetricsExporter` interface) and :class:`MetricsSync` work without it; building a
:class:`PoolMetrics` or calling :func:`render` then raises ``ImportError`` naming the
``poolwarden[metrics]`` extra. :func:`make_exporter` picks whichever is available.

Histograms come from the pool core's fixed-bucket histograms (``PoolStats.histograms``,
``{kind: snapshot}``), picked up by :meth:`PoolMetrics.sync`, or are fed by hand through
:meth:`PoolMetrics.observe_histogram`; a kind appears only once a snapshot of it is fed
(never invented from the totals). The kinds and their names (:data:`HISTOGRAMS`):

- ``create``, ``wait``, ``use`` → ``db_client_connection_create_time_seconds``,
  ``db_client_connection_wait_time_seconds``, ``db_client_connection_use_time_seconds``
  (OTel ``db.client.connection.create_time`` / ``.wait_time`` / ``.use_time``);
- ``query`` → ``db_client_operation_duration_seconds`` (OTel ``db.client.operation.duration``):
  the time of each statement, raw asyncpg and SQLAlchemy alike. It carries the same
  ``db_client_connection_pool_name`` label as every other series here, not the convention's
  ``db_system_name`` / ``db_namespace`` / ``db_operation_name``: one label set across the
  exporter (dashboards join by pool), and no label whose values grow with the application's
  statements. The node name says which database; the system is always PostgreSQL.

Buckets are the core's (100 µs to 60 s), the same in every worker, so in multiprocess mode
the workers' histograms add up bucket by bucket, like the counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, runtime_checkable

from ._background import BackgroundTask
from ._secrets import mask_dsn
from .pool import CloseReason, PoolStats

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from prometheus_client.multiprocess import MultiProcessCollector

    _HAVE_PROMETHEUS = True
except ImportError:  # the `metrics` extra is not installed: only the no-op exporter works
    _HAVE_PROMETHEUS = False

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_SYNC_INTERVAL_S",
    "HISTOGRAMS",
    "POOL_LABEL",
    "HistogramSnapshot",
    "MetricsExporter",
    "MetricsSync",
    "NoopMetrics",
    "PoolMetrics",
    "StatsSource",
    "default_metrics",
    "make_exporter",
    "prometheus_available",
    "render",
]

logger = logging.getLogger(__name__)
_K = TypeVar("_K")

DEFAULT_SYNC_INTERVAL_S = 5.0
POOL_LABEL: Final = "db_client_connection_pool_name"
STATE_LABEL: Final = "db_client_connection_state"
REASON_LABEL: Final = "reason"
_MISSING_EXTRA = "Prometheus metrics need prometheus-client: pip install 'poolwarden[metrics]'"

# Gauges: (name, help, PoolStats field, multiprocess mode). Every pool gauge is `livesum`:
# each worker process owns a separate pool to the node, so the service-wide number is the
# sum over the workers alive now, and a dead worker's connections are gone with it (its
# file is dropped by `mark_process_dead`).
#  - count idle/used, pending requests, opening, overflow: connections and waiters that
#    exist in each worker; the server sees the sum.
#  - max, idle_max, idle_min: limits per worker, so the service may hold up to the sum —
#    the number to compare with the server's max_connections. `livemax` would show one
#    worker's setting and hide that N workers multiply it.
# `liveall` (one series per pid) would be right for a per-worker view but multiplies the
# series by the worker count; `sum`/`max` without "live" would keep dead workers' values.
_GAUGES: Final[tuple[tuple[str, str, str], ...]] = (
    ("db_client_connection_max", "The most open connections allowed (pool_size + max_overflow).",
     "max_size"),
    ("db_client_connection_idle_max", "The most idle connections kept (pool_size).", "pool_size"),
    ("db_client_connection_idle_min", "The fewest connections kept open (min_size).",
     "min_size"),
    ("db_client_connection_pending_requests", "Callers waiting for a connection now.",
     "requests_waiting"),
    ("poolwarden_connections_opening", "Connection attempts in progress now.",
     "connections_opening"),
    ("poolwarden_connections_overflow", "Connections above pool_size now.",
     "connections_overflow"),
    ("poolwarden_concurrency_limit", "Connections that may be in use at once now (the "
     "adaptive limit, else the maximum).", "concurrency_limit"),
    ("poolwarden_overloaded", "1 while admission is in overload mode.", "overloaded"),
    ("poolwarden_breaker_open", "1 while the circuit breaker refuses calls (open or "
     "half open).", "breaker_open"),
)
_GAUGE_MODE: Final = "livesum"

# Counters: (name without _total, help, cumulative PoolStats field). Counters are summed over
# every worker that ever wrote one, dead ones included, which is what a cumulative count
# needs (a restarted worker starts a new file at zero; the sum never goes down).
_COUNTERS: Final[tuple[tuple[str, str, str], ...]] = (
    ("db_client_connection_timeouts", "Acquires that timed out waiting for a connection.",
     "acquire_timeouts_total"),
    ("poolwarden_acquires", "Connections handed to callers.", "acquires_total"),
    ("poolwarden_acquires_waited", "Acquires that had to queue.", "acquires_waited_total"),
    ("poolwarden_acquire_wait_seconds", "Time spent queueing by the acquires that queued.",
     "acquire_wait_ms_total"),
    ("poolwarden_acquire_refusals", "Acquires refused at once because max_waiting callers "
     "were already waiting.", "acquire_refusals_total"),
    ("poolwarden_acquire_cancelled", "Callers cancelled while waiting for a connection.",
     "acquire_cancelled_total"),
    ("poolwarden_connections_created", "Connections opened.", "connections_created_total"),
    ("poolwarden_connection_errors", "Failed connection attempts.", "connection_errors_total"),
    ("poolwarden_pings", "Pre-pings of idle connections before reuse.", "pings_total"),
    ("poolwarden_ping_failures", "Pre-pings that failed.", "ping_failures_total"),
    ("poolwarden_connection_restores", "Releases that needed a rollback or reset round trip.",
     "restores_total"),
    ("poolwarden_server_restarts", "Server restarts detected.", "server_restarts_total"),
    ("poolwarden_connection_leaks", "Checkouts held longer than the leak threshold.",
     "leaks_total"),
    ("poolwarden_acquire_shed", "Acquires refused or shed by overload admission.",
     "acquire_shed_total"),
    ("poolwarden_circuit_refusals", "Acquires refused at once by the open circuit breaker.",
     "circuit_refusals_total"),
)
_CLOSED = "poolwarden_connections_closed"
_CLOSED_KEY = "connections_closed_total"
_MS_FIELDS: Final = frozenset({"acquire_wait_ms_total"})

HISTOGRAMS: Final[Mapping[str, tuple[str, str]]] = {
    "create": ("db_client_connection_create_time_seconds",
               "Time it took to open a new connection."),
    "wait": ("db_client_connection_wait_time_seconds",
             "Time it took to obtain an open connection from the pool."),
    "use": ("db_client_connection_use_time_seconds",
            "Time between borrowing a connection and returning it to the pool."),
    "query": ("db_client_operation_duration_seconds",
              "Duration of database client operations: each statement the application "
              "sent, raw asyncpg and SQLAlchemy alike."),
}
"""The histogram kinds :meth:`PoolMetrics.observe_histogram` accepts: kind → (name, help)."""


def prometheus_available() -> bool:
    """Whether prometheus-client is installed (the ``metrics`` extra)."""
    return _HAVE_PROMETHEUS


@runtime_checkable
class HistogramSnapshot(Protocol):
    """A cumulative fixed-bucket histogram of one operation of one pool, since its creation.

    ``bounds_s``: the finite bucket upper bounds in seconds, strictly increasing, the same
    for the life of the pool. ``counts``: per-bucket (not cumulative) observation counts,
    ``len(bounds_s) + 1`` of them — the last counts observations above the largest bound.
    ``sum_s``: the sum of all observations in seconds. All three only grow, like ``*_total``.
    """

    @property
    def bounds_s(self) -> Sequence[float]: ...

    @property
    def counts(self) -> Sequence[int]: ...

    @property
    def sum_s(self) -> float: ...


class StatsSource(Protocol):
    """What :class:`MetricsSync` reads: ``Database`` (``{node: PoolStats}``) or a ``Pool``."""

    def stats(self) -> Mapping[str, PoolStats] | PoolStats: ...


class MetricsExporter(Protocol):
    """The tracker interface: an exporter takes the pools' snapshots, by node name."""

    def sync(self, stats: Mapping[str, PoolStats] | PoolStats) -> None: ...


class NoopMetrics:
    """The exporter that does nothing (metrics off, or prometheus-client not installed)."""

    def sync(self, stats: Mapping[str, PoolStats] | PoolStats) -> None:
        """Ignore ``stats``."""

    def __repr__(self) -> str:
        return "<NoopMetrics>"


def _by_node(stats: Mapping[str, PoolStats] | PoolStats) -> Mapping[str, PoolStats]:
    return {stats.name: stats} if isinstance(stats, PoolStats) else stats


def _totals(stats: PoolStats) -> dict[tuple[str, str], float]:
    """Every cumulative number of ``stats`` in the exported unit, keyed (metric, reason)."""
    out: dict[tuple[str, str], float] = {}
    for name, _, field in _COUNTERS:
        value = float(getattr(stats, field))
        out[name, ""] = value / 1000.0 if field in _MS_FIELDS else value
    for reason in CloseReason:
        out[_CLOSED, reason.value] = 0.0
    for reason_name, count in stats.connections_closed_total.items():
        out[_CLOSED, reason_name] = float(count)
    return out


def _increments(last: Mapping[_K, float] | None, now: Mapping[_K, float]) -> dict[_K, float]:
    """What each cumulative number grew by since ``last``.

    If any of them went down, the numbers come from a new pool that took the old one's
    name (a pool's ``*_total`` never decrease): all of its counts are new, so they are the
    increments. (A replacement whose counts all overtook the old ones between two syncs
    cannot be told apart from growth; it under-counts by the old values.)
    """
    if last is None or any(now[key] < last.get(key, 0.0) for key in now):
        return dict(now)
    return {key: value - last.get(key, 0.0) for key, value in now.items()}


class PoolMetrics:
    """The Prometheus exporter: real metric objects in ``registry``, updated by :meth:`sync`.

    ``registry`` defaults to prometheus-client's global ``REGISTRY``: that is what an
    application's existing ``/metrics`` endpoint (``make_asgi_app()``, instrumentators)
    already serves, and in multiprocess mode the registry does not matter (values go to
    files). Its metric names can be registered once per registry: use :func:`default_metrics`
    for the process-wide exporter on ``REGISTRY``, and a ``CollectorRegistry()`` of your own
    for any other (tests do). Node names must be unique among the pools of one exporter.

    Thread-safe: syncs from a background task and from a scrape in a thread do not double
    count. Raises ``ImportError`` when prometheus-client is not installed.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if not _HAVE_PROMETHEUS:
            raise ImportError(_MISSING_EXTRA)
        self._registry = REGISTRY if registry is None else registry
        self._lock = threading.Lock()
        self._last: dict[str, dict[tuple[str, str], float]] = {}
        self._last_histograms: dict[tuple[str, str], list[float]] = {}  # counts + [sum]
        self._histograms: dict[str, tuple[Histogram, list[float]]] = {}  # kind → it, bounds
        reg = self._registry
        self._count = Gauge(
            "db_client_connection_count", "Open connections by state: idle or used (in use).",
            [POOL_LABEL, STATE_LABEL], registry=reg, multiprocess_mode=_GAUGE_MODE,
        )
        self._gauges = [
            (Gauge(name, doc, [POOL_LABEL], registry=reg, multiprocess_mode=_GAUGE_MODE), field)
            for name, doc, field in _GAUGES
        ]
        self._counters = {
            name: Counter(name, doc, [POOL_LABEL], registry=reg) for name, doc, _ in _COUNTERS
        }
        self._closed = Counter(
            _CLOSED, "Connections closed, by reason.", [POOL_LABEL, REASON_LABEL], registry=reg
        )

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def sync(self, stats: Mapping[str, PoolStats] | PoolStats) -> None:
        """Copy snapshots into the metrics: ``{node: PoolStats}`` (``Database.stats()``) or
        one ``PoolStats`` (``Pool.stats()``, labelled with its name).

        Gauges are set; counters grow by what the ``*_total`` fields grew since the last
        sync of that node, so syncing twice with no new work changes nothing. A
        ``histograms`` mapping on a snapshot, when the core provides one, is fed to
        :meth:`observe_histogram`.
        """
        with self._lock:
            for node, snapshot in _by_node(stats).items():
                self._sync_node(node, snapshot)

    def _sync_node(self, node: str, stats: PoolStats) -> None:
        label = mask_dsn(node)  # a node name is a name; should a DSN slip in, no password
        self._count.labels(label, "idle").set(stats.connections_idle)
        self._count.labels(label, "used").set(stats.connections_in_use)
        for gauge, field in self._gauges:
            gauge.labels(label).set(getattr(stats, field))
        now = _totals(stats)
        for (name, reason), amount in _increments(self._last.get(node), now).items():
            # inc(0) too: every series exists from the first sync, so rate() sees its start
            if reason:
                self._closed.labels(label, reason).inc(amount)
            else:
                self._counters[name].labels(label).inc(amount)
        self._last[node] = now
        histograms: Mapping[str, HistogramSnapshot] | None = getattr(stats, "histograms", None)
        for kind, snapshot in (histograms or {}).items():
            self._observe(node, kind, snapshot)

    def observe_histogram(self, node: str, kind: str, snapshot: HistogramSnapshot) -> None:
        """Feed one cumulative histogram of node ``node``; ``kind`` is a key of
        :data:`HISTOGRAMS` (``create``, ``wait``, ``use``, ``query``).

        The Prometheus histogram is created on the first snapshot of its kind, with the
        snapshot's bounds, and grows by the increments since the previous one (a decrease
        means a new pool: all of it is new). Raises ``ValueError`` for an unknown kind,
        counts that do not match the bounds, or bounds that differ from the first ones.
        """
        with self._lock:
            self._observe(node, kind, snapshot)

    def _observe(self, node: str, kind: str, snapshot: HistogramSnapshot) -> None:
        if kind not in HISTOGRAMS:
            raise ValueError(f"unknown histogram kind {kind!r}; expected one of {list(HISTOGRAMS)}")
        bounds = [float(b) for b in snapshot.bounds_s]
        counts = [float(c) for c in snapshot.counts]
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"{kind}: {len(counts)} counts for {len(bounds)} bounds (need +1)")
        known = self._histograms.get(kind)
        if known is None:
            name, doc = HISTOGRAMS[kind]
            known = Histogram(name, doc, [POOL_LABEL], registry=self._registry,
                              buckets=bounds), bounds
            self._histograms[kind] = known
        elif known[1] != bounds:
            raise ValueError(f"{kind}: bucket bounds changed from the first snapshot's")
        now = [*counts, float(snapshot.sum_s)]  # the sum last
        last = self._last_histograms.get((node, kind))
        grown = _increments(None if last is None else dict(enumerate(last)), dict(enumerate(now)))
        child = known[0].labels(mask_dsn(node))
        # prometheus-client has no public call to add n observations with a known sum; these
        # per-bucket and sum values are what observe() increments, in every mode
        # (multiprocess included: they are the values backed by the worker's file).
        for i, bucket in enumerate(child._buckets):
            if grown[i]:
                bucket.inc(grown[i])
        child._sum.inc(grown[len(now) - 1])
        self._last_histograms[node, kind] = now

    def __repr__(self) -> str:
        return f"<PoolMetrics nodes={sorted(self._last)} histograms={sorted(self._histograms)}>"


_default: PoolMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> PoolMetrics:
    """The process-wide :class:`PoolMetrics` on the global ``REGISTRY`` (created once)."""
    global _default  # noqa: PLW0603 - one exporter per registry and process, made on demand
    with _default_lock:
        if _default is None:
            _default = PoolMetrics()
        return _default


def make_exporter(registry: CollectorRegistry | None = None) -> PoolMetrics | NoopMetrics:
    """A :class:`PoolMetrics` when prometheus-client is installed, else :class:`NoopMetrics`.

    With no ``registry``, the shared :func:`default_metrics`."""
    if not _HAVE_PROMETHEUS:
        return NoopMetrics()
    return default_metrics() if registry is None else PoolMetrics(registry)


def render(
    registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
) -> tuple[bytes, str]:
    """The exposition text to answer a scrape with, and its content type.

    In multiprocess mode — ``multiprocess_dir`` given, or ``PROMETHEUS_MULTIPROC_DIR`` set —
    every worker's values are merged from the files by a ``MultiProcessCollector`` on a
    fresh registry (``registry`` is then not used: its values are this worker's only).
    Otherwise ``registry`` (default: the global ``REGISTRY``) is rendered.
    """
    if not _HAVE_PROMETHEUS:
        raise ImportError(_MISSING_EXTRA)
    path = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        merged = CollectorRegistry()
        # untyped in prometheus-client (0.26): the one call of it here
        MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY if registry is None else registry), CONTENT_TYPE_LATEST


class MetricsSync(BackgroundTask):
    """Syncs ``source``'s stats into ``exporter`` every ``interval`` seconds, in the background.

    ``source`` is a ``Database`` or a ``Pool`` (anything with ``stats()``); only a weak
    reference is kept, so the task does not keep a forgotten database alive and ends when
    it is gone. ``exporter`` defaults to :func:`make_exporter` (the shared Prometheus exporter, or
    the no-op one without prometheus-client). ``start()`` needs a running loop; ``stop()``
    cancels the task and waits for it. Also an async context manager.
    """

    TASK_NAME = "poolwarden-metrics-sync"

    def __init__(
        self,
        source: StatsSource,
        exporter: MetricsExporter | None = None,
        *,
        interval: float = DEFAULT_SYNC_INTERVAL_S,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0 seconds")
        self._source: weakref.ref[StatsSource] = weakref.ref(source)
        self.exporter: MetricsExporter = make_exporter() if exporter is None else exporter
        self.interval = interval
        super().__init__()


    def sync_now(self) -> bool:
        """Sync once now (e.g. in the ``/metrics`` route before :func:`render`, for values
        fresh at scrape time); ``False`` when the source is gone."""
        source = self._source()
        if source is None:
            return False
        self.exporter.sync(source.stats())
        return True


    async def _run(self) -> None:
        while True:
            try:
                if not self.sync_now():
                    return  # the source was garbage-collected
            except Exception as exc:
                # A bug, not a database problem (stats() does no I/O): log the type only —
                # and keep going, so one bad sync does not end the metrics for good.
                logger.error(  # noqa: TRY400 - no traceback: messages might hold a DSN
                    "metrics sync raised %s; will retry", type(exc).__name__
                )
            await asyncio.sleep(self.interval)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MetricsSync {state} interval={self.interval}s exporter={self.exporter!r}>"
