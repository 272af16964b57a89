"""The application lifespan: open the pools, watch them, drain and close them on shutdown.

::

    app = FastAPI(lifespan=lifespan(Database.from_env, then=my_lifespan))

Start-up, in order: build the ``Database`` (from a factory, in the worker process that will
use it), open its pools warmed to their minimum (failing fast, so that a wrong URL or a down
server stops the worker instead of serving 503s forever; with ``wait_for_database=False`` the
worker starts anyway, not ready, and its pools connect in the background — for platforms
that start the service and its database together), run one health check so that readiness
has an answer at once, start the health monitor and the metrics sync, then enter
the application's own lifespan (``then``), which can use the database.

Shutdown, in reverse: leave the application's lifespan, mark the state draining (readiness
answers 503), stop the monitor and the sync, then ``Database.close(drain_timeout_s)`` — it
stops admitting work, waits up to the timeout for connections still in use, and closes every
connection. In Prometheus multiprocess mode this worker's live gauges are removed, as
gunicorn's ``child_exit`` hook would. (An ASGI server runs the lifespan's shutdown after it
has stopped taking requests and finished the ones in flight, up to its own graceful timeout.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ...database import Database
from ...metrics import MetricsSync, PoolMetrics, default_metrics, prometheus_available
from ._state import STATE_ATTRIBUTE, PoolwardenState

__all__ = ["lifespan"]

logger = logging.getLogger("poolwarden.fastapi")

DEFAULT_DRAIN_TIMEOUT_S = 10.0
DEFAULT_HEALTH_INTERVAL_S = 5.0
DEFAULT_HEALTH_TIMEOUT_S = 2.0
DEFAULT_METRICS_INTERVAL_S = 5.0

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
"""An ASGI lifespan: called with the application, an async context manager yielding ``None``
or a state mapping (Starlette's stateless and stateful lifespans both fit)."""


def lifespan(
    database: Database | Callable[[], Database] | None = None,
    *,
    then: Lifespan | None = None,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S,
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
    metrics: PoolMetrics | bool = True,
    metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S,
    wait_for_database: bool = True,
) -> Lifespan:
    """A lifespan for ``FastAPI(lifespan=...)`` that runs the database (module docstring).

    ``database``: a :class:`~poolwarden.database.Database`, or a factory called at start-up
    (default :meth:`Database.from_env`: configuration errors surface when the worker starts).
    ``then``: the application's own lifespan, entered once the database is open; what it
    yields (a state mapping, or nothing) is what this lifespan yields. ``metrics``: ``True``
    for the process-wide Prometheus exporter (when prometheus-client is installed), a
    :class:`~poolwarden.metrics.PoolMetrics` of your own, or ``False`` for none.

    The state (database, monitor) is on ``app.state.poolwarden`` for the dependencies and
    routes. Raises what ``Database.open`` raises (``ConnectionFailed``) at start-up, unless
    ``wait_for_database=False``: then start-up does not wait for the servers
    (``Database.open(wait=False)``), readiness answers 503 until a health check succeeds, and
    requests meanwhile fail as on a down server (within their acquire timeout or deadline).
    """
    if drain_timeout_s < 0:
        raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s!r}")

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        db = _build(database)
        await db.open(wait=wait_for_database)
        monitor = db.health_monitor(interval=health_interval_s, timeout=health_timeout_s)
        exporter = _exporter(metrics)
        sync = None if exporter is None else MetricsSync(
            db, exporter, interval=metrics_interval_s)
        state = PoolwardenState(db, monitor, metrics_sync=sync, metrics=exporter)
        setattr(app.state, STATE_ATTRIBUTE, state)
        try:
            await monitor.refresh()
            monitor.start()
            if sync is not None:
                sync.start()
            logger.info("database open: %r", db)
            if then is None:
                yield None
            else:
                async with then(app) as inner:
                    yield inner
        finally:
            state.draining = True
            await monitor.stop()
            if sync is not None:
                await sync.stop()
            stats = db.stats()
            in_use = sum(s.connections_in_use for s in stats.values())
            logger.info("database closing: draining %d connection(s) in use, up to %g s",
                        in_use, drain_timeout_s)
            await db.close(timeout=drain_timeout_s)
            _forget_worker_gauges()

    return run


def _build(database: Database | Callable[[], Database] | None) -> Database:
    if database is None:
        return Database.from_env()
    if isinstance(database, Database):
        return database
    return database()


def _exporter(metrics: PoolMetrics | bool) -> PoolMetrics | None:
    if isinstance(metrics, PoolMetrics):
        return metrics
    if metrics and prometheus_available():
        return default_metrics()
    return None


def _forget_worker_gauges() -> None:
    """In multiprocess mode, drop this worker's live gauges (its pools are closed)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not prometheus_available():
        return
    from prometheus_client.multiprocess import mark_process_dead  # noqa: PLC0415 - optional

    mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]
