"""A TCP fault proxy for tests: put it between a client and PostgreSQL, then break the network.

``FaultProxy`` listens on a free 127.0.0.1 port and forwards every connection to a target.
Faults are switched at runtime and apply at once, to existing and new connections alike:

- pass-through (the default, and what :meth:`FaultProxy.heal` returns to);
- :meth:`FaultProxy.delay` — every chunk, in both directions, is held ``seconds`` before it is
  forwarded (latency, not a bandwidth cap: chunks are pipelined, and their order is kept);
- :meth:`FaultProxy.blackhole` — connections stay open but nothing is forwarded either way, and
  new connections are accepted but never reach the target — like a network partition where
  packets vanish. Data held during the partition is delivered after :meth:`FaultProxy.heal`,
  as TCP retransmission would;
- :meth:`FaultProxy.refuse` — new connections are reset as soon as they are accepted;
- :meth:`FaultProxy.reset_all` — every current connection is aborted with a TCP RST on both
  sides (a one-shot action, not a mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyMode"]

CHUNK_BYTES = 64 * 1024
LOOPBACK = "127.0.0.1"


class ProxyMode(enum.StrEnum):
    """What the proxy does with traffic (delay is a separate knob on top of pass-through)."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket so that the peer sees a reset, not an orderly close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER on with a zero timeout makes close() send RST and drop unsent data.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side, the target side, and the tasks moving bytes."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def reset(self) -> None:
        for writer in self.writers():
            _abort_with_rst(writer)

    def close(self) -> None:
        for writer in self.writers():
            writer.close()


class FaultProxy:
    """Forwards TCP from ``127.0.0.1:port`` to ``target_host:target_port``, with faults on demand.

    Use as ``async with FaultProxy(host, port) as proxy:``; ``proxy.port`` is the listening port
    and ``proxy.dsn_for(dsn)`` points a ``postgresql://`` URL at the proxy. Leaving the block
    (or :meth:`close`) closes every connection and waits for every task the proxy started.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._mode = ProxyMode.PASS
        self._delay_s = 0.0
        # Set while traffic may flow; cleared by blackhole(). Pumps wait on it before writing.
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections_accepted = 0
        """Connections accepted since start (cumulative), including refused ones."""
        self.connections_refused = 0
        """Connections reset on accept by :meth:`refuse` (cumulative)."""
        self.connections_reset = 0
        """Connections aborted by :meth:`reset_all` (cumulative)."""

    # -- facts -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        """The port the proxy listens on (127.0.0.1)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def delay_s(self) -> float:
        """Latency added to each chunk in each direction, in seconds."""
        return self._delay_s

    @property
    def connections_active(self) -> int:
        """Connections currently open through the proxy (current)."""
        return len(self._links)

    def dsn_for(self, dsn: str) -> str:
        """``dsn`` (a ``postgresql://`` URL) with its host and port replaced by the proxy's.

        User, password (still percent-encoded), database and query are kept as given.
        """
        parts = urlsplit(dsn)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{self.host}:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._server is not None else "not started"
        return (
            f"<FaultProxy {where} -> {self.target_host}:{self.target_port} mode={self._mode} "
            f"delay_s={self._delay_s} active={self.connections_active}>"
        )

    # -- faults ----------------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it, both ways (traffic flows again)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0 seconds")
        self._delay_s = seconds
        self._set_mode(ProxyMode.PASS)

    def blackhole(self) -> None:
        """Forward nothing, either way; hold connections open and accept new ones silently."""
        self._set_mode(ProxyMode.BLACKHOLE)

    def refuse(self) -> None:
        """Reset every new connection at once. Existing connections are left alone."""
        self._set_mode(ProxyMode.REFUSE)

    def reset_all(self) -> int:
        """Abort every current connection with RST on both sides; return how many there were."""
        links = list(self._links)
        for link in links:
            link.reset()
        self.connections_reset += len(links)
        return len(links)

    def heal(self) -> None:
        """Back to plain pass-through: no delay; held data flows; new connections are served."""
        self._delay_s = 0.0
        self._set_mode(ProxyMode.PASS)

    def _set_mode(self, mode: ProxyMode) -> None:
        self._mode = mode
        if mode is ProxyMode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start listening. Returns at once; the proxy then serves in the background."""
        if self._server is None:
            self._server = await asyncio.start_server(self._on_client, LOOPBACK, self._listen_port)
        return self

    async def close(self) -> None:
        """Stop listening, close every connection and wait for all of the proxy's tasks."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        tasks = [*self._handlers, *(t for link in self._links for t in link.tasks)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Only now: from Python 3.12 wait_closed() also waits for the connections to end.
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------------

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine) so that the handler task is ours to track and
        # cancel on close(); asyncio.Server in 3.11 does not wait for its handlers.
        if self._closing:
            # Accepted just before close() and delivered just after it: nobody would serve it.
            _abort_with_rst(writer)
            return
        self.connections_accepted += 1
        if self._mode is ProxyMode.REFUSE:
            self.connections_refused += 1
            _abort_with_rst(writer)
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        link = _Link(self, client_w)
        self._links.add(link)
        try:
            # A blackholed proxy accepts but never reaches the target, like a lost SYN upstream.
            await self._flowing.wait()
            try:
                up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                _abort_with_rst(client_w)
                return
            link.upstream = up_w
            loop = asyncio.get_running_loop()
            link.tasks = {
                loop.create_task(self._pump(client_r, up_w)),
                loop.create_task(self._pump(up_r, client_w)),
            }
            # When either direction ends, the whole link ends (half-close is not modelled).
            _, pending = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            link.close()
        finally:
            self._links.discard(link)
            for writer in link.writers():
                if not writer.transport.is_closing():
                    writer.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Move bytes one way; each chunk leaves no earlier than its arrival plus the delay.

        Reading and writing are separate tasks so that a delay adds latency without limiting
        throughput. At end of input, what was read is still delivered before returning.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        writer_task = loop.create_task(self._deliver(queue, sink))
        try:
            while not writer_task.done():
                try:
                    chunk = await source.read(CHUNK_BYTES)
                except OSError:
                    chunk = b""
                queue.put_nowait((loop.time() + self._delay_s, chunk))
                if not chunk:
                    await writer_task
                    return
        finally:
            writer_task.cancel()
            await asyncio.gather(writer_task, return_exceptions=True)

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if not chunk:  # end of input
                return
            try:
                sink.write(chunk)
                await sink.drain()
            except OSError:
                return
