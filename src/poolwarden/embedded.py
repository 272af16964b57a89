"""Throwaway local PostgreSQL servers (primary and streaming replica) for the demo and the tests.

``EmbeddedPostgres`` starts a private server on a free loopback port with a password-protected
user, and removes it afterwards::

    with EmbeddedPostgres() as pg:
        conn = await asyncpg.connect(pg.dsn)

Speed comes from a template: ``initdb`` runs once per PostgreSQL version into a cache directory
(``$POOLWARDEN_CACHE`` or ``~/.cache/poolwarden``); every server afterwards is a copy of it, so a
start costs a file copy plus the server's own start-up (a few hundred milliseconds).

PostgreSQL refuses to run as root: when this process is root, the server and its tools run as the
``postgres`` OS user and every directory they use is handed to that user.

The superuser ``postgres`` is reachable only over the server's private unix socket (trust);
TCP on 127.0.0.1 requires the application user's password (scram-sha-256). The application user
is deliberately *not* a superuser, so that it sees the same limits a service would
(``max_connections`` minus the reserved slots); it may create databases, signal backends and
read monitoring views.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

from ._secrets import MASK, scrub
from .errors import PoolwardenError

__all__ = [
    "EmbeddedError",
    "EmbeddedPostgres",
    "PgBinaries",
    "StopMode",
    "find_binaries",
]

StopMode = Literal["smart", "fast", "immediate"]

SUPERUSER = "postgres"
DEFAULT_USER = "poolwarden"
DEFAULT_DATABASE = "poolwarden"
LOOPBACK = "127.0.0.1"
# Bump when the template recipe changes, so that old cached templates are not reused.
TEMPLATE_FORMAT = 2
# Server directories go to RAM when there is plenty of it: a copy of the template onto a slow
# disk costs seconds, onto tmpfs tens of milliseconds, and nothing here needs durability.
RAM_DIR = Path("/dev/shm")
RAM_DIR_MIN_FREE_BYTES = 2 * 1024**3
PG_CTL_TIMEOUT_S = 60
# A free port found by binding port 0 can be taken by someone else before the server binds it.
START_ATTEMPTS = 3
INSTALL_HINT = "install the server with `apt-get install postgresql` (Debian/Ubuntu)"

_PG_HBA = """\
# poolwarden embedded server: superuser over the private socket only; passwords over TCP.
local   all          all                    trust
local   replication  all                    trust
host    all          all   127.0.0.1/32     scram-sha-256
host    replication  all   127.0.0.1/32     scram-sha-256
"""


class EmbeddedError(PoolwardenError):
    """An embedded server could not be found, created, started, stopped or queried."""


@dataclass(frozen=True, slots=True)
class PgBinaries:
    """Where one PostgreSQL installation keeps its server programs, and its major version."""

    bindir: Path
    major: int

    def tool(self, name: str) -> str:
        """Absolute path of the program ``name`` (``pg_ctl``, ``initdb``, ``psql``, ...)."""
        return str(self.bindir / name)


def find_binaries(search_root: Path = Path("/usr/lib/postgresql")) -> PgBinaries:
    """Locate PostgreSQL's server programs.

    Looks at ``$POOLWARDEN_PG_BIN``, then ``PATH`` (a directory with ``pg_ctl``, ``initdb`` and
    ``postgres``), then the newest ``<search_root>/<version>/bin`` (Debian's layout).

    Raises :class:`EmbeddedError`, saying how to install PostgreSQL, when none is found.
    """
    candidates: list[Path] = []
    if env_bin := os.environ.get("POOLWARDEN_PG_BIN"):
        candidates.append(Path(env_bin))
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    versioned = search_root.glob("*/bin")
    candidates.extend(sorted(versioned, key=_version_key, reverse=True))
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("pg_ctl", "initdb", "postgres")):
            return PgBinaries(bindir=bindir, major=_major_version(bindir))
    raise EmbeddedError(f"no PostgreSQL server programs (pg_ctl, initdb) found; {INSTALL_HINT}")


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def _major_version(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)", out)
    if match is None:
        raise EmbeddedError(f"cannot read the PostgreSQL version from {out!r}")
    return int(match.group(1))


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    Setting the verifier instead of the password keeps the plain password out of the server's
    statement log and error messages.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def generate_password() -> str:
    """A random password that contains ``@ : / %`` — characters that break naive DSN handling."""
    return f"pw{secrets.token_urlsafe(9)}@:/%{secrets.token_hex(3)}"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _Runner:
    """Runs PostgreSQL programs as the right OS user and hands directories to that user."""

    def __init__(self, binaries: PgBinaries) -> None:
        self.binaries = binaries
        self.as_root = os.geteuid() == 0
        self.uid = os.getuid()
        self.gid = os.getgid()
        if self.as_root:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise EmbeddedError(
                    "running as root but there is no 'postgres' OS user to run the server as; "
                    + INSTALL_HINT
                ) from None
            self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def run(
        self, tool: str, *args: str, cwd: Path, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tool`` from the server's bin directory; raise :class:`EmbeddedError` on failure."""
        command = [self.binaries.tool(tool), *args]
        drop: dict[str, object] = {}
        if self.as_root:
            drop = {"user": self.uid, "group": self.gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "PGAPPNAME": "poolwarden-embedded"}
        env.pop("PGPASSWORD", None)
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            **drop,  # type: ignore[call-overload]
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise EmbeddedError(f"{tool} {' '.join(args[:1])} failed: {detail}")
        return result  # type: ignore[no-any-return]

    def own(self, path: Path) -> None:
        """Give ``path`` (recursively) to the server's OS user."""
        if not self.as_root:
            return
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), self.uid, self.gid)


def _cache_root() -> Path:
    if env := os.environ.get("POOLWARDEN_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "poolwarden"


def _template(runner: _Runner) -> Path:
    """The cached, initialised data directory for this PostgreSQL version; built on first use.

    A file lock serialises concurrent builders (parallel test processes); the finished template
    appears by an atomic rename, so a half-built one is never copied.
    """
    cache = _cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"template-{runner.binaries.major}-v{TEMPLATE_FORMAT}"
    if (final / "PG_VERSION").is_file():
        return final
    with open(cache / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "PG_VERSION").is_file():
            return final
        staging = Path(tempfile.mkdtemp(prefix="poolwarden-initdb-"))
        try:
            runner.own(staging)
            data = staging / "data"
            _initdb(runner, staging, data)
            partial = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=cache))
            shutil.rmtree(partial)
            shutil.copytree(data, partial, symlinks=True)
            partial.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _initdb(runner: _Runner, staging: Path, data: Path) -> None:
    runner.run(
        "initdb", "-D", str(data), "-U", SUPERUSER, "-E", "UTF8", "--locale=C",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions",
        # 1 MB WAL segments instead of 16: every server starts by copying one.
        "--wal-segsize=1",
        cwd=staging,
    )  # fmt: skip
    (data / "pg_hba.conf").write_text(_PG_HBA)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\n# per-server settings written by poolwarden.embedded\n")
        conf.write("include_if_exists = 'poolwarden.conf'\n")
    # Start once on the socket only to create the application role and database.
    sock = staging / "sock"
    sock.mkdir()
    runner.own(sock)
    _write_settings(data, {"listen_addresses": "''", "unix_socket_directories": f"'{sock}'",
                           "port": str(free_port())})  # fmt: skip
    runner.own(data)
    log = staging / "initdb-start.log"
    runner.run("pg_ctl", "start", "-w", "-D", str(data), "-l", str(log), cwd=staging)
    try:
        port = _read_setting(data, "port")
        for sql in (
            f"CREATE ROLE {DEFAULT_USER} LOGIN CREATEDB",
            f"GRANT pg_signal_backend, pg_monitor TO {DEFAULT_USER}",
            f"CREATE DATABASE {DEFAULT_DATABASE} OWNER {DEFAULT_USER}",
        ):
            runner.run(
                "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(sock), "-p", port,
                "-U", SUPERUSER, "-d", "postgres", "-c", sql, cwd=staging,
            )  # fmt: skip
    finally:
        runner.run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(data), cwd=staging)
    (data / "poolwarden.conf").unlink()
    with contextlib.suppress(FileNotFoundError):
        (data / "postmaster.opts").unlink()


def _runtime_root() -> str | None:
    """Where servers' directories go: ``$POOLWARDEN_RUNTIME_DIR``, a roomy tmpfs, or ``/tmp``."""
    if env := os.environ.get("POOLWARDEN_RUNTIME_DIR"):
        return env
    try:
        stat = os.statvfs(RAM_DIR)
    except OSError:
        return None
    roomy = stat.f_bavail * stat.f_frsize >= RAM_DIR_MIN_FREE_BYTES
    return str(RAM_DIR) if roomy and os.access(RAM_DIR, os.W_OK) else None


def _write_settings(data: Path, settings: Mapping[str, str]) -> None:
    lines = [f"{name} = {value}\n" for name, value in settings.items()]
    (data / "poolwarden.conf").write_text("".join(lines))


def _read_setting(data: Path, name: str) -> str:
    for line in (data / "poolwarden.conf").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip().strip("'")
    raise EmbeddedError(f"setting {name} not found in {data / 'poolwarden.conf'}")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


_LIVE: weakref.WeakSet[EmbeddedPostgres] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # A test run that dies without cleanup must not leave servers holding ports and disk.
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(mode="immediate")
            server.cleanup()


class EmbeddedPostgres:
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
        self._runner = _Runner(binaries or find_binaries())
        self._base: Path | None = None
        self._is_replica = False
        self._primary: EmbeddedPostgres | None = None
        self._replicas: list[EmbeddedPostgres] = []
        # Password (and any non-default user/database) are set on the first start.
        self._provisioned = True
        self._has_run = False

    # -- facts -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; fixed at the first start and kept across restarts."""
        if self._port is None:
            raise EmbeddedError("the server has not been started yet; it has no port")
        return self._port

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
    def data_dir(self) -> Path:
        return self._base_dir() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base_dir() / "sock"

    @property
    def log_file(self) -> Path:
        return self._base_dir() / "postgres.log"

    @property
    def major_version(self) -> int:
        return self._runner.binaries.major

    @property
    def is_replica(self) -> bool:
        """True for a server made by :meth:`start_replica` and not yet promoted."""
        return self._is_replica

    @property
    def is_running(self) -> bool:
        """Whether the server process is alive (``pg_ctl status``)."""
        if self._base is None or not (self.data_dir / "PG_VERSION").exists():
            return False
        status = self._pg_ctl("status", check=False)
        return status.returncode == 0

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

    def pause_replay(self) -> None:
        """Stop applying WAL (a replica keeps receiving it): reads see a frozen snapshot."""
        self._require_replica("pause_replay")
        self.execute("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        """Resume applying WAL after :meth:`pause_replay`."""
        self._require_replica("resume_replay")
        self.execute("SELECT pg_wal_replay_resume()")

    def promote(self) -> None:
        """Turn this replica into a primary (``pg_ctl promote``); returns once it accepts writes."""
        self._require_replica("promote")
        self._pg_ctl("promote")
        self._is_replica = False

    def wait_replayed(self, timeout: float = 10.0) -> None:
        """Block until this replica has replayed everything its primary had written at the call.

        Raises :class:`EmbeddedError` after ``timeout`` seconds (e.g. while replay is paused).
        """
        self._require_replica("wait_replayed")
        assert self._primary is not None
        # The insert position, not the write position: with synchronous_commit=off a commit
        # record can still sit in WAL buffers when the call is made.
        target = self._primary.execute("SELECT pg_current_wal_insert_lsn()")
        deadline = time.monotonic() + timeout
        while True:
            caught_up = self.execute(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
            if caught_up == "t":
                return
            if time.monotonic() > deadline:
                raise EmbeddedError(f"replica did not replay up to {target} within {timeout}s")
            time.sleep(0.02)

    # -- plumbing --------------------------------------------------------------------------

    def _base_dir(self) -> Path:
        if self._base is None:
            raise EmbeddedError("the server has no data directory (not started, or cleaned up)")
        return self._base

    def _make_base(self) -> Path:
        # A short path: a unix socket path must stay under ~100 bytes.
        base = Path(tempfile.mkdtemp(prefix="pw-pg-", dir=_runtime_root()))
        (base / "sock").mkdir()
        self._runner.own(base)
        self._base = base
        return base

    def _create_from_template(self) -> None:
        template = _template(self._runner)
        base = self._make_base()
        shutil.copytree(template, base / "data", symlinks=True)
        os.chmod(base / "data", 0o700)
        self._runner.own(base / "data")
        if self._port is None:
            self._port = free_port()
        self._write_config()
        self._provisioned = False

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

    def _write_config(self) -> None:
        settings: dict[str, str | int | float | bool] = {
            "port": self.port,
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            # A throwaway server: durability buys nothing, speed does.
            "fsync": False,
            "synchronous_commit": False,
            # ... but flush WAL often so that replicas see asynchronous commits within ~10 ms.
            "wal_writer_delay": "10ms",
            "full_page_writes": False,
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "256MB",
            "hot_standby": True,
            "shared_buffers": "32MB",
            **self.extra_settings,
        }
        _write_settings(self.data_dir, {k: _conf_value(v) for k, v in settings.items()})
        self._runner.own(self.data_dir / "poolwarden.conf")

    def _pg_ctl(
        self, action: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        wait = ["-w", "-t", str(PG_CTL_TIMEOUT_S)] if action != "status" else []
        return self._runner.run(
            "pg_ctl", action, *wait, "-D", str(self.data_dir), *args,
            cwd=self._base_dir(), check=check, timeout=PG_CTL_TIMEOUT_S + 10,
        )  # fmt: skip

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return scrub("\n".join(text.splitlines()[-lines:]), self.password)

    def _require_replica(self, what: str) -> None:
        if not self._is_replica:
            raise EmbeddedError(f"{what}() needs a replica; this server is a primary")
