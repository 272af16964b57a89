"""The server's view on real PostgreSQL, and the connection budget arithmetic."""

from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool_helpers import open_pool
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.server_view import (
    QUERY_CHARS,
    budget_check,
    connection_budget,
    mask_query,
    processes_from_env,
    server_activity,
)
from poolwarden.sizing import ServerBudget, SizingError


def app_name(stem: str) -> str:
    return f"pw_{stem}_{secrets.token_hex(4)}"


async def test_settings_match_the_server(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        activity = await server_activity(pool)
        async with pool.connection() as conn:
            shown = int(await conn.fetchval("SHOW max_connections"))
            reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    assert activity.max_connections == shown
    assert activity.superuser_reserved_connections == reserved
    if pg.major_version < 16:
        assert activity.reserved_connections is None
    assert activity.total_connections >= 1
    assert activity.headroom == shown - activity.reserved - activity.total_connections
    assert json.loads(json.dumps(activity.as_dict()))["headroom"] == activity.headroom


async def test_groups_include_the_pools_own_application(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, min_size=3) as pool:
        own = pool.config.application_name
        # A backend reports "idle" only after it has answered, so under load a connection
        # can show "active" for a moment: look again (bounded) until the view settles.
        for _ in range(50):
            activity = await server_activity(pool)
            mine = [g for g in activity.by_application if g.application_name == own]
            if {g.state for g in mine} == {"idle"}:
                break
            await asyncio.sleep(0.02)
    # Three connections, one of them taking the snapshot (left out of the groups).
    assert sum(g.connections for g in mine) == 2
    assert {g.state for g in mine} == {"idle"}


async def test_finds_a_session_left_idle_in_transaction(pg: EmbeddedPostgres) -> None:
    name = app_name("idle_tx")
    leaker = await asyncpg.connect(pg.dsn, server_settings={"application_name": name})
    try:
        await leaker.execute("BEGIN")
        await leaker.execute("SELECT 1 AS leaked_statement")
        await asyncio.sleep(0.6)
        async with open_pool(pg) as pool:
            activity = await server_activity(pool, idle_in_transaction_s=0.5)
            fresh_only = await server_activity(pool, idle_in_transaction_s=3600)
    finally:
        await leaker.close()
    found = [s for s in activity.idle_in_transaction if s.application_name == name]
    assert len(found) == 1
    session = found[0]
    assert session.pid == leaker.get_server_pid()
    assert session.state == "idle in transaction"
    assert session.usename == pg.user
    assert session.duration_s >= 0.5
    assert session.transaction_s is not None
    assert session.transaction_s >= session.duration_s
    assert "leaked_statement" in session.query
    assert not [s for s in fresh_only.idle_in_transaction if s.application_name == name]


async def test_longest_queries_find_a_running_sleep(pg: EmbeddedPostgres) -> None:
    name = app_name("sleeper")
    sleeper = await asyncpg.connect(pg.dsn, server_settings={"application_name": name})
    task = asyncio.create_task(sleeper.execute("SELECT pg_sleep(3)"))
    try:
        await asyncio.sleep(0.8)
        async with open_pool(pg) as pool:
            activity = await server_activity(pool, long_query_s=0.5)
        found = [s for s in activity.longest_queries if s.application_name == name]
        assert len(found) == 1
        assert found[0].state == "active"
        assert found[0].duration_s >= 0.5
        assert "pg_sleep(3)" in found[0].query
        durations = [s.duration_s for s in activity.longest_queries]
        assert durations == sorted(durations, reverse=True)
        # Our own snapshot session never lists itself.
        assert all(s.application_name != pool.config.application_name
                   for s in activity.longest_queries)
    finally:
        await task
        await sleeper.close()


async def test_long_query_text_is_truncated(pg: EmbeddedPostgres) -> None:
    name = app_name("long_text")
    conn = await asyncpg.connect(pg.dsn, server_settings={"application_name": name})
    padding = "x" * 500
    task = asyncio.create_task(conn.execute(f"SELECT pg_sleep(2), '{padding}'"))
    try:
        await asyncio.sleep(0.5)
        async with open_pool(pg) as pool:
            activity = await server_activity(pool, long_query_s=0.2)
        found = [s for s in activity.longest_queries if s.application_name == name]
        assert len(found) == 1
        assert len(found[0].query) == QUERY_CHARS
    finally:
        await task
        await conn.close()


async def test_limit_bounds_the_lists(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg) as pool:
        activity = await server_activity(pool, idle_in_transaction_s=0, long_query_s=0, limit=0)
    assert activity.idle_in_transaction == ()
    assert activity.longest_queries == ()


def test_password_literals_are_masked() -> None:
    assert mask_query("ALTER ROLE app PASSWORD 'it''s secret'") == "ALTER ROLE app PASSWORD '***'"
    assert mask_query("create role x login password 'trunc") == "create role x login password '***'"
    assert mask_query("SELECT 'password'") == "SELECT 'password'"


# ---------------------------------------------------------------------- budget


def test_budget_over_says_what_to_change() -> None:
    report = budget_check(max_connections=100, reserved=3, pool_max_size=25, processes=4)
    assert not report.ok
    assert report.used == 100
    assert report.available == 97
    assert report.spare == -3
    assert "4 workers x 25 connections = 100 > 97 available" in report.message
    assert "at most 24 per worker" in report.message
    assert "at most 3 workers" in report.message
    assert "max_connections to at least 103" in report.message


def test_budget_within_reports_spare() -> None:
    report = budget_check(100, 3, 15, 4, other_connections=5)
    assert report.ok
    assert report.used == 65
    assert report.message.startswith("4 workers x 15 connections + 5 other = 65 <= 97 available")
    assert "32 to spare" in report.message
    assert report.as_dict()["ok"] is True


def test_budget_rejects_every_bad_argument_at_once() -> None:
    with pytest.raises(SizingError) as caught:
        budget_check(0, -1, -2, 0, other_connections=-3)
    assert {p.variable for p in caught.value.problems} == {
        "max_connections", "reserved", "pool_max_size", "processes", "other_connections"}
    assert isinstance(caught.value, ValueError)
    assert "max_connections: must be >= 1 (got 0)" in str(caught.value)
    assert "pool_max_size: must be >= 0 (got -2)" in str(caught.value)


def test_budget_refuses_counts_that_are_not_whole_numbers() -> None:
    with pytest.raises(SizingError) as caught:
        budget_check(100, 3, 2.5, True)  # type: ignore[arg-type]
    assert {p.variable for p in caught.value.problems} == {"pool_max_size", "processes"}


def test_budget_reports_a_server_other_clients_have_filled() -> None:
    # 10 - 3 reserved - 20 other = -13 left for this service: ServerBudget refuses it, the
    # check reports it with the shortfall and what to change.
    with pytest.raises(SizingError):
        ServerBudget(max_connections=10, reserved=3, other_connections=20)
    report = budget_check(10, 3, 5, 2, other_connections=20)
    assert not report.ok
    assert (report.budget, report.spare) == (-13, -23)
    assert "2 workers x 5 connections + 20 other = 30 > 7 available" in report.message
    assert "max_connections to at least 33" in report.message
    assert "per worker" not in report.message
    assert report.as_dict()["budget"] == -13


def test_budget_reports_max_connections_below_the_reserved_slots() -> None:
    report = budget_check(max_connections=2, reserved=3, pool_max_size=1, processes=1)
    assert not report.ok
    assert (report.available, report.spare) == (-1, -2)
    assert "max_connections to at least 4" in report.message


@given(
    max_connections=st.integers(-1, 400),
    reserved=st.integers(-1, 20),
    other=st.integers(-1, 400),
    processes=st.integers(-1, 32),
    pool_max_size=st.integers(0, 20),
)
def test_budget_check_and_server_budget_agree(
    max_connections: int, reserved: int, other: int, processes: int, pool_max_size: int
) -> None:
    counts = {"max_connections": max_connections, "reserved": reserved,
              "other_connections": other, "processes": processes}
    bad = {name for name, least in (("max_connections", 1), ("reserved", 0),
                                    ("other_connections", 0), ("processes", 1))
           if counts[name] < least}
    if bad:
        # Same checks, same variables named, same error type.
        with pytest.raises(SizingError) as by_check:
            budget_check(max_connections, reserved, pool_max_size, processes, other)
        with pytest.raises(SizingError) as by_server:
            ServerBudget(**counts)
        assert {p.variable for p in by_check.value.problems} == bad
        assert {p.variable for p in by_server.value.problems} == bad
        return
    report = budget_check(max_connections, reserved, pool_max_size, processes, other)
    budget = max_connections - reserved - other
    assert report.budget == budget
    assert report.spare == budget - processes * pool_max_size
    assert report.ok is (report.spare >= 0)
    if budget >= 1:
        assert ServerBudget(**counts).budget == report.budget
    else:
        # Over-committed: the strict API refuses it, the check (above) reported it.
        with pytest.raises(SizingError) as caught:
            ServerBudget(**counts)
        assert {p.variable for p in caught.value.problems} == {"max_connections"}
        assert report.ok is (budget == 0 and pool_max_size == 0)


@given(
    max_connections=st.integers(1, 10_000),
    reserved=st.integers(0, 100),
    pool_max_size=st.integers(0, 500),
    processes=st.integers(1, 64),
    other=st.integers(0, 1000),
)
def test_budget_ok_iff_used_fits(
    max_connections: int, reserved: int, pool_max_size: int, processes: int, other: int
) -> None:
    report = budget_check(max_connections, reserved, pool_max_size, processes, other)
    used = processes * pool_max_size + other
    available = max_connections - reserved
    assert report.used == used
    assert report.available == available
    assert report.ok is (used <= available)
    assert f"= {used} " in report.message
    assert f"{available} available" in report.message
    assert str(max_connections) in report.message
    if not report.ok:
        assert f"at least {used + reserved}" in report.message
        json.dumps(report.as_dict())


def test_processes_from_env() -> None:
    assert processes_from_env({}) == 1
    assert processes_from_env({"WEB_CONCURRENCY": " 4 "}) == 4
    for bad in ("0", "-2", "four"):
        with pytest.raises(ValueError, match="WEB_CONCURRENCY"):
            processes_from_env({"WEB_CONCURRENCY": bad})


async def test_connection_budget_reads_the_server(
    pg: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    async with open_pool(pg, pool_size=10, max_overflow=5) as pool:
        report = await connection_budget(pool)
        explicit = await connection_budget(pool, processes=100)
    assert report.processes == 3
    assert report.pool_max_size == 15
    assert report.max_connections == pg.max_connections
    assert report.ok
    assert not explicit.ok
    assert "100 workers x 15 connections = 1500 >" in explicit.message
