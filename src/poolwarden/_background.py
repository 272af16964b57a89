"""The lifecycle shared by poolwarden's background tasks (health monitor, metrics sync)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from types import TracebackType

logger = logging.getLogger("poolwarden")


class BackgroundTask:
    """One named asyncio task running ``_run()``; ``start()`` / ``await stop()`` are
    idempotent and ``async with`` does both. Subclasses implement ``_run``."""

    TASK_NAME = "poolwarden-background"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the task (idempotent); its first round runs at once."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.TASK_NAME)

    async def stop(self) -> None:
        """Cancel the task and wait until it has finished (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() rather than awaiting the task: our own cancellation must still propagate.
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s ended with %s", self.TASK_NAME, type(task.exception()).__name__)

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
