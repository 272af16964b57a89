"""What a streaming replica can do: pause and resume replay, wait for it, be promoted.

:class:`ReplicaControls` is the part of :class:`~poolwarden.embedded.EmbeddedPostgres` for
servers made by :meth:`~poolwarden.embedded.EmbeddedPostgres.start_replica` (in
:mod:`._server`, with the rest of the lifecycle); on a primary its methods raise
:class:`~poolwarden.embedded.EmbeddedError`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ._helpers import EmbeddedError
from ._process import ServerProcess

if TYPE_CHECKING:
    from ._server import EmbeddedPostgres

__all__ = ["ReplicaControls"]


class ReplicaControls(ServerProcess):
    """Replay control and promotion of a replica (see the module doc)."""

    # Set by EmbeddedPostgres.__init__ and start_replica().
    _is_replica: bool
    _primary: EmbeddedPostgres | None

    if TYPE_CHECKING:  # EmbeddedPostgres's own method, called from here

        def execute(
            self, sql: str, *, database: str | None = None, as_user: bool = False
        ) -> str: ...

    @property
    def is_replica(self) -> bool:
        """True for a server made by :meth:`start_replica` and not yet promoted."""
        return self._is_replica

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

    def _require_replica(self, what: str) -> None:
        if not self._is_replica:
            raise EmbeddedError(f"{what}() needs a replica; this server is a primary")
