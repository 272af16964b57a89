"""Health, pool and metrics routes, each at a configurable path and each optional.

- readiness (``/health/db``): 200 when the last background check of every node passed and
  is fresh, with the check's latency and the pool's figures; 503 when not (or while the
  application shuts down). The probe itself does no round trip: it reads the monitor's last
  report, so that a storm of probes cannot queue in the pool it is judging.
- liveness (``/health/live``): always 200 while the process answers. Never touches the
  database: a database outage must not make the orchestrator restart every replica.
- ``/health/pool``: this worker's stats snapshot and the advisor's findings.
- ``/metrics``: Prometheus exposition; the pool stats are synced into the registry first.
  Under ``PROMETHEUS_MULTIPROC_DIR`` the answer merges every worker's values.

Bodies hold names and numbers only: node names, counts, latencies, error *types* — never an
address, a DSN or an error message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...advisor import Finding
from ...health import NodeHealth
from ...metrics import PoolMetrics, prometheus_available, render
from ...pool import PoolStats
from ._state import STATE_ATTRIBUTE, PoolwardenState, state_of

__all__ = ["HealthRoutes", "health_router"]

_NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class HealthRoutes:
    """Where the routes go: ``prefix`` + each path; a path of ``None`` leaves that route out.

    The metrics route is also left out when prometheus-client is not installed.
    """

    prefix: str = ""
    readiness: str | None = "/health/db"
    liveness: str | None = "/health/live"
    pool: str | None = "/health/pool"
    metrics: str | None = "/metrics"
    include_in_schema: bool = False
    tags: tuple[str, ...] = ("health",)


def health_router(routes: HealthRoutes | None = None) -> APIRouter:
    """An ``APIRouter`` with the routes ``routes`` asks for (default: all of them)."""
    routes = routes or HealthRoutes()
    router = APIRouter(prefix=routes.prefix, tags=list(routes.tags))
    wanted = (
        (routes.readiness, readiness),
        (routes.liveness, liveness),
        (routes.pool, pool_report),
        (routes.metrics if prometheus_available() else None, metrics),
    )
    for path, endpoint in wanted:
        if path is not None:
            router.add_api_route(path, endpoint, methods=["GET"],
                                 include_in_schema=routes.include_in_schema)
    return router


# ---------------------------------------------------------------------- readiness


def _pool_figures(stats: PoolStats) -> dict[str, Any]:
    return {
        "connections": stats.connections,
        "idle": stats.connections_idle,
        "in_use": stats.connections_in_use,
        "waiting": stats.requests_waiting,
        "max": stats.max_size,
        "utilisation": round(stats.utilisation, 3),
    }


def _node_figures(health: NodeHealth, stats: PoolStats | None) -> dict[str, Any]:
    return {
        "ok": health.ok,
        "latency_ms": None if health.latency_ms is None else round(health.latency_ms, 3),
        "acquire_ms": None if health.acquire_ms is None else round(health.acquire_ms, 3),
        "in_recovery": health.in_recovery,
        # The type only: the message names the server's address.
        "error_type": None if health.error is None else health.error.split(":", 1)[0],
        "pool": _pool_figures(stats or health.stats),
    }


async def readiness(request: Request) -> JSONResponse:
    """200 ``{"status": "ready", ...}`` or 503 ``{"status": "unavailable" | "shutting_down"}``."""
    state = state_of(request)
    if state.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503, headers=_NO_STORE)
    monitor = state.monitor
    report = monitor.last
    if report is None:
        report = await monitor.refresh()
    ready = report is not None and monitor.ready()
    live = state.database.stats()
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable"}
    if report is not None:
        age = monitor.age_s
        body["checked_at"] = min(n.checked_at for n in report.nodes).isoformat()
        body["age_s"] = None if age is None else round(age, 3)
        latencies = [n.latency_ms for n in report.nodes if n.latency_ms is not None]
        body["latency_ms"] = round(max(latencies), 3) if latencies else None
        body["nodes"] = {n.node: _node_figures(n, live.get(n.node)) for n in report.nodes}
    return JSONResponse(body, status_code=200 if ready else 503, headers=_NO_STORE)


# ---------------------------------------------------------------------- liveness


async def liveness(request: Request) -> JSONResponse:
    """Always 200 ``{"status": "alive"}`` (with the event loop's lag when known)."""
    body: dict[str, Any] = {"status": "alive"}
    state = getattr(request.app.state, STATE_ATTRIBUTE, None)
    if isinstance(state, PoolwardenState):
        body["loop_lag_ms"] = round(state.monitor.loop_lag_s * 1000.0, 3)
    return JSONResponse(body, headers=_NO_STORE)


# ---------------------------------------------------------------------- pool report


def _finding(finding: Finding) -> dict[str, Any]:
    return {
        "severity": str(finding.severity),
        "code": finding.code,
        "message": finding.message,
        "action": finding.action,
        "evidence": finding.evidence,
        "changes": finding.changes,
    }


async def pool_report(request: Request) -> JSONResponse:
    """This worker's pools: ``{"worker_pid", "nodes": {name: stats}, "findings": {...}}``."""
    state = state_of(request)
    database = state.database
    findings = database.advise(state.advice_baseline())
    nodes = {}
    for name, stats in database.stats().items():
        nodes[name] = {**stats.as_dict(), "utilisation": round(stats.utilisation, 3)}
    body = {
        "worker_pid": os.getpid(),
        "nodes": nodes,
        "findings": {name: [_finding(f) for f in found] for name, found in findings.items()},
    }
    return JSONResponse(jsonable_encoder(body), headers=_NO_STORE)


# ---------------------------------------------------------------------- metrics


async def metrics(request: Request) -> Response:
    """Prometheus exposition text, the pool stats synced just before."""
    state = state_of(request)
    if state.metrics_sync is not None:
        state.metrics_sync.sync_now()
    registry = state.metrics.registry if isinstance(state.metrics, PoolMetrics) else None
    # render() reads every worker's files in multiprocess mode: off the event loop.
    body, content_type = await run_in_threadpool(render, registry)
    return Response(body, media_type=content_type, headers=_NO_STORE)
