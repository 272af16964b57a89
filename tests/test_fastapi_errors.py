"""Exception handlers: pool refusals become 503 + Retry-After, database errors never become
200s or leak SQL, DSNs or stacks. The mapping is tested as a pure function, then through a
real application on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_helpers import database_for, serve_in_process, unique_app_name, wait_for
from poolwarden import (
    CircuitOpen,
    CommitOutcomeUnknown,
    ConnectionFailed,
    DeadlineExceeded,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
)
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.fastapi import Connection, WriteSession, answer_for, install, lifespan

# ---------------------------------------------------------------- the mapping (pure)


def test_pool_refusals_are_503_with_retry_after_rounded_up_to_whole_seconds() -> None:
    """Each refusal is a 503; Retry-After is the error's estimate rounded up, at least 1."""
    exhausted = answer_for(PoolExhausted("full", node="primary", retry_after_s=2.2))
    assert (exhausted.status, exhausted.code, exhausted.retry_after_s) == (
        503, "database_unavailable", 3)
    assert exhausted.detail == "overloaded, retry later"
    timeout = answer_for(PoolTimeout("slow", node="primary", state=None, waited_s=1.0))
    assert (timeout.status, timeout.retry_after_s) == (503, 1)
    circuit = answer_for(CircuitOpen("open", node="primary", retry_after_s=0.2))
    assert (circuit.status, circuit.retry_after_s) == (503, 1)
    closed = answer_for(PoolClosed("closed", node="primary"))
    assert (closed.status, closed.retry_after_s) == (503, 1)
    unreachable = answer_for(ConnectionFailed("down", node="primary"))
    assert unreachable.status == 503


def test_deadline_expiry_is_a_503_of_its_own_kind() -> None:
    """DeadlineExceeded, and a bare TimeoutError once the request's deadline passed, answer
    503 ``deadline_exceeded``; a TimeoutError with budget left is a database timeout."""
    error = DeadlineExceeded("late", node="primary", state=None, waited_s=0.5)
    assert (answer_for(error).status, answer_for(error).code) == (503, "deadline_exceeded")
    expired = answer_for(TimeoutError(), deadline_expired=True)
    assert (expired.status, expired.code, expired.retry_after_s) == (503, "deadline_exceeded", 1)
    assert answer_for(TimeoutError()).code == "database_unavailable"


def test_an_unknown_commit_outcome_is_a_500_that_does_not_invite_a_retry() -> None:
    """A write that may or may not have committed must not be answered "retry later"."""
    answer = answer_for(CommitOutcomeUnknown("lost", node="primary"))
    assert answer.status == 500
    assert answer.retry_after_s is None
    assert answer.code == "commit_outcome_unknown"


def test_driver_errors_map_by_sqlstate_through_wrappers() -> None:
    """Integrity violations are 409s, transient states 503s, other errors 500s — also when
    wrapped (``__cause__``, SQLAlchemy's ``orig``)."""
    unique = asyncpg.exceptions.UniqueViolationError("duplicate key")
    assert answer_for(unique).status == 409
    wrapper = RuntimeError("wrapped")
    wrapper.__cause__ = asyncpg.exceptions.SerializationError("could not serialize")
    assert answer_for(wrapper).status == 503
    cancelled = asyncpg.exceptions.QueryCanceledError("canceling statement")
    assert answer_for(cancelled).code == "database_unavailable"
    assert answer_for(cancelled, deadline_expired=True).code == "deadline_exceeded"
    syntax = asyncpg.exceptions.PostgresSyntaxError("syntax error at or near SELEC")
    assert (answer_for(syntax).status, answer_for(syntax).code) == (500, "database_error")
    lost = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
    assert answer_for(lost).status == 503


# ---------------------------------------------------------------- through an application


def error_app(dsn: str, app_name: str, gate: asyncio.Event, **pool: object) -> FastAPI:
    # No background checks during the test: with one connection, a check holding it would
    # turn a request into a refusal.
    app = FastAPI(lifespan=lifespan(database_for(dsn, app_name, **pool), metrics=False,
                                    health_interval_s=3600))
    install(app, health=False)

    @app.get("/hold")
    async def hold(conn: Connection) -> dict[str, int]:
        await gate.wait()
        return {"one": await conn.fetchval("SELECT 1")}

    @app.get("/one")
    async def one(conn: Connection) -> dict[str, int]:
        return {"one": await conn.fetchval("SELECT 1")}

    @app.get("/duplicate")
    async def duplicate(conn: Connection) -> dict[str, str]:
        await conn.execute("CREATE TEMP TABLE t (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO t VALUES (1), (1)")
        return {"status": "inserted twice"}

    @app.get("/raw-syntax")
    async def raw_syntax(conn: Connection) -> dict[str, str]:
        await conn.execute("SELEC secret_column FROM secret_table")
        return {"status": "unreachable"}

    @app.get("/orm-syntax")
    async def orm_syntax(session: WriteSession) -> dict[str, str]:
        await session.execute(text("SELECT secret_column FROM secret_table WHERE x = :v"),
                              {"v": "secret-parameter"})
        return {"status": "unreachable"}

    return app


def assert_short_body(body: bytes, *forbidden: str) -> dict[str, str]:
    data = json.loads(body)
    assert set(data) == {"error", "detail"}
    for word in ("Traceback", "SELEC", "secret", "postgresql://", "127.0.0.1", *forbidden):
        assert word not in body.decode(), word
    return data


async def test_a_full_wait_queue_answers_503_with_retry_after_at_once(pg: EmbeddedPostgres) -> None:
    """With the only connection held and no room to wait, a request is refused at once with
    503, Retry-After and a short body; the held request then completes normally."""
    gate = asyncio.Event()
    app = error_app(pg.dsn, unique_app_name(), gate, pool_size=1, max_waiting=0)
    async with serve_in_process(app) as client:
        db = app.state.poolwarden.database
        holder = asyncio.create_task(client.get("/hold"))

        async def held() -> bool:
            return db.stats()["primary"].connections_in_use == 1

        assert await wait_for(held)
        refused = await client.get("/one")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert assert_short_body(refused.content, pg.password) == {
            "error": "database_unavailable", "detail": "overloaded, retry later"}
        gate.set()
        assert (await holder).status_code == 200
        assert (await client.get("/one")).status_code == 200


async def test_an_integrity_violation_is_a_409_without_the_statement(pg: EmbeddedPostgres) -> None:
    """A unique violation on the raw path answers 409 with a fixed text (no key values)."""
    app = error_app(pg.dsn, unique_app_name(), asyncio.Event())
    async with serve_in_process(app) as client:
        response = await client.get("/duplicate")
    assert response.status_code == 409
    assert assert_short_body(response.content, "duplicate key", "(id)")["error"] == "conflict"


async def test_sql_errors_are_500s_that_show_no_sql_parameters_or_stack(
    pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad statement on either path answers 500 ``database_error``; neither the body nor
    the log line carries the statement or its parameters, and the connection is released."""
    app = error_app(pg.dsn, unique_app_name(), asyncio.Event())
    caplog.set_level("WARNING", logger="poolwarden.fastapi")
    async with serve_in_process(app) as client:
        raw = await client.get("/raw-syntax")
        orm = await client.get("/orm-syntax")
        stats = app.state.poolwarden.database.stats()["primary"]
    for response in (raw, orm):
        assert response.status_code == 500
        assert assert_short_body(response.content)["error"] == "database_error"
        assert "retry-after" not in response.headers
    assert stats.connections_in_use == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /raw-syntax -> 500 database_error" in logged
    assert "42601" in logged or "42P01" in logged  # the SQLSTATE is there for the operator
    assert "secret-parameter" not in logged
    assert pg.password not in logged
