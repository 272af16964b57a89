"""The embedded servers are real PostgreSQL: password login, restart, crash, replica, cleanup."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from poolwarden.embedded import EmbeddedError, EmbeddedPostgres, find_binaries
from poolwarden.errors import PoolwardenError


async def test_server_accepts_the_password_user_over_loopback_tcp(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT current_user, current_database(), host(inet_server_addr()) AS addr,"
            " inet_server_port() AS port, current_setting('max_connections') AS max_conn"
        )
    finally:
        await conn.close()
    assert row is not None
    assert (row["current_user"], row["current_database"]) == (pg.user, pg.database)
    assert (row["addr"], row["port"]) == ("127.0.0.1", pg.port)
    assert row["max_conn"] == "200"


async def test_wrong_password_is_rejected(pg: EmbeddedPostgres) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            host=pg.host, port=pg.port, user=pg.user, password="wrong", database=pg.database
        )


async def test_application_user_is_not_a_superuser_but_admin_dsn_is(pg: EmbeddedPostgres) -> None:
    app = await asyncpg.connect(pg.dsn)
    admin = await asyncpg.connect(pg.admin_dsn)
    try:
        is_superuser = "SELECT usesuper FROM pg_user WHERE usename = current_user"
        assert await app.fetchval(is_superuser) is False
        assert await admin.fetchval(is_superuser) is True
    finally:
        await app.close()
        await admin.close()


def test_password_has_special_characters_and_is_percent_encoded_in_dsn(
    pg: EmbeddedPostgres,
) -> None:
    assert set("@:/%") <= set(pg.password)
    assert quote(pg.password, safe="") in pg.dsn
    assert pg.password not in pg.dsn


def test_repr_and_errors_never_show_the_password(pg: EmbeddedPostgres) -> None:
    assert pg.password not in repr(pg)
    assert "***" in repr(pg)
    with pytest.raises(EmbeddedError) as caught:
        pg.execute(f"SELECT '{pg.password}'::int")
    assert pg.password not in str(caught.value)


def test_execute_returns_rows_as_text(pg: EmbeddedPostgres, unique_name: str) -> None:
    pg.execute(f"CREATE TABLE {unique_name} (a int, b text)", as_user=True)
    owner = pg.execute(f"SELECT tableowner FROM pg_tables WHERE tablename = '{unique_name}'")
    assert owner == pg.user
    pg.execute(f"INSERT INTO {unique_name} VALUES (1, 'x'), (2, 'y')")
    assert pg.execute(f"SELECT a, b FROM {unique_name} ORDER BY a") == "1|x\n2|y"


async def test_terminate_backends_kills_client_sessions(
    pg: EmbeddedPostgres, unique_name: str
) -> None:
    conn = await asyncpg.connect(pg.dsn, server_settings={"application_name": unique_name})
    try:
        assert pg.terminate_backends(application_name=unique_name) == 1
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_keeps_data_port_and_password(
    fresh_pg: EmbeddedPostgres, unique_name: str, mode: str
) -> None:
    port, dsn = fresh_pg.port, fresh_pg.dsn
    conn = await asyncpg.connect(dsn)
    # Servers run with synchronous_commit=off: a crash may lose the last few milliseconds of
    # commits unless the write asks for a synchronous commit.
    await conn.execute("SET synchronous_commit = on")
    await conn.execute(f"CREATE TABLE {unique_name} AS SELECT 42 AS answer")
    await conn.close()

    fresh_pg.restart(mode=mode)  # type: ignore[arg-type]

    assert fresh_pg.is_running
    assert (fresh_pg.port, fresh_pg.dsn) == (port, dsn)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(f"SELECT answer FROM {unique_name}") == 42
    finally:
        await conn.close()


@pytest.mark.slow
async def test_stopped_server_refuses_connections_until_started(
    fresh_pg: EmbeddedPostgres,
) -> None:
    fresh_pg.stop()
    assert not fresh_pg.is_running
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(fresh_pg.dsn, timeout=5)
    fresh_pg.start()
    conn = await asyncpg.connect(fresh_pg.dsn)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_async_context_manager_starts_and_removes_the_server() -> None:
    async with EmbeddedPostgres(max_connections=20) as server:
        data_dir = server.data_dir
        conn = await asyncpg.connect(server.dsn)
        assert await conn.fetchval("SHOW max_connections") == "20"
        await conn.close()
    assert not server.is_running
    assert not data_dir.exists()


def test_custom_user_and_database_are_created() -> None:
    with EmbeddedPostgres(user="app user", database="app-db", password="p@ss:/%w") as server:
        assert server.execute("SELECT current_database()") == "app-db"
        assert server.execute("SELECT 1 FROM pg_roles WHERE rolname = 'app user'") == "1"
        assert "app%20user:p%40ss%3A%2F%25w@" in server.dsn


def test_missing_binaries_raise_a_typed_error_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("POOLWARDEN_PG_BIN", raising=False)
    with pytest.raises(EmbeddedError, match="apt-get install postgresql") as caught:
        find_binaries(search_root=tmp_path)
    assert isinstance(caught.value, PoolwardenError)


async def test_replica_replays_writes_and_is_read_only(
    pg: EmbeddedPostgres, replica: EmbeddedPostgres, unique_name: str
) -> None:
    pg.execute(f"CREATE TABLE {unique_name} AS SELECT 7 AS v", as_user=True)
    replica.wait_replayed()
    conn = await asyncpg.connect(replica.dsn)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
        assert await conn.fetchval(f"SELECT v FROM {unique_name}") == 7
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute(f"INSERT INTO {unique_name} VALUES (8)")
    finally:
        await conn.close()
    assert replica.port != pg.port
    assert replica.is_replica
    assert not pg.is_replica


async def test_paused_replay_hides_new_writes_until_resumed(
    pg: EmbeddedPostgres, replica: EmbeddedPostgres, unique_name: str
) -> None:
    pg.execute(f"CREATE TABLE {unique_name} (v int)")
    replica.wait_replayed()
    replica.pause_replay()
    try:
        pg.execute(f"INSERT INTO {unique_name} VALUES (1)")
        with pytest.raises(EmbeddedError, match="did not replay"):
            replica.wait_replayed(timeout=0.5)
        assert replica.execute(f"SELECT count(*) FROM {unique_name}") == "0"
    finally:
        replica.resume_replay()
    replica.wait_replayed()
    assert replica.execute(f"SELECT count(*) FROM {unique_name}") == "1"


@pytest.mark.slow
async def test_promoted_replica_accepts_writes(
    fresh_pg: EmbeddedPostgres, unique_name: str
) -> None:
    standby = fresh_pg.start_replica()
    standby.promote()
    assert not standby.is_replica
    conn = await asyncpg.connect(standby.dsn)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
        await conn.execute(f"CREATE TABLE {unique_name} (v int)")
    finally:
        await conn.close()
    fresh_pg.cleanup()
    assert not standby.is_running
