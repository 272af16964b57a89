"""One server's files and process: its port, its directory (data, socket, log), the settings it
runs with, and ``pg_ctl``.

:class:`ServerProcess` is the part of :class:`~poolwarden.embedded.EmbeddedPostgres` that deals
with the disk and the server process; :class:`~poolwarden.embedded.EmbeddedPostgres` (in
:mod:`._server`) sets the state declared here and builds its lifecycle on these methods.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .._secrets import scrub
from ._binaries import Runner
from ._helpers import LOOPBACK, EmbeddedError, free_port
from ._template import conf_value, runtime_root, template_dir, write_settings

__all__ = ["PG_CTL_TIMEOUT_S", "ServerProcess"]

PG_CTL_TIMEOUT_S = 60


class ServerProcess:
    """Where one embedded server lives and how its process is driven (see the module doc)."""

    # Set by EmbeddedPostgres.__init__.
    password: str
    max_connections: int
    extra_settings: dict[str, str | int | float | bool]
    _port: int | None
    _runner: Runner
    _base: Path | None
    _provisioned: bool

    @property
    def port(self) -> int:
        """The TCP port; fixed at the first start and kept across restarts."""
        if self._port is None:
            raise EmbeddedError("the server has not been started yet; it has no port")
        return self._port

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
    def is_running(self) -> bool:
        """Whether the server process is alive (``pg_ctl status``)."""
        if self._base is None or not (self.data_dir / "PG_VERSION").exists():
            return False
        status = self._pg_ctl("status", check=False)
        return status.returncode == 0

    def _base_dir(self) -> Path:
        if self._base is None:
            raise EmbeddedError("the server has no data directory (not started, or cleaned up)")
        return self._base

    def _make_base(self) -> Path:
        # A short path: a unix socket path must stay under ~100 bytes.
        base = Path(tempfile.mkdtemp(prefix="pw-pg-", dir=runtime_root()))
        (base / "sock").mkdir()
        self._runner.own(base)
        self._base = base
        return base

    def _create_from_template(self) -> None:
        template = template_dir(self._runner)
        base = self._make_base()
        shutil.copytree(template, base / "data", symlinks=True)
        os.chmod(base / "data", 0o700)
        self._runner.own(base / "data")
        if self._port is None:
            self._port = free_port()
        self._write_config()
        self._provisioned = False

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
        write_settings(self.data_dir, {k: conf_value(v) for k, v in settings.items()})
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
