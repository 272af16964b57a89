"""The data directories: the cached, initialised template every server is copied from, the
per-server settings file (``poolwarden.conf``), and where both live on disk.

``initdb`` runs once per PostgreSQL version into a cache directory (``$POOLWARDEN_CACHE`` or
``~/.cache/poolwarden``); servers' own directories go to ``$POOLWARDEN_RUNTIME_DIR``, a roomy
tmpfs, or ``/tmp``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ._binaries import Runner
from ._helpers import DEFAULT_DATABASE, DEFAULT_USER, SUPERUSER, EmbeddedError, free_port

__all__ = [
    "RAM_DIR",
    "RAM_DIR_MIN_FREE_BYTES",
    "TEMPLATE_FORMAT",
    "conf_value",
    "runtime_root",
    "template_dir",
    "write_settings",
]

# Bump when the template recipe changes, so that old cached templates are not reused.
TEMPLATE_FORMAT = 2
# Server directories go to RAM when there is plenty of it: a copy of the template onto a slow
# disk costs seconds, onto tmpfs tens of milliseconds, and nothing here needs durability.
RAM_DIR = Path("/dev/shm")
RAM_DIR_MIN_FREE_BYTES = 2 * 1024**3

_PG_HBA = """\
# poolwarden embedded server: superuser over the private socket only; passwords over TCP.
local   all          all                    trust
local   replication  all                    trust
host    all          all   127.0.0.1/32     scram-sha-256
host    replication  all   127.0.0.1/32     scram-sha-256
"""


def _cache_root() -> Path:
    if env := os.environ.get("POOLWARDEN_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "poolwarden"


def template_dir(runner: Runner) -> Path:
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


def _initdb(runner: Runner, staging: Path, data: Path) -> None:
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
    write_settings(data, {"listen_addresses": "''", "unix_socket_directories": f"'{sock}'",
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


def runtime_root() -> str | None:
    """Where servers' directories go: ``$POOLWARDEN_RUNTIME_DIR``, a roomy tmpfs, or ``/tmp``."""
    if env := os.environ.get("POOLWARDEN_RUNTIME_DIR"):
        return env
    try:
        stat = os.statvfs(RAM_DIR)
    except OSError:
        return None
    roomy = stat.f_bavail * stat.f_frsize >= RAM_DIR_MIN_FREE_BYTES
    return str(RAM_DIR) if roomy and os.access(RAM_DIR, os.W_OK) else None


def write_settings(data: Path, settings: Mapping[str, str]) -> None:
    lines = [f"{name} = {value}\n" for name, value in settings.items()]
    (data / "poolwarden.conf").write_text("".join(lines))


def _read_setting(data: Path, name: str) -> str:
    for line in (data / "poolwarden.conf").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip().strip("'")
    raise EmbeddedError(f"setting {name} not found in {data / 'poolwarden.conf'}")


def conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"
