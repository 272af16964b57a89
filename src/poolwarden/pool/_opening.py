"""Opening connections: how many to open and when (waiters not yet covered, ``min_size``,
``max_size``, at most ``max_concurrent_connects`` at a time, backoff after a failure), and
what a new connection tells about the server (a newer start time: it restarted)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from .. import events as ev
from .._secrets import dsn_target
from ..errors import ConnectionFailed
from . import _driver
from ._base import NEVER, PoolBase
from ._policy import lifetime_deadline
from ._record import CloseReason, Record

__all__ = ["Opening"]

_monotonic = time.monotonic


class Opening(PoolBase):
    """The pool's part that opens connections."""

    def _grow(self) -> None:
        """Start connection attempts for waiters not yet covered and to keep ``min_size``,
        within ``max_size`` and at most ``max_concurrent_connects`` at a time (after a
        failure, each attempt first waits out the backoff: no stampede)."""
        if self._closing or not self._opened:
            return
        total = self._total()
        servable = min(len(self._waiters), self._limit - self._n_in_use) - len(self._idle)
        wanted = max(servable - self._n_opening, self._min_size - total)
        limit = self._config.max_concurrent_connects
        while wanted > 0 and total < self._max_size and self._n_opening < limit:
            self._n_opening += 1
            total += 1
            wanted -= 1
            self._spawn(self._open_one())

    async def _open_one(self) -> None:
        try:
            delay = self._backoff.delay()
            if delay:
                await asyncio.sleep(delay)
            record = await self._connect()
        except asyncio.CancelledError:
            self._n_opening -= 1
            raise
        except Exception as exc:
            self._n_opening -= 1
            self._backoff.failed()
            if self._breaker is not None:
                self._breaker.record_failure(_monotonic())
            self._last_error = self._connection_failed(exc)
            self._last_error.__cause__ = exc
            self.events.emit(ev.ConnectFailed(
                node=self.name, error=_driver.describe_error(exc, self._config),
                attempt=self._backoff.failures, next_delay_s=self._backoff.delay(),
            ))
            self._grow()
            return
        self._n_opening -= 1
        self._backoff.succeeded()
        if self._breaker is not None:
            self._breaker.record_success(_monotonic())
        self._n_in_use += 1
        if self._closing:
            self._retire(record, CloseReason.POOL_CLOSED)
            return
        self._hand_on(record)
        self._grow()

    async def _connect(self) -> Record:
        """Open one connection and learn the server's start time (restart detection)."""
        begun = _monotonic()
        try:
            conn = await _driver.open_connection(
                self._config, connection_class=self._connection_class,
                watched=self._watchdog is not None, observed=self._observer is not None)
            try:
                started = await _driver.server_started_at(conn, self._config.connect_timeout)
            except BaseException:
                conn.terminate()
                raise
        except Exception:
            self._connect_errors += 1
            raise
        self._created += 1
        conn._pw_observer = self._observer
        now = _monotonic()
        self._h_create.observe(now - begun)
        self.events.emit(ev.ConnectionOpened(
            node=self.name, pid=conn.get_server_pid(), duration_s=now - begun))
        if started > self._server_started_at:
            if self._server_started_at:
                self._server_restarts += 1
                self.events.emit(ev.ServerRestarted(
                    node=self.name, invalidated=self._invalidate_older(started)))
            self._server_started_at = started
        # (a connection to a server older than one seen already is stale from the start)
        expires = (lifetime_deadline(now, self._config.max_lifetime, self._config.lifetime_jitter)
                   if started >= self._server_started_at else -NEVER)
        record = Record(conn, self, now=now, expires_at=expires, server_started_at=started)
        self._records.add(record)
        return record

    def _invalidate_older(self, started: float) -> int:
        """The server restarted at ``started``: close the idle connections opened before,
        and mark those in use stale (one comparison on the hot paths finds them); returns
        how many idle ones were closed."""
        for record in self._records:
            if record.server_started_at < started:
                record.expires_at = -NEVER
        keep = [r for r in self._idle if r.server_started_at >= started]
        for record in self._idle:
            if record.server_started_at < started:
                self._close_record(record, CloseReason.SERVER_RESTARTED)
        dropped = len(self._idle) - len(keep)
        self._idle = deque(keep)
        return dropped

    def _connection_failed(self, exc: BaseException) -> ConnectionFailed:
        reason = _driver.describe_error(exc, self._config)
        return ConnectionFailed(
            f"cannot connect to {self._config_target()}: {reason}",
            node=self.name, state=self._state(),
        )

    def _config_target(self) -> str:
        return dsn_target(self._config.dsn)
