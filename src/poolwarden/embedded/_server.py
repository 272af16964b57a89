"""The :class:`EmbeddedPostgres` server: its connection facts, its lifecycle (start, stop,
restart, cleanup, as a sync or async context manager), queries over its private socket, and
making a streaming replica of it.

The class is put together from parts: :class:`~._process.ServerProcess` (its files and process)
and :class:`~._replica.ReplicaControls` (what a replica can do).
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

from .._secrets import MASK, scrub
from ._binaries import PgBinaries, Runner, find_binaries
from ._helpers import (
    DEFAULT_DATABASE,
    DEFAULT_USER,
    LOOPBACK,
    SUPERUSER,
    EmbeddedError,
    free_port,
    generate_password,
    scram_verifier,
)
from ._replica import ReplicaControls

__all__ = ["START_ATTEMPTS", "EmbeddedPostgres", "StopMode"]

StopMode = Literal["smart", "fast", "immediate"]

# A free port found by binding port 0 can be taken by someone else before the server binds it.
START_ATTEMPTS = 3


_LIVE: weakref.WeakSet[EmbeddedPostgres] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # A test run that dies without cleanup must not leave servers holding ports and disk.
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(mode="immediate")
            server.cleanup()


class EmbeddedPostgres(ReplicaControls):
    """A private PostgreSQL server on 127.0.0.1, removed by :meth:`cleanup`.

    Connection facts: ``host``, ``port``, ``user``, ``password``, ``database`` and ``dsn`` (a
    ``postgresql://`` URL with the password percent-encoded). ``admin_dsn`` reaches the same
    server as the superuser over its private unix socket (for test set-up only).

    Used as a context manager (sync or async) it starts on entry and stops and removes itself on
    exit. :meth:`restart` keeps the port, the password and the data. Every failure raises
    :class:`EmbeddedError`; messages and ``repr`` never contain the password.
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        user: str = DEFAULT_USER,
        database: str = DEFAULT_DATABASE,
        password: str | None = None,
        port: int | None = None,
        settings: Mapping[str, str | int | float | bool] | None = None,
        binaries: PgBinaries | None = None,
    ) -> None:
        self.host = LOOPBACK
        self.user = user
        self.database = database
        self.password = password if password is not None else generate_password()
        self.max_connections = max_connections
        self.extra_settings = dict(settings or {})
        self._requested_port = port
        self._port: int | None = port
        self._runner = Runner(binaries or find_binaries())
        self._base: Path | None = None
        self._is_replica = False
        self._primary: EmbeddedPostgres | None = None
        self._replicas: list[EmbeddedPostgres] = []
        # Password (and any non-default user/database) are set on the first start.
        self._provisioned = True
        self._has_run = False

    # -- facts -----------------------------------------------------------------------------
    # (``port``, the directories and ``is_running`` come from ServerProcess, ``is_replica``
    # from ReplicaControls.)

    @property
    def dsn(self) -> str:
        """``postgresql://user:password@127.0.0.1:port/database``, each part percent-encoded."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
        )

    @property
    def admin_dsn(self) -> str:
        """The superuser over the private unix socket (no password; asyncpg understands it)."""
        return (
            f"postgresql://{SUPERUSER}@/{quote(self.database, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}"
        )

    @property
    def major_version(self) -> int:
        return self._runner.binaries.major

    def __repr__(self) -> str:
        role = "replica" if self._is_replica else "primary"
        state = "running" if self._base is not None and self.is_running else "stopped"
        port = self._port if self._port is not None else "?"
        return (
            f"<EmbeddedPostgres {role} {state} {self.user}:{MASK}@{self.host}:{port}/"
            f"{self.database} pg{self.major_version} max_connections={self.max_connections}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Create the data directory from the template (first call only) and start the server.

        Returns when the server accepts connections. Raises :class:`EmbeddedError` with the
        tail of the server log when it does not start.
        """
        if self._base is None:
            self._create_from_template()
        if self.is_running:
            return self
        for attempt in range(START_ATTEMPTS):
            try:
                self._pg_ctl("start", "-l", str(self.log_file))
                break
            except EmbeddedError:
                port_taken = "could not bind" in self._log_tail()
                # Only a port we picked, and never one a restart must keep, may be replaced.
                may_move = self._requested_port is None and not self._has_run
                if not (port_taken and may_move) or attempt + 1 == START_ATTEMPTS:
                    raise EmbeddedError(
                        f"PostgreSQL did not start on port {self._port}:\n{self._log_tail()}"
                    ) from None
                self._port = free_port()
                self._write_config()
        self._has_run = True
        _LIVE.add(self)
        if not self._provisioned:
            # Until this runs nobody can log in over TCP: the role has no password yet.
            self._provision()
            self._provisioned = True
        return self

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (no-op when it is not running). ``immediate`` simulates a crash.

        Servers run with ``synchronous_commit=off``, so a crash may lose commits from the last
        few milliseconds; a test that needs a write to survive one commits it with
        ``SET synchronous_commit = on``.
        """
        if self.is_running:
            self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (with ``mode``) and start again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        """Stop the server and its replicas, then delete every file this server created."""
        for replica in self._replicas:
            replica.cleanup()
        self._replicas.clear()
        if self._base is None:
            return
        with contextlib.suppress(EmbeddedError):
            self.stop("immediate")
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> Self:
        import asyncio  # noqa: PLC0415 — only the async path needs it

        try:
            return await asyncio.to_thread(self.start)
        except BaseException:
            self.cleanup()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio  # noqa: PLC0415

        await asyncio.to_thread(self.cleanup)

    # -- queries ---------------------------------------------------------------------------

    def execute(self, sql: str, *, database: str | None = None, as_user: bool = False) -> str:
        """Run ``sql`` with ``psql`` over the unix socket; return its output.

        Runs as the superuser, or with ``as_user`` as the application user (``SET ROLE``) — use
        that to create objects the application must own. Output is unaligned, tuples only,
        columns separated by ``|``, one row a line, stripped. Raises :class:`EmbeddedError` on
        any SQL error (``ON_ERROR_STOP``).
        """
        commands = ["-c", sql]
        if as_user:
            commands = ["-c", f"SET ROLE {_quote_ident(self.user)}", *commands]
        result = self._runner.run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER,
            "-d", database or self.database, *commands,
            cwd=self._base_dir(), check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise EmbeddedError(f"psql failed: {scrub(result.stderr.strip(), self.password)}")
        return result.stdout.strip()

    def terminate_backends(self, *, application_name: str | None = None) -> int:
        """Terminate the application user's backends (optionally one application's); count them."""
        condition = f"usename = '{self.user}'"
        if application_name is not None:
            condition += " AND application_name = '" + application_name.replace("'", "''") + "'"
        out = self.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE {condition} AND pid <> pg_backend_pid()"
        )
        return int(out or 0)

    # -- replication -----------------------------------------------------------------------
    # (replay control and promotion of the replica: ReplicaControls)

    def start_replica(self) -> EmbeddedPostgres:
        """Clone this running server with ``pg_basebackup -R`` and start it as a hot standby.

        The replica has its own free port and socket, the same user, password and database,
        and streams WAL from this server over the unix socket. It is cleaned up with this one.
        """
        if not self.is_running:
            raise EmbeddedError("start the primary before making a replica of it")
        replica = EmbeddedPostgres(
            max_connections=self.max_connections,
            user=self.user,
            database=self.database,
            password=self.password,
            settings=self.extra_settings,
            binaries=self._runner.binaries,
        )
        replica._is_replica = True
        replica._primary = self
        base = replica._make_base()
        try:
            self._runner.run(
                "pg_basebackup", "-D", str(replica.data_dir), "-R", "-X", "stream",
                "-c", "fast", "-N", "-h", str(self.socket_dir), "-p", str(self.port),
                "-U", SUPERUSER, cwd=base,
            )  # fmt: skip
            replica._port = free_port()
            replica._write_config()
            replica.start()
        except BaseException:
            replica.cleanup()
            raise
        self._replicas.append(replica)
        return replica

    # -- plumbing --------------------------------------------------------------------------

    def _provision(self) -> None:
        verifier = scram_verifier(self.password)
        user = _quote_ident(self.user)
        if self.user != DEFAULT_USER:
            self.execute(f"CREATE ROLE {user} LOGIN CREATEDB", database="postgres")
            self.execute(f"GRANT pg_signal_backend, pg_monitor TO {user}", database="postgres")
        self.execute(f"ALTER ROLE {user} PASSWORD '{verifier}'", database="postgres")
        if self.database != DEFAULT_DATABASE:
            self.execute(
                f"CREATE DATABASE {_quote_ident(self.database)} OWNER {user}", database="postgres"
            )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
