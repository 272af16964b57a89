"""The server under test: the one given (``--dsn`` / ``DATABASE_URL``) or a throwaway one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from poolwarden.embedded import EmbeddedPostgres

EMBEDDED_MAX_CONNECTIONS = 200  # pgbench's 64 clients + the largest pool, with room to spare


@dataclass(frozen=True, slots=True)
class Target:
    dsn: str
    origin: str  # "--dsn", "DATABASE_URL" or "embedded"

    @property
    def masked(self) -> str:
        return mask(self.dsn)


def mask(dsn: str) -> str:
    """The DSN with its password replaced by ``***`` (results never hold a password)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def target(dsn: str | None) -> Iterator[Target]:
    """The given server, else ``DATABASE_URL``, else an :class:`EmbeddedPostgres` for the run."""
    if dsn:
        yield Target(dsn, "--dsn")
        return
    if os.environ.get("DATABASE_URL"):
        yield Target(os.environ["DATABASE_URL"], "DATABASE_URL")
        return
    with EmbeddedPostgres(max_connections=EMBEDDED_MAX_CONNECTIONS) as pg:
        yield Target(pg.dsn, "embedded")
