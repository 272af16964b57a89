"""One pooled connection's bookkeeping: its state and the times that govern its life."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    from types import CodeType

    from ._driver import PooledConnection


class ConnState(enum.Enum):
    """Where a connection is in its life. The pool counts each state in one place."""

    IDLE = "idle"  # in the idle stack, ready to hand out
    IN_USE = "in_use"  # handed to a caller (or being checked: ping, restore)
    CLOSED = "closed"  # closed or being closed; never handed out again


class CloseReason(enum.StrEnum):
    """Why a connection was closed; ``PoolStats.connections_closed_total`` counts each."""

    LIFETIME = "lifetime"  # max_lifetime reached
    IDLE = "idle"  # idle longer than idle_timeout, above min_size
    OVERFLOW = "overflow"  # an overflow connection went idle
    ERROR = "error"  # the connection was lost (server gone, backend terminated, I/O error)
    RESET_FAILED = "reset_failed"  # could not be cleaned on release
    PING_FAILED = "ping_failed"  # failed its pre-ping
    SERVER_RESTARTED = "server_restarted"  # older than the server's latest start
    DISCARDED = "discarded"  # the caller asked for it to be discarded
    RESIZED = "resized"  # the pool shrank
    POOL_CLOSED = "pool_closed"  # the pool closed


class Record:
    """The pool's view of one connection. Times are ``time.monotonic()`` seconds."""

    __slots__ = (
        "acquired_at",
        "conn",
        "created_at",
        "expires_at",
        "holder",
        "idle_since",
        "inflight",
        "leak_reported",
        "pool",
        "server_started_at",
        "stack",
        "state",
        "stmt_mark",
        "stmt_since",
        "stmt_stage",
        "timed_out",
        "verified_at",
    )

    def __init__(
        self,
        conn: PooledConnection,
        pool: object,
        *,
        now: float,
        expires_at: float,
        server_started_at: float,
    ) -> None:
        self.conn = conn
        self.pool = pool  # the owner: a connection released into another pool is refused
        self.state = ConnState.IN_USE
        self.created_at = now
        self.expires_at = expires_at
        self.idle_since = now
        self.acquired_at = now
        # last moment the connection was known good (created, pinged or used successfully)
        self.verified_at = now
        self.server_started_at = server_started_at
        # where it was acquired: (code, instruction offset) frames, only with leak detection
        self.stack: tuple[tuple[CodeType, int], ...] | None = None
        self.holder: asyncio.Task[Any] | None = None  # the task that acquired (leak reports)
        self.leak_reported = False  # the current checkout was reported as a leak
        self.inflight = 0  # connections in use when this checkout began (adaptive limit)
        # the statement watchdog's view (see _watchdog); timed_out: it stopped a statement
        # of the current checkout
        self.stmt_mark = -1
        self.stmt_since = now
        self.stmt_stage = 0
        self.timed_out = False
        conn._pw_record = self

    def __repr__(self) -> str:
        pid = self.conn.get_server_pid() if not self.conn.is_closed() else None
        return f"<Record pid={pid} state={self.state.value}>"
