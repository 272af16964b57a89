"""Pure policies of the pool core: reconnect backoff and lifetime jitter. No I/O here."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter for reconnect attempts.

    After ``n`` consecutive failures the next attempt waits a uniform random time in
    ``[0, min(max_delay, initial * FACTOR ** (n - 1))]`` ("full jitter": many processes
    that lost the same server do not retry in lockstep). A success resets it.
    """

    initial: float
    max_delay: float
    rand: Callable[[], float] = field(default=random.random)
    failures: int = 0

    FACTOR = 2.0

    def delay(self) -> float:
        """Seconds to wait before the next attempt (0 when the last attempt succeeded)."""
        if self.failures == 0:
            return 0.0
        cap = min(self.max_delay, self.initial * self.FACTOR ** (self.failures - 1))
        return cap * self.rand()

    def failed(self) -> None:
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0


def lifetime_deadline(
    now: float, max_lifetime: float, jitter: float, rand: Callable[[], float] = random.random
) -> float:
    """When a connection created at ``now`` expires: ``max_lifetime`` shortened by up to
    ``jitter`` (a fraction) so that connections opened together do not all expire together."""
    return now + max_lifetime * (1.0 - jitter * rand())
