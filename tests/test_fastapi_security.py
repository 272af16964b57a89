"""A password with special characters in ``DATABASE_URL`` never shows up in a response body,
a header, a log line or a metric — on success, on SQL errors, on refusals, with the server
stopped, and when start-up fails; error bodies carry no SQL, DSN or stack."""

from __future__ import annotations

import asyncio
import traceback
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from fastapi_helpers import serve_in_process, unique_app_name, wait_for
from poolwarden import ConnectionFailed, Database
from poolwarden.embedded import EmbeddedPostgres, free_port
from poolwarden.fastapi import Connection, install, lifespan
from poolwarden.metrics import PoolMetrics


def secrets_of(password: str) -> list[str]:
    """The password as typed and as it appears percent-encoded in a URL."""
    assert any(c in password for c in "@:/%"), "the test needs special characters"
    return [password, quote(password, safe="")]


def env_for(dsn: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": dsn, "DB_APPLICATION_NAME": unique_app_name(), "DB_POOL_SIZE": "1",
            "DB_POOL_MIN_SIZE": "1", "DB_MAX_OVERFLOW": "0", "DB_POOL_MAX_WAITING": "1",
            "DB_POOL_TIMEOUT": "1", **extra}


def secure_app(
    env: dict[str, str], gate: asyncio.Event, entered: asyncio.Event | None = None
) -> FastAPI:
    app = FastAPI(lifespan=lifespan(
        lambda: Database.from_env(env), metrics=PoolMetrics(CollectorRegistry()),
        health_interval_s=0.2, health_timeout_s=1.0))
    install(app)

    @app.get("/hold")
    async def hold(conn: Connection) -> dict[str, int]:
        if entered is not None:
            entered.set()
        await gate.wait()
        return {"one": await conn.fetchval("SELECT 1")}

    @app.get("/bad-sql")
    async def bad_sql(conn: Connection) -> dict[str, int]:
        return {"x": await conn.fetchval("SELECT no_such_column FROM pg_class")}

    @app.get("/slow")
    async def slow(conn: Connection) -> dict[str, str]:
        await conn.execute("SELECT pg_sleep(10)")
        return {"slept": "yes"}

    return app


def assert_clean(text: str, password: str) -> None:
    for secret in secrets_of(password):
        assert secret not in text


@pytest.mark.slow
async def test_no_password_in_responses_headers_logs_or_metrics(
    fresh_pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Every kind of answer the integration gives — routes, a SQL error, a refusal, a
    deadline expiry, readiness with the server down — and every log line at DEBUG level
    are free of the password (plain or percent-encoded)."""
    caplog.set_level("DEBUG")
    gate, entered = asyncio.Event(), asyncio.Event()
    app = secure_app(env_for(fresh_pg.dsn), gate, entered)
    seen: list[str] = []
    async with serve_in_process(app) as client:

        async def visit(path: str, **headers: str) -> int:
            response = await client.get(path, headers=headers)
            seen.append(response.text)
            seen.extend(f"{k}: {v}" for k, v in response.headers.items())
            return response.status_code

        assert await visit("/health/db") == 200
        assert await visit("/health/live") == 200
        assert await visit("/health/pool") == 200
        assert await visit("/metrics") == 200
        assert await visit("/bad-sql") == 500
        assert await visit("/slow", **{"X-Request-Timeout": "0.2"}) == 503
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(entered.wait(), timeout=10)
        assert await visit("/bad-sql") == 503  # the only connection is held: refused in 1 s
        gate.set()
        await holder
        fresh_pg.stop()

        async def not_ready() -> bool:
            return await visit("/health/db") == 503

        assert await wait_for(not_ready, timeout=30)
        assert await visit("/bad-sql") == 503
        assert await visit("/metrics") == 200
    for text in seen:
        assert_clean(text, fresh_pg.password)
        for internal in ("Traceback", "postgresql://", "no_such_column", "SELECT"):
            assert internal not in text
    logged = [r.getMessage() for r in caplog.records]
    logged += ["".join(traceback.format_exception(*r.exc_info)) for r in caplog.records
               if r.exc_info]
    assert logged  # the refusals and errors above were logged
    for line in logged:
        assert_clean(line, fresh_pg.password)


async def test_a_failed_start_names_no_password(pg: EmbeddedPostgres) -> None:
    """A wrong port at start-up fails fast with ConnectionFailed; neither its message nor
    its whole traceback (what the server logs) carries the password."""
    dsn = pg.dsn.replace(f":{pg.port}/", f":{free_port()}/")
    app = secure_app(env_for(dsn, DB_CONNECT_TIMEOUT="2"), asyncio.Event())
    with pytest.raises(ConnectionFailed) as failure:
        async with app.router.lifespan_context(app):
            pass
    rendered = "".join(traceback.format_exception(failure.value))
    assert_clean(rendered, pg.password)
    assert_clean(repr(failure.value), pg.password)
