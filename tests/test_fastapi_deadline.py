"""Request deadlines on real PostgreSQL: the budget comes from the caller's header, the
route or the application default; when it runs out the request gets a 503 with
Retry-After, and a burst against a saturated pool is refused instead of hanging."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_helpers import database_for, serve_in_process, sessions_of, unique_app_name, wait_for
from poolwarden import DeadlineExceeded, deadline, no_deadline, remaining
from poolwarden.deadline import current_deadline
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.fastapi import Connection, WriteSession, install, lifespan, route_deadline, state_of
from poolwarden.integrations.fastapi.middleware import parse_budget

APP_DEFAULT_S = 2.0
ROUTE_S = 30.0


def deadline_app(dsn: str, app_name: str, gate: asyncio.Event, **pool: object) -> FastAPI:
    # No background checks during a test: one holding a connection would skew the counts.
    app = FastAPI(lifespan=lifespan(database_for(dsn, app_name, **pool), metrics=False,
                                    health_interval_s=3600))
    install(app, health=False, default_deadline_s=APP_DEFAULT_S)

    @app.get("/budget")
    async def budget() -> dict[str, float | None]:
        return {"remaining": remaining()}

    @app.get("/long-budget", dependencies=[route_deadline(ROUTE_S)])
    async def long_budget() -> dict[str, float | None]:
        return {"remaining": remaining()}

    @app.get("/raw-sleep")
    async def raw_sleep(conn: Connection) -> dict[str, str]:
        await conn.execute("SELECT pg_sleep(20)")
        return {"slept": "yes"}

    @app.get("/session-sleep")
    async def session_sleep(session: WriteSession) -> dict[str, str]:
        await session.execute(text("SELECT pg_sleep(20)"))
        return {"slept": "yes"}

    @app.get("/hold", dependencies=[route_deadline(ROUTE_S)])
    async def hold(conn: Connection) -> dict[str, int]:
        await gate.wait()
        return {"one": await conn.fetchval("SELECT 1")}

    @app.get("/one")
    async def one(conn: Connection) -> dict[str, int]:
        return {"one": await conn.fetchval("SELECT 1")}

    return app


def test_budget_header_values_parse_as_seconds_or_with_a_unit() -> None:
    """``2.5`` and ``500ms`` are budgets; garbage and negative values are ignored."""
    assert parse_budget("2.5") == 2.5
    assert parse_budget("500ms") == 0.5
    assert parse_budget("0") == 0.0
    assert parse_budget("soon") is None
    assert parse_budget("-1") is None


async def test_budget_is_the_smaller_of_the_header_and_the_service_limit(
    pg: EmbeddedPostgres,
) -> None:
    """No header: the application default. A shorter header wins; a longer one does not
    extend the default; a malformed one is ignored. A route's own limit replaces the
    application default (here: longer), and a caller's header still caps it."""
    app = deadline_app(pg.dsn, unique_app_name(), asyncio.Event())
    async with serve_in_process(app) as client:

        async def left(path: str, header: str | None = None) -> float:
            headers = {"X-Request-Timeout": header} if header is not None else {}
            response = await client.get(path, headers=headers)
            assert response.status_code == 200
            value = response.json()["remaining"]
            assert isinstance(value, float)
            return value

        assert 0 < await left("/budget") <= APP_DEFAULT_S
        assert await left("/budget", "250ms") <= 0.25
        assert await left("/budget", "600") <= APP_DEFAULT_S
        assert 0.25 < await left("/budget", "later") <= APP_DEFAULT_S
        assert APP_DEFAULT_S < await left("/long-budget") <= ROUTE_S
        assert await left("/long-budget", "0.25") <= 0.25


@pytest.mark.parametrize("path", ["/raw-sleep", "/session-sleep"])
async def test_a_statement_past_the_budget_is_cut_short_with_a_503(
    pg: EmbeddedPostgres, path: str
) -> None:
    """A 20 s statement under a 0.3 s budget: 503 ``deadline_exceeded`` with Retry-After,
    the statement no longer runs on the server, the connection is back in the pool."""
    app_name = unique_app_name()
    app = deadline_app(pg.dsn, app_name, asyncio.Event())
    async with serve_in_process(app) as client:
        response = await asyncio.wait_for(
            client.get(path, headers={"X-Request-Timeout": "0.3"}), timeout=10)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json() == {
            "error": "deadline_exceeded", "detail": "the request's time budget ran out"}

        async def released() -> bool:
            rows = await sessions_of(pg, app_name)
            sleeping = any(r["state"] == "active" and "pg_sleep" in (r["query"] or "")
                           for r in rows)
            in_use = state_of(app).database.stats()["primary"].connections_in_use
            return not sleeping and in_use == 0

        assert await wait_for(released)


async def test_a_burst_against_a_saturated_pool_is_refused_fast_and_the_service_recovers(
    pg: EmbeddedPostgres,
) -> None:
    """Both connections held by slow requests, then a burst of 20: every request of the
    burst is answered 503 with Retry-After while the slow ones still hold the pool (without
    the deadline they would wait for them); once those finish, requests succeed again."""
    gate = asyncio.Event()
    app = deadline_app(pg.dsn, unique_app_name(), gate, pool_size=2, min_size=2)
    async with serve_in_process(app) as client:
        holders = [asyncio.create_task(client.get("/hold")) for _ in range(2)]

        async def saturated() -> bool:
            return state_of(app).database.stats()["primary"].connections_in_use == 2

        assert await wait_for(saturated)
        burst = await asyncio.wait_for(asyncio.gather(*(
            client.get("/one", headers={"X-Request-Timeout": "0.5"}) for _ in range(20)
        )), timeout=10)
        assert not gate.is_set()
        assert {r.status_code for r in burst} == {503}
        assert all(r.headers["retry-after"].isdigit() for r in burst)
        assert all(int(r.headers["retry-after"]) >= 1 for r in burst)
        assert all(r.json()["error"] in {"deadline_exceeded", "database_unavailable"}
                   for r in burst)
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*holders)] == [200, 200]
        recovered = await asyncio.gather(*(client.get("/one") for _ in range(10)))
        assert {r.status_code for r in recovered} == {200}


async def test_background_work_spawned_by_a_request_runs_past_its_budget_on_its_own_deadline(
    pg: EmbeddedPostgres,
) -> None:
    """A route (with its own limit, capped by a 0.2 s header) spawns jobs and returns. Once
    the request's budget has passed, the job under deadline(..., replace=True) and the one
    under no_deadline() still run their statement; the one left with the request's
    deadline is refused with DeadlineExceeded."""
    app = deadline_app(pg.dsn, unique_app_name(), asyncio.Event())
    jobs: dict[str, asyncio.Task[int]] = {}

    async def job(request_deadline: float) -> int:
        await asyncio.sleep(request_deadline - time.monotonic() + 0.05)  # the budget is gone
        async with state_of(app).database.connection() as conn:
            value: int = await conn.fetchval("SELECT 1")
            return value

    async def replaced(request_deadline: float) -> int:
        async with deadline(ROUTE_S, replace=True):
            return await job(request_deadline)

    async def unbounded(request_deadline: float) -> int:
        with no_deadline():
            return await job(request_deadline)

    @app.get("/spawn", dependencies=[route_deadline(ROUTE_S)])
    async def spawn() -> dict[str, float | None]:
        request_deadline = current_deadline()
        assert request_deadline is not None
        jobs["replace"] = asyncio.create_task(replaced(request_deadline))
        jobs["none"] = asyncio.create_task(unbounded(request_deadline))
        jobs["inherited"] = asyncio.create_task(job(request_deadline))
        return {"remaining": remaining()}

    async with serve_in_process(app) as client:
        response = await client.get("/spawn", headers={"X-Request-Timeout": "0.2"})
        assert response.status_code == 200
        assert response.json()["remaining"] <= 0.2
        assert await asyncio.wait_for(jobs["replace"], timeout=10) == 1
        assert await asyncio.wait_for(jobs["none"], timeout=10) == 1
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(jobs["inherited"], timeout=10)
