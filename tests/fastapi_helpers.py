"""Helpers for the FastAPI integration tests: a private database per test, the application
run in process (lifespan + httpx), a real uvicorn process, and the server's own view of a
service's connections (pg_stat_activity)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from fastapi import FastAPI

from poolwarden import Database
from poolwarden.embedded import EmbeddedPostgres, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
# Generous: two workers importing FastAPI and SQLAlchemy on a busy two-core machine.
STARTUP_TIMEOUT_S = 60.0
# The test process's own database and metrics settings must not leak into a service.
_PRIVATE_ENV = ("DB_", "DATABASE_", "PROMETHEUS_MULTIPROC_DIR", "SERVICE_")


def example_app(database: Database) -> FastAPI:
    """The example service (``examples/service``) on ``database``. The repository root is
    put on ``sys.path`` for it: ``examples`` is not an installed package."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from examples.service.app import create_app

    app: FastAPI = create_app(database)
    return app


def dsn_for_database(pg: EmbeddedPostgres, database: str) -> str:
    """``pg.dsn`` pointing at ``database`` instead (same user and password)."""
    parts = urlsplit(pg.dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(pg: EmbeddedPostgres, prefix: str = "svc") -> str:
    """A new, empty database on ``pg`` owned by the test user; returns its name."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


def unique_app_name(stem: str = "pwfa") -> str:
    return f"{stem}_{secrets.token_hex(4)}"


def database_for(dsn: str, application_name: str, **pool: Any) -> Database:
    """A ``Database`` on ``dsn`` with a test-unique application_name and small pools."""
    options: dict[str, Any] = {
        "application_name": application_name, "min_size": 1, "pool_size": 4,
        "max_overflow": 0, "acquire_timeout": 10.0, "maintenance_interval": 0.05,
    }
    options.update(pool)
    return Database.from_url(dsn, **options)


@asynccontextmanager
async def serve_in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and yield an httpx client talking to it in this process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client


async def sessions_of(pg: EmbeddedPostgres, application_name: str) -> list[asyncpg.Record]:
    """The server's sessions of one application_name: pid, state, query."""
    conn = await asyncpg.connect(pg.dsn)
    try:
        return list(await conn.fetch(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        ))
    finally:
        await conn.close()


async def wait_for(predicate: Any, *, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll the async ``predicate`` until it returns true or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while True:
        if await predicate():
            return True
        if time.monotonic() > end:
            return False
        await asyncio.sleep(interval)


class UvicornProcess:
    """``python -m uvicorn <target> --workers N`` on a free loopback port, logs to a file."""

    def __init__(
        self, target: str, env: Mapping[str, str], *, workers: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.target = target
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV)}
        self.env = {**inherited, **env, "PYTHONUNBUFFERED": "1"}
        self.workers = workers
        self.extra_args = extra_args
        self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process
            prefix="uvicorn-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UvicornProcess:
        command = [
            sys.executable, "-m", "uvicorn", self.target, "--host", "127.0.0.1",
            "--port", str(self.port), "--workers", str(self.workers), *self.extra_args,
        ]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    async def wait_ready(self, path: str = "/health/db") -> None:
        """Until every worker has started and ``path`` answers 200 (raises ``RuntimeError``
        with the log if never). Waiting for one answer is not enough: a worker still starting
        when a test stops the database fails its start-up and uvicorn stops them all."""
        end = time.monotonic() + STARTUP_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < end:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"uvicorn exited early:\n{self.logs()}")
                try:
                    started = self.logs().count("Application startup complete")
                    if (await client.get(path)).status_code == 200 and started >= self.workers:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"uvicorn not ready within {STARTUP_TIMEOUT_S} s:\n{self.logs()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait (without blocking the loop) for the process to end; returns its exit code."""
        assert self.process is not None
        end = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > end:
                raise RuntimeError(f"uvicorn did not exit within {timeout} s:\n{self.logs()}")
            await asyncio.sleep(0.1)
        return self.process.returncode

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not end in time. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return -1 if self.process is None else self.process.returncode
        self.signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except RuntimeError:
            self.process.kill()
            return await self.wait_exit(10.0)

    def logs(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@asynccontextmanager
async def uvicorn_service(
    target: str, env: Mapping[str, str], *, workers: int = 2, ready_path: str = "/health/db",
) -> AsyncIterator[UvicornProcess]:
    """A started, ready uvicorn process; stopped (SIGTERM) and removed afterwards."""
    server = UvicornProcess(target, env, workers=workers).start()
    try:
        await server.wait_ready(ready_path)
        yield server
    finally:
        await server.stop()
        server.cleanup()


def service_env(dsn: str, application_name: str, **extra: str) -> dict[str, str]:
    """The environment of the example service: DATABASE_URL and small pools."""
    env = {
        "DATABASE_URL": dsn, "DB_APPLICATION_NAME": application_name, "DB_POOL_SIZE": "4",
        "DB_MAX_OVERFLOW": "0", "DB_POOL_MIN_SIZE": "1", "SERVICE_HEALTH_INTERVAL_S": "0.5",
    }
    env.update(extra)
    return env
