"""Health, pool and metrics routes, each at a configurable path and each optional.

- readiness (``/health/db``): 200 when the last background check of every node passed and
  is fresh and no node's circuit breaker refuses calls now, with the check's latency and the
  pool's figures; 503 when not (or while the application shuts down), with a ``reason``
  (``circuit_open``, ``check_failed``, ``stale``, ``no_report``) for the whole and per node.
  A breaker that is open *or half open* means not ready: the pool would refuse all but its
  probe calls (see :mod:`poolwarden.health`). While a breaker refuses, each such node carries
  ``retry_after_s`` (seconds until it lets a probe through, when known) and the 503 a
  ``Retry-After`` header. The probe itself does no round trip: it reads the monitor's last
  report and the pools' in-memory stats, so that a storm of probes cannot queue in the pool
  it is judging.
- liveness (``/health/live``): always 200 while the process answers. Never touches the
  database: a database outage must not make the orchestrator restart every replica.
- ``/health/pool``: this worker's stats snapshot and the advisor's findings.
- ``/metrics``: Prometheus exposition; the pool stats are synced into the registry first.
  Under ``PROMETHEUS_MULTIPROC_DIR`` the answer merges every worker's values.

Bodies hold names and numbers only: node names, counts, latencies, error *types* — never an
address, a DSN or an error message.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...advisor import Finding
from ...health import NodeReadiness
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


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _node_figures(node: NodeReadiness, stats: PoolStats | None) -> dict[str, Any]:
    health = node.health
    return {
        "ok": health.ok,
        "ready": node.ready,
        "reason": None if node.reason is None else node.reason.value,
        "latency_ms": _rounded(health.latency_ms),
        "acquire_ms": _rounded(health.acquire_ms),
        "in_recovery": health.in_recovery,
        # The type only: the message names the server's address.
        "error_type": health.error_type,
        "breaker": node.breaker_state,
        "retry_after_s": _rounded(node.retry_after_s),
        "pool": _pool_figures(stats or health.stats),
    }


async def readiness(request: Request) -> JSONResponse:
    """200 ``{"status": "ready", ...}`` or 503 ``{"status": "unavailable" | "shutting_down"}``.

    With a report: ``reason`` (``None`` when ready), ``checked_at``, ``age_s``,
    ``latency_ms`` and per node ``ok`` (its last check passed), ``ready`` and ``reason``
    (its verdict now), ``error_type``, ``breaker`` (its state now), ``retry_after_s`` and
    the pool's figures.
    """
    state = state_of(request)
    if state.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503, headers=_NO_STORE)
    monitor = state.monitor
    if monitor.last is None:
        await monitor.refresh()
    live = state.database.stats()
    verdict = monitor.readiness(live=live)
    body: dict[str, Any] = {
        "status": "ready" if verdict.ready else "unavailable",
        "reason": None if verdict.reason is None else verdict.reason.value,
    }
    checks = [n.health for n in verdict.nodes]
    if checks:
        body["checked_at"] = min(c.checked_at for c in checks).isoformat()
        body["age_s"] = _rounded(verdict.age_s)
        latencies = [c.latency_ms for c in checks if c.latency_ms is not None]
        body["latency_ms"] = round(max(latencies), 3) if latencies else None
        body["nodes"] = {n.node: _node_figures(n, live.get(n.node)) for n in verdict.nodes}
    headers = dict(_NO_STORE)
    retry_after = verdict.retry_after_s
    if not verdict.ready and retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(body, status_code=200 if verdict.ready else 503, headers=headers)


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
