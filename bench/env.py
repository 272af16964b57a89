"""The facts a result needs to be read later: versions, machine, server, git revision."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg

PACKAGES = ("poolwarden", "asyncpg", "sqlalchemy", "psycopg", "psycopg-pool", "greenlet")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """Client-side facts: Python, packages, CPU, load at the start, git revision."""
    status = _git("status", "--porcelain")
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": os.getloadavg(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


async def server(dsn: str) -> dict[str, Any]:
    """Server facts: version and the settings that bound a benchmark."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "server_version": await conn.fetchval("SHOW server_version"),
            "max_connections": int(await conn.fetchval("SHOW max_connections")),
            "fsync": await conn.fetchval("SHOW fsync"),
            "shared_buffers": await conn.fetchval("SHOW shared_buffers"),
        }
    finally:
        await conn.close()
