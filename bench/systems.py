"""What a benchmarked system is: a pool behind three operations, and the registry of them.

Each system opens a pool of ``size`` connections and offers the three operations of the
workloads, all of the shape "acquire, maybe query, release":

- ``hold``: acquire and release with no query; the connection is held across one turn of
  the event loop so that C tasks really contend for it (a pool whose fast path never
  suspends would otherwise run the tasks one after another);
- ``select1``: ``SELECT 1`` and read the value;
- ``sleep``: ``SELECT pg_sleep(0.01)`` with the acquire bounded by ``acquire_timeout``;
  a refusal or timeout of the acquire raises :class:`bench.drive.Shed`.

Each returns ``time.perf_counter_ns()`` taken as soon as the connection was in hand.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

SELECT1 = "SELECT 1"
SLEEP = "SELECT pg_sleep(0.01)"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The pool a run asks for: its size (min = max, no overflow) and the acquire budget."""

    size: int
    acquire_timeout_s: float


class Client(Protocol):
    async def hold(self) -> int: ...
    async def select1(self) -> int: ...
    async def sleep(self) -> int: ...
    async def close(self) -> None: ...


Opener = Callable[[str, PoolSpec], Awaitable[Client]]


@dataclass(frozen=True, slots=True)
class System:
    """A named pool configuration under test.

    ``workloads`` names the workloads (``"a"``, ``"b"``, ``"c"``) it takes part in;
    ``missing`` says why it cannot run here (a package or module not available), or None.
    """

    key: str
    label: str
    note: str
    open: Opener
    workloads: frozenset[str]
    missing: Callable[[], str | None]


def always_available() -> str | None:
    return None
