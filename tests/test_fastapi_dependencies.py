"""The FastAPI dependencies and lifespan on real PostgreSQL: sessions commit or roll back,
every connection is released when the endpoint returns (not while the response streams),
on client disconnect and on cancellation; the lifespan composes with the application's own
and drains in-flight work on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from starlette.types import Message, Scope

from fastapi_helpers import (
    database_for,
    serve_in_process,
    sessions_of,
    unique_app_name,
    wait_for,
)
from poolwarden import ConnectionFailed, Database
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.fastapi import (
    Connection,
    DatabaseDep,
    ReadSession,
    WriteSession,
    install,
    lifespan,
    state_of,
)
from poolwarden.testing import FaultProxy


def in_use(app: FastAPI) -> int:
    return state_of(app).database.stats()["primary"].connections_in_use


def deps_app(db: Database, table: str, gate: asyncio.Event | None = None) -> FastAPI:
    # No background checks during a test: one holding a connection would skew the counts.
    app = FastAPI(lifespan=lifespan(db, metrics=False, health_interval_s=3600))
    install(app, health=False)

    @app.post("/rows/{value}")
    async def add(value: int, session: WriteSession) -> dict[str, int]:
        await session.execute(text(f"INSERT INTO {table} VALUES (:v)"), {"v": value})
        return {"added": value}

    @app.post("/rows/{value}/then-fail")
    async def add_then_fail(value: int, session: WriteSession) -> dict[str, int]:
        await session.execute(text(f"INSERT INTO {table} VALUES (:v)"), {"v": value})
        raise HTTPException(422, "changed my mind")

    @app.post("/rows/{value}/slow")
    async def add_slowly(value: int, session: WriteSession) -> dict[str, int]:
        await session.execute(text(f"INSERT INTO {table} VALUES (:v)"), {"v": value})
        await session.execute(text("SELECT pg_sleep(30)"))
        return {"added": value}

    @app.get("/rows/count")
    async def count(session: ReadSession) -> dict[str, int]:
        return {"rows": (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()}

    @app.get("/raw/sleep")
    async def raw_sleep(conn: Connection) -> dict[str, str]:
        await conn.execute("SELECT pg_sleep(30)")
        return {"slept": "yes"}

    @app.get("/raw/held")
    async def raw_held(conn: Connection) -> dict[str, int]:
        if gate is not None:
            await gate.wait()
        return {"one": await conn.fetchval("SELECT 1")}

    @app.post("/stream/{value}")
    async def stream(value: int, session: WriteSession, database: DatabaseDep) -> StreamingResponse:
        await session.execute(text(f"INSERT INTO {table} VALUES (:v)"), {"v": value})

        async def body() -> AsyncIterator[str]:
            for _ in range(5):
                # Seen from inside the stream: how many connections are checked out, and
                # whether the write is already visible to another connection.
                stats = database.stats()["primary"]
                visible = await database.fetchval(
                    f"SELECT count(*) FROM {table} WHERE v = $1", value)
                yield f"{stats.connections_in_use},{visible}\n"
                await asyncio.sleep(0.01)

        return StreamingResponse(body(), media_type="text/plain")

    return app


async def make_table(pg: EmbeddedPostgres, name: str) -> None:
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f"CREATE TABLE {name} (v int)")
    finally:
        await conn.close()


async def count_rows(pg: EmbeddedPostgres, table: str) -> int:
    conn = await asyncpg.connect(pg.dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def test_write_session_commits_on_success_and_rolls_back_on_error(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """A write from an endpoint that returns is committed; one from an endpoint that raises
    HTTPException is rolled back; no connection stays checked out either way."""
    await make_table(pg, unique_name)
    app = deps_app(database_for(pg.dsn, unique_app_name()), unique_name)
    async with serve_in_process(app) as client:
        assert (await client.post("/rows/1")).status_code == 200
        assert (await client.post("/rows/2/then-fail")).status_code == 422
        assert (await client.get("/rows/count")).json() == {"rows": 1}
        assert in_use(app) == 0
    assert await count_rows(pg, unique_name) == 1


async def test_session_is_released_and_committed_before_the_response_streams(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """While a StreamingResponse is being sent, the endpoint's session holds no connection
    and its write is already committed (visible to another connection)."""
    await make_table(pg, unique_name)
    app = deps_app(database_for(pg.dsn, unique_app_name()), unique_name)
    async with serve_in_process(app) as client:
        response = await client.post("/stream/7")
        assert in_use(app) == 0
    assert response.status_code == 200
    seen = [line.split(",") for line in response.text.splitlines()]
    assert len(seen) == 5
    # in use while streaming: only the stream's own fetchval, which has not started yet
    assert all(in_use_now == "0" for in_use_now, _ in seen)
    assert all(visible == "1" for _, visible in seen)


def http_scope(path: str, method: str = "GET") -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"service")], "client": ("127.0.0.1", 50000),
        "server": ("service", 80), "state": {},
    }


class Client:
    """A raw ASGI client whose connection drops when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[Message] = []
        self._requested = False

    async def receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def running_sleep(pg: EmbeddedPostgres, app_name: str) -> bool:
    rows = await sessions_of(pg, app_name)
    return any(r["state"] == "active" and "pg_sleep" in (r["query"] or "") for r in rows)


async def test_client_disconnect_cancels_the_work_and_releases_the_connection(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """A client that leaves during a 30 s statement: the request is cancelled, the statement
    stops on the server, the connection is back in the pool, nothing is answered."""
    await make_table(pg, unique_name)
    app_name = unique_app_name()
    app = deps_app(database_for(pg.dsn, app_name), unique_name)
    async with serve_in_process(app):
        client = Client()
        call = asyncio.create_task(app(http_scope("/raw/sleep"), client.receive, client.send))
        assert await wait_for(lambda: running_sleep(pg, app_name))
        client.gone.set()
        await asyncio.wait_for(call, timeout=10)  # far sooner than the 30 s statement

        async def released() -> bool:
            return in_use(app) == 0 and not await running_sleep(pg, app_name)

        assert await wait_for(released)
    assert client.sent == []


async def test_cancelled_request_rolls_back_its_write_and_releases(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """A request cancelled mid-transaction (server shutdown, client gone) rolls back its
    write and returns its connection to the pool."""
    await make_table(pg, unique_name)
    app_name = unique_app_name()
    app = deps_app(database_for(pg.dsn, app_name), unique_name)
    async with serve_in_process(app) as client:
        call = asyncio.create_task(client.post("/rows/5/slow"))
        assert await wait_for(lambda: running_sleep(pg, app_name))
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)

        async def released() -> bool:
            return in_use(app) == 0 and not await running_sleep(pg, app_name)

        assert await wait_for(released)
    assert await count_rows(pg, unique_name) == 0


async def test_lifespan_runs_the_application_lifespan_inside_with_the_database_open(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """The application's own lifespan starts after the pools are open and warmed to their
    minimum, and ends before they close (both can use the database); what it yields is
    what the lifespan yields."""
    await make_table(pg, unique_name)
    seen: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        database = state_of(app).database
        assert database.stats()["primary"].connections == 2  # warm: min_size, before any use
        await database.execute(f"INSERT INTO {unique_name} VALUES (1)")
        seen.append("started")
        yield {"greeting": "hello"}
        await database.execute(f"INSERT INTO {unique_name} VALUES (2)")
        seen.append("stopped")

    db = database_for(pg.dsn, unique_app_name(), min_size=2)
    app = FastAPI(lifespan=lifespan(db, then=own, metrics=False))
    async with app.router.lifespan_context(app) as state:
        assert state == {"greeting": "hello"}
        assert seen == ["started"]
    assert seen == ["started", "stopped"]
    assert db.stats()["primary"].closed
    assert await count_rows(pg, unique_name) == 2


async def test_lifespan_without_waiting_starts_not_ready_and_serves_once_the_server_answers(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """wait_for_database=False: the worker starts while the server refuses connections, is
    not ready meanwhile, and serves once the server answers, without a restart. By default
    the same start-up fails fast with ConnectionFailed."""
    proxy.refuse()
    retry = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2, "acquire_timeout": 1.0}
    db = database_for(proxy.dsn_for(pg.dsn), unique_app_name(), **retry)
    app = FastAPI(lifespan=lifespan(db, metrics=False))
    with pytest.raises(ConnectionFailed):
        async with app.router.lifespan_context(app):
            pass

    db = database_for(proxy.dsn_for(pg.dsn), unique_app_name(), **retry)
    app = FastAPI(lifespan=lifespan(db, metrics=False, health_interval_s=0.1,
                                    health_timeout_s=0.5, wait_for_database=False))
    async with app.router.lifespan_context(app):
        monitor = state_of(app).monitor
        assert not monitor.ready()
        assert db.stats()["primary"].connections_created_total == 0
        proxy.heal()

        async def ready() -> bool:
            return monitor.ready()

        assert await wait_for(ready, timeout=30.0), monitor.readiness()
        assert await db.fetchval("SELECT 1") == 1
    assert db.stats()["primary"].closed


async def test_shutdown_waits_for_in_flight_work_then_leaves_no_connection(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    """Shutdown with a request in flight: the lifespan waits (draining, readiness off) until
    the request completes with 200, then closes the pools; the server has no session of
    the application left."""
    await make_table(pg, unique_name)
    app_name = unique_app_name()
    gate = asyncio.Event()
    app = deps_app(database_for(pg.dsn, app_name), unique_name, gate)
    running = app.router.lifespan_context(app)
    await running.__aenter__()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        call = asyncio.create_task(client.get("/raw/held"))

        async def held() -> bool:
            return in_use(app) == 1

        assert await wait_for(held)
        shutdown = asyncio.create_task(running.__aexit__(None, None, None))
        await asyncio.sleep(0.2)
        assert not shutdown.done()  # draining: waiting for the request in flight
        assert state_of(app).draining
        gate.set()
        assert (await call).status_code == 200
        await shutdown

    async def gone() -> bool:
        return not await sessions_of(pg, app_name)

    assert await wait_for(gone)
