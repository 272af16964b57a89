"""Shared fixtures: real PostgreSQL servers started by the test run itself, and a fault proxy.

- ``pg`` (session): one primary for the whole run. Tests share it, so each test puts its
  objects under a unique name (``unique_name``) and never stops or restarts it.
- ``fresh_pg`` (function): a private primary for destructive tests (stop, restart, crash).
- ``replica`` (session, started on first use): a streaming hot standby of ``pg``. A test that
  pauses replay resumes it before it ends; promotion tests make their own with
  ``fresh_pg.start_replica()``.
- ``proxy`` (function): a ``FaultProxy`` in front of ``pg``; ``proxy.dsn_for(pg.dsn)``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from poolwarden.embedded import EmbeddedPostgres
from poolwarden.testing import FaultProxy

# Room for many pools at once plus the tests that fill a server up on purpose.
SESSION_MAX_CONNECTIONS = 200


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    """The shared primary (started once per run, removed at the end)."""
    with EmbeddedPostgres(max_connections=SESSION_MAX_CONNECTIONS) as server:
        yield server


@pytest.fixture(scope="session")
def replica(pg: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    """A streaming replica of ``pg``; removed with it."""
    standby = pg.start_replica()
    yield standby
    standby.cleanup()


@pytest.fixture
def fresh_pg() -> Iterator[EmbeddedPostgres]:
    """A private primary this test may stop, restart or crash."""
    with EmbeddedPostgres() as server:
        yield server


@pytest.fixture
async def proxy(pg: EmbeddedPostgres) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of ``pg``, closed (with all its connections) after the test."""
    async with FaultProxy(pg.host, pg.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A SQL-safe identifier unique to this test run, e.g. ``t_restart_keeps_data_3f9a1c``."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower().removeprefix("test_"))[:40]
    return f"t_{stem.strip('_')}_{secrets.token_hex(3)}"
