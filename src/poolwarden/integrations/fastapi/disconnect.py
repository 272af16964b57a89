"""Cancel a request's work when its client goes away, so that its connection is released.

ASGI servers do not cancel a request when the client disconnects: the endpoint runs on,
holding its database connection (and maybe a statement on the server) for an answer nobody
will read. :class:`CancelOnDisconnectMiddleware` watches the connection while the request
runs and, when the client disconnects before the response is complete, cancels the request
task once (plain asyncio cancellation). The cancellation then travels the usual way: the
pool stops waiting or cancels the running statement, session dependencies roll back, and
every connection goes back to the pool.

How it watches: a helper task reads the ASGI ``receive`` channel ahead of the application
and hands the messages on in order. It reads the next body chunk only when the application
has taken the previous one (uploads keep their back-pressure); once the body is complete it
waits for ``http.disconnect``. A disconnect after the response is complete (the server's
way of saying "done") cancels nothing: background tasks run to the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CancelOnDisconnectMiddleware"]

logger = logging.getLogger("poolwarden.fastapi")

_DISCONNECT: Message = {"type": "http.disconnect"}


class _Watch:
    """Reads ``receive`` ahead of the application; calls ``on_disconnect`` once if the
    client leaves. The application reads through :meth:`receive`."""

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self._receive = receive
        self._task = task
        self._messages: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()
        self.disconnected = False
        self.response_complete = False
        self.finished = False  # the application returned or raised: too late to cancel
        self.cancelled = False  # we cancelled the request task

    async def run(self) -> None:
        try:
            while True:
                message = await self._receive()
                self._messages.append(message)
                self._arrived.set()
                if message["type"] == "http.disconnect":
                    self._client_gone()
                    return
                if message.get("more_body", False):
                    while self._messages:  # back-pressure: wait until the chunk is taken
                        self._taken.clear()
                        await self._taken.wait()
        except Exception as exc:
            # The server's receive failed: stop watching, the request goes on unwatched.
            logger.debug("disconnect watch stopped: %s", type(exc).__name__)

    def _client_gone(self) -> None:
        self.disconnected = True
        if not (self.response_complete or self.finished):
            self.cancelled = True
            self._task.cancel()

    async def receive(self) -> Message:
        while not self._messages:
            if self.disconnected:
                return _DISCONNECT
            self._arrived.clear()
            await self._arrived.wait()
        message = self._messages.popleft()
        self._taken.set()
        return message


class CancelOnDisconnectMiddleware:
    """Pure ASGI middleware: cancels an HTTP request's work when its client disconnects
    before the response is complete (module docstring). Other scopes pass through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        watch = _Watch(receive, task)

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                watch.response_complete = True
            await send(message)

        reader = asyncio.get_running_loop().create_task(watch.run())
        try:
            await self.app(scope, watch.receive, watched_send)
        except asyncio.CancelledError:
            if watch.cancelled and task.uncancel() == 0:
                return  # our own cancellation, and no other: the client is gone, answer nobody
            raise
        except BaseException:
            if watch.cancelled:
                task.uncancel()  # the application turned our cancellation into an error
            raise
        else:
            if watch.cancelled:
                task.uncancel()  # the application absorbed our cancellation
        finally:
            # No await between the application's end and here: the reader cannot have run.
            watch.finished = True
            # Not awaited (an await here could swallow someone else's cancellation); it ends
            # at its next step: it only ever awaits receive() or an event.
            reader.cancel()

    def __repr__(self) -> str:
        return "<CancelOnDisconnectMiddleware>"
