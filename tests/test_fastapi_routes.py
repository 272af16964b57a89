"""Health, pool and metrics routes on real PostgreSQL: readiness with latency and pool
figures, liveness that never depends on the database, the stats and advisor report,
Prometheus text, configurable paths — and readiness following a stopped and restarted
server, a circuit breaker opened through a fault proxy, and a failed check's error type,
while liveness stays up."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from fastapi_helpers import database_for, serve_in_process, unique_app_name, wait_for
from poolwarden import Database
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.fastapi import Connection, HealthRoutes, install, lifespan, state_of
from poolwarden.metrics import PoolMetrics
from poolwarden.protect.breaker import BreakerConfig
from poolwarden.testing import FaultProxy

FAST_RECONNECT = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2}
# A failed check's type, never its message; the failures a check of a cut network meets.
CHECK_FAILURES = {"PoolTimeout", "DeadlineExceeded", "TimeoutError", "CircuitOpen"}


def assert_names_no_server(text: str, server: EmbeddedPostgres, *ports: int) -> None:
    for secret in (server.password, f":{server.port}", "127.0.0.1", "postgresql://",
                   *(f":{port}" for port in ports)):
        assert secret not in text


def routes_app(
    db: Database, routes: HealthRoutes | None = None, gate: asyncio.Event | None = None,
    **lifespan_options: object,
) -> FastAPI:
    options: dict[str, object] = {"metrics": PoolMetrics(CollectorRegistry()),
                                  "health_interval_s": 0.2, "health_timeout_s": 1.0}
    options.update(lifespan_options)
    app = FastAPI(lifespan=lifespan(db, **options))  # type: ignore[arg-type]
    install(app, routes=routes)

    @app.get("/held")
    async def held(conn: Connection) -> dict[str, int]:
        if gate is not None:
            await gate.wait()
        return {"one": await conn.fetchval("SELECT 1")}

    return app


async def test_readiness_reports_latency_and_pool_figures(pg: EmbeddedPostgres) -> None:
    """200 ``ready`` with the check's latency and the pool's counts, and nothing that
    names the server or carries a credential."""
    app = routes_app(database_for(pg.dsn, unique_app_name()))
    async with serve_in_process(app) as client:
        response = await client.get("/health/db")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "ready"
    assert body["latency_ms"] >= 0
    node = body["nodes"]["primary"]
    assert node["ok"] is True
    assert node["in_recovery"] is False
    assert node["error_type"] is None
    assert (body["reason"], node["ready"], node["reason"]) == (None, True, None)
    assert (node["breaker"], node["retry_after_s"]) == ("closed", None)
    assert "retry-after" not in response.headers
    assert set(node["pool"]) == {"connections", "idle", "in_use", "waiting", "max", "utilisation"}
    assert node["pool"]["max"] == 4
    assert_names_no_server(response.text, pg)


async def test_liveness_answers_without_the_database(pg: EmbeddedPostgres) -> None:
    """Liveness is 200 ``alive`` and takes no connection (the acquire count is unchanged)."""
    app = routes_app(database_for(pg.dsn, unique_app_name()), health_interval_s=60.0)
    async with serve_in_process(app) as client:
        before = state_of(app).database.stats()["primary"].acquires_total
        responses = [await client.get("/health/live") for _ in range(5)]
        after = state_of(app).database.stats()["primary"].acquires_total
    assert {r.status_code for r in responses} == {200}
    assert responses[0].json()["status"] == "alive"
    assert after == before


async def test_pool_route_shows_stats_and_the_advisors_findings(pg: EmbeddedPostgres) -> None:
    """``/health/pool``: this worker's stats snapshot per node and a findings list per node."""
    app = routes_app(database_for(pg.dsn, unique_app_name()))
    async with serve_in_process(app) as client:
        await client.get("/held")
        body = (await client.get("/health/pool")).json()
    stats = body["nodes"]["primary"]
    assert stats["name"] == "primary"
    assert stats["acquires_total"] >= 1
    assert stats["max_size"] == 4
    assert 0 <= stats["utilisation"] <= 1
    assert isinstance(body["findings"]["primary"], list)
    for finding in body["findings"]["primary"]:
        assert {"severity", "code", "message", "action"} <= set(finding)
    assert isinstance(body["worker_pid"], int)


async def test_metrics_route_syncs_the_pool_stats_before_rendering(pg: EmbeddedPostgres) -> None:
    """Prometheus text with the pool's series, fresh at scrape time (the acquires of the
    requests just made are counted although the background sync runs every 60 s)."""
    registry = CollectorRegistry()
    app = routes_app(database_for(pg.dsn, unique_app_name()),
                     metrics=PoolMetrics(registry), metrics_interval_s=60.0)
    async with serve_in_process(app) as client:
        for _ in range(3):
            await client.get("/held")
        response = await client.get("/metrics")
        acquires = state_of(app).database.stats()["primary"].acquires_total
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'db_client_connection_max{db_client_connection_pool_name="primary"} 4.0' in text
    assert (f'poolwarden_acquires_total{{db_client_connection_pool_name="primary"}} '
            f"{float(acquires)}") in text
    assert pg.password not in text


async def test_routes_take_a_prefix_and_each_can_be_left_out(pg: EmbeddedPostgres) -> None:
    """A prefix moves every route; a path of None leaves that route out."""
    routes = HealthRoutes(prefix="/ops", pool=None, metrics=None)
    app = routes_app(database_for(pg.dsn, unique_app_name()), routes)
    async with serve_in_process(app) as client:
        assert (await client.get("/ops/health/db")).status_code == 200
        assert (await client.get("/ops/health/live")).status_code == 200
        assert (await client.get("/ops/health/pool")).status_code == 404
        assert (await client.get("/ops/metrics")).status_code == 404
        assert (await client.get("/health/db")).status_code == 404


async def test_readiness_is_off_while_shutting_down(pg: EmbeddedPostgres) -> None:
    """Once shutdown begins (here: draining a request in flight), readiness answers 503
    ``shutting_down`` while liveness stays 200."""
    gate = asyncio.Event()
    app = routes_app(database_for(pg.dsn, unique_app_name()), gate=gate)
    async with serve_in_process(app) as client:
        call = asyncio.create_task(client.get("/held"))

        async def held() -> bool:
            return state_of(app).database.stats()["primary"].connections_in_use == 1

        assert await wait_for(held)
        state_of(app).draining = True  # what the lifespan sets first on shutdown
        ready = await client.get("/health/db")
        live = await client.get("/health/live")
        gate.set()
        await call
    assert (ready.status_code, ready.json()) == (503, {"status": "shutting_down"})
    assert live.status_code == 200


@pytest.mark.slow
async def test_a_stopped_database_turns_readiness_off_and_liveness_stays_on(
    fresh_pg: EmbeddedPostgres,
) -> None:
    """Server stopped: readiness 503 ``unavailable`` naming only the error type, liveness
    200. Server back: readiness 200 again, without restarting the application."""
    db = database_for(fresh_pg.dsn, unique_app_name(), **FAST_RECONNECT)
    app = routes_app(db)
    async with serve_in_process(app) as client:
        assert (await client.get("/health/db")).status_code == 200
        fresh_pg.stop()

        async def not_ready() -> bool:
            return (await client.get("/health/db")).status_code == 503

        assert await wait_for(not_ready, timeout=30)
        down = await client.get("/health/db")
        assert down.json()["status"] == "unavailable"
        assert down.json()["nodes"]["primary"]["ok"] is False
        assert down.json()["nodes"]["primary"]["error_type"].isidentifier()  # a type name
        assert_names_no_server(down.text, fresh_pg)
        assert (await client.get("/health/live")).status_code == 200
        fresh_pg.start()

        async def ready() -> bool:
            return (await client.get("/health/db")).status_code == 200

        assert await wait_for(ready, timeout=30)
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/held")).status_code == 200


async def test_readiness_says_circuit_open_while_the_breaker_refuses_and_recovers_on_its_own(
    pg: EmbeddedPostgres, proxy: FaultProxy,
) -> None:
    """Connections through the proxy refused: the health checks' own attempts open the
    breaker, and readiness answers 503 ``circuit_open`` — the error type ``CircuitOpen``,
    the breaker's state and retry-after, a ``Retry-After`` header, nothing that names the
    server. Liveness stays 200. Network back: with no traffic but the checks, a check is the
    probe that closes the breaker, and readiness is 200 again."""
    breaker = BreakerConfig(consecutive_failures=2, open_s=0.3, max_open_s=0.6, jitter=0.0)
    db = database_for(proxy.dsn_for(pg.dsn), unique_app_name(), breaker=breaker,
                      reconnect_initial_delay=0.01, reconnect_max_delay=0.05)
    app = routes_app(db)
    async with serve_in_process(app) as client:
        assert (await client.get("/health/db")).status_code == 200
        proxy.refuse()
        proxy.reset_all()
        refused: list[httpx.Response] = []

        async def circuit_open() -> bool:
            response = await client.get("/health/db")
            node = response.json().get("nodes", {}).get("primary", {})
            if response.status_code == 503 and node.get("error_type") == "CircuitOpen":
                refused.append(response)
                return True
            return False

        assert await wait_for(circuit_open, timeout=15)
        down = refused[-1]
        body = down.json()
        node = body["nodes"]["primary"]
        assert (body["status"], body["reason"]) == ("unavailable", "circuit_open")
        assert (node["ok"], node["ready"], node["reason"]) == (False, False, "circuit_open")
        assert node["breaker"] in {"open", "half_open"}
        assert isinstance(node["retry_after_s"], float)
        assert 0 <= node["retry_after_s"] <= breaker.max_open_s
        assert int(down.headers["retry-after"]) >= 1
        assert_names_no_server(down.text, pg, proxy.port)
        assert (await client.get("/health/live")).status_code == 200

        proxy.heal()

        async def ready() -> bool:
            return (await client.get("/health/db")).status_code == 200

        assert await wait_for(ready, timeout=15)
        up = await client.get("/health/db")
        node = up.json()["nodes"]["primary"]
        assert (up.json()["reason"], node["breaker"], node["error_type"]) == (None, "closed", None)
        assert "retry-after" not in up.headers
        assert (await client.get("/held")).status_code == 200


async def test_readiness_names_the_type_of_a_failed_check_and_no_message(
    pg: EmbeddedPostgres, proxy: FaultProxy,
) -> None:
    """Breaker off, connections refused: the check fails waiting for a connection, and
    readiness answers 503 ``check_failed`` with the error's type — the same as the health
    report's — and no message, address or password; no ``Retry-After`` (nothing says when)."""
    db = database_for(proxy.dsn_for(pg.dsn), unique_app_name(), breaker=None,
                      reconnect_initial_delay=0.01, reconnect_max_delay=0.05)
    app = routes_app(db, health_interval_s=60.0, health_timeout_s=0.5)  # checks when told
    async with serve_in_process(app) as client:
        monitor = state_of(app).monitor
        proxy.refuse()
        proxy.reset_all()
        await asyncio.sleep(0.05)  # the pool's connection sees the reset
        report = await monitor.refresh()
        assert report is not None
        checked = report.node("primary")
        response = await client.get("/health/db")
    assert checked.error_type in CHECK_FAILURES - {"CircuitOpen"}
    assert checked.error is not None
    assert checked.error.startswith(f"{checked.error_type}: ")
    assert response.status_code == 503
    body = response.json()
    node = body["nodes"]["primary"]
    assert (body["reason"], node["reason"]) == ("check_failed", "check_failed")
    assert (node["error_type"], node["breaker"]) == (checked.error_type, "disabled")
    assert node["retry_after_s"] is None
    assert "retry-after" not in response.headers
    assert checked.error not in response.text
    assert_names_no_server(response.text, pg, proxy.port)
