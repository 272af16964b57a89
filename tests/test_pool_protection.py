"""Protection wired into the pool core, on real servers: the circuit breaker, overload
admission and the adaptive concurrency limit. (The pure policies are tested exhaustively
without a server in test_breaker.py, test_admission.py and test_limiter.py.)"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from pool_helpers import config_for, open_pool, terminate
from poolwarden import CircuitOpen, ConnectionFailed, Pool, PoolExhausted, PoolTimeout
from poolwarden import events as ev
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.protect.admission import AdmissionConfig
from poolwarden.protect.breaker import BreakerConfig
from poolwarden.protect.limiter import LimiterConfig
from poolwarden.testing import FaultProxy


async def test_breaker_opens_on_a_down_server_fails_fast_and_closes_when_it_is_back(
    fresh_pg: EmbeddedPostgres,
) -> None:
    """Server down: after a run of failed connection attempts the breaker opens; callers
    then get CircuitOpen at once (with Retry-After and the connection error as cause)
    instead of waiting out their timeout; when the server is back, a probe closes it.
    Every transition is an event and the state is in the stats."""
    transitions: list[ev.BreakerChanged] = []
    config = config_for(
        fresh_pg, min_size=1, pool_size=2, acquire_timeout=5.0,
        reconnect_initial_delay=0.02, reconnect_max_delay=0.05,
        breaker=BreakerConfig(consecutive_failures=3, open_s=0.3, max_open_s=0.6),
    )
    async with Pool(config) as pool:
        pool.events.subscribe(
            lambda e: transitions.append(e) if isinstance(e, ev.BreakerChanged) else None)
        await asyncio.to_thread(fresh_pg.stop, "immediate")
        waiter = asyncio.ensure_future(pool.acquire())  # waits: no connection can be made
        with pytest.raises(CircuitOpen):
            await asyncio.wait_for(waiter, 4.0)  # failed fast when the breaker opened
        assert pool.stats().breaker_state in {"open", "half_open"}
        started = time.monotonic()
        with pytest.raises((CircuitOpen, PoolTimeout)) as refused:
            await pool.acquire(timeout=2.0)
        if isinstance(refused.value, CircuitOpen):
            assert time.monotonic() - started < 1.0  # refused at once, not after 2 s
            assert refused.value.retry_after_s is not None
            assert isinstance(refused.value.__cause__, ConnectionFailed)
            assert fresh_pg.password not in str(refused.value)
        await asyncio.to_thread(fresh_pg.start)
        for _ in range(100):
            try:
                async with pool.connection(timeout=1.0) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
                break
            except (CircuitOpen, PoolTimeout):
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the breaker never closed after the server came back")
        stats = pool.stats()
    assert stats.breaker_state == "closed"
    assert stats.circuit_refusals_total >= 1
    states = [(t.old, t.new) for t in transitions]
    assert states[0] == ("closed", "open")
    assert ("half_open", "closed") in states


async def test_a_cancelled_probe_frees_its_slot_for_the_next_caller(
    pg: EmbeddedPostgres, proxy: FaultProxy
) -> None:
    """Half open, one probe at a time: the probe waits for a connection the pool is still
    opening (the server is blackholed, so the attempt hangs); cancelling it frees the probe
    slot, so the next caller is let through to wait in its turn instead of being refused
    with CircuitOpen while nobody is probing."""
    config = config_for(
        proxy.dsn_for(pg.dsn), min_size=0, pool_size=2, acquire_timeout=5.0,
        connect_timeout=5.0, reconnect_initial_delay=0.01, reconnect_max_delay=0.02,
        breaker=BreakerConfig(consecutive_failures=2, open_s=0.2, max_open_s=0.2, jitter=0.0),
    )
    async with Pool(config) as pool:
        proxy.refuse()
        proxy.reset_all()  # the connection opened at start is gone too
        await asyncio.sleep(0.05)
        with pytest.raises(CircuitOpen):  # failed fast once the refused attempts opened it
            await asyncio.wait_for(pool.acquire(), 4.0)
        proxy.blackhole()  # from now on, connection attempts hang
        await asyncio.sleep(0.3)  # the open period ends: the next caller is the probe
        probe = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.1)
        assert not probe.done()  # waiting for the hanging attempt
        assert pool.stats().breaker_state == "half_open"
        with pytest.raises(CircuitOpen):  # one probe at a time
            await pool.acquire(timeout=0.2)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        with pytest.raises(PoolTimeout):  # let through this time: it waited, then timed out
            await pool.acquire(timeout=0.2)


@pytest.mark.parametrize("ending", ["discarded", "lost"])
async def test_a_probe_whose_connection_comes_back_unusable_ends_its_probe(
    pg: EmbeddedPostgres, proxy: FaultProxy, ending: str
) -> None:
    """Half open, the probe takes an idle connection and gives it back unusable. Discarded
    (its statement failed, say): that says nothing of the node, so the slot is freed and
    the next caller's probe closes the breaker. Lost (the server ended it): the probe
    failed, and the breaker opens again. Before, neither told the breaker anything: the slot
    stayed taken, and with nothing left to reconnect every later caller got CircuitOpen."""
    config = config_for(
        proxy.dsn_for(pg.dsn), min_size=0, pool_size=2, acquire_timeout=2.0, pre_ping=False,
        reconnect_initial_delay=0.01, reconnect_max_delay=0.02,
        breaker=BreakerConfig(consecutive_failures=2, open_s=0.2, max_open_s=0.2, jitter=0.0),
    )
    async with Pool(config) as pool:
        held = await pool.acquire()  # kept through the outage: idle when the probe comes
        proxy.refuse()
        with pytest.raises(CircuitOpen):  # the refused attempts for this caller opened it
            await asyncio.wait_for(pool.acquire(), 4.0)
        await pool.release(held)
        proxy.heal()
        await asyncio.sleep(0.3)  # the open period ends: the next caller is the probe
        if ending == "discarded":
            probe = await pool.acquire()
            assert pool.stats().breaker_state == "half_open"
            with pytest.raises(CircuitOpen):  # one probe at a time
                await pool.acquire(timeout=0.2)
            await pool.release(probe, discard=True)
            async with pool.connection(timeout=2.0) as conn:  # the next probe is let through
                assert await conn.fetchval("SELECT 1") == 1
            assert pool.stats().breaker_state == "closed"
        else:
            # (which error depends on when asyncpg sees the server's goodbye)
            with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError,
                                asyncpg.InterfaceError, asyncpg.InternalClientError)):
                async with pool.connection() as conn:  # the probe
                    assert pool.stats().breaker_state == "half_open"
                    assert await terminate(pg, config.application_name) == 1
                    await conn.fetchval("SELECT 1")
            assert pool.stats().breaker_state == "open"  # the probe failed


async def test_overload_refuses_the_excess_at_once_and_serves_the_rest_within_budget(
    pg: EmbeddedPostgres,
) -> None:
    """60 callers loop on a pool of 2 whose uses take 10 ms, each with a 1 s budget:
    admission refuses the excess with PoolExhausted carrying Retry-After, enters overload
    mode (an event), and no caller is served after its budget."""
    seen: list[ev.Event] = []
    config = {"min_size": 2, "pool_size": 2, "acquire_timeout": 1.0, "admission": AdmissionConfig()}
    async with open_pool(pg, **config) as pool:
        pool.events.subscribe(seen.append)
        waits: list[float] = []
        refusals: list[PoolExhausted] = []
        stop = time.monotonic() + 1.5

        async def caller() -> None:
            while time.monotonic() < stop:
                asked = time.monotonic()
                try:
                    async with pool.connection() as conn:
                        waits.append(time.monotonic() - asked)
                        await conn.execute("SELECT pg_sleep(0.01)")
                except PoolExhausted as refused:
                    refusals.append(refused)
                    await asyncio.sleep(refused.retry_after_s or 0.01)

        await asyncio.gather(*(caller() for _ in range(60)))
        stats = pool.stats()
    assert refusals, "nothing was refused under 30x overload"
    assert all(r.retry_after_s is not None and r.retry_after_s > 0 for r in refusals)
    assert max(waits) < 1.0  # nobody served after the budget
    assert stats.acquire_shed_total == len(refusals)
    assert any(isinstance(e, ev.OverloadChanged) and e.overloaded for e in seen)
    assert stats.acquire_timeouts_total == 0


async def test_queue_full_refusal_carries_a_retry_after_estimate(pg: EmbeddedPostgres) -> None:
    async with open_pool(pg, pool_size=1, max_waiting=1) as pool:
        held = await pool.acquire()
        queued = asyncio.ensure_future(pool.acquire(timeout=0.5))
        await asyncio.sleep(0.01)
        with pytest.raises(PoolExhausted) as refused:
            await pool.acquire()
        assert refused.value.retry_after_s is not None
        assert refused.value.retry_after_s > 0
        await pool.release(held)
        await pool.release(await queued)


async def test_adaptive_limit_settles_below_the_pool_size_on_a_cpu_bound_query(
    pg: EmbeddedPostgres,
) -> None:
    """On this 2-core machine a CPU-bound query's latency grows with concurrency beyond
    ~2: the adaptive limit comes down from the pool's 10 and stays below it, and the
    stats and events show it."""
    changes: list[ev.LimitChanged] = []
    config = {"min_size": 10, "pool_size": 10, "acquire_timeout": 10.0,
                  "limiter": LimiterConfig(initial=10)}
    async with open_pool(pg, **config) as pool:
        pool.events.subscribe(
            lambda e: changes.append(e) if isinstance(e, ev.LimitChanged) else None)
        stop = time.monotonic() + 4.0
        limits: list[int] = []

        async def caller() -> None:
            while time.monotonic() < stop:
                async with pool.connection() as conn:
                    await conn.fetchval("SELECT sum(i) FROM generate_series(1, 200000) i")
                limits.append(pool.stats().concurrency_limit)

        await asyncio.gather(*(caller() for _ in range(20)))
    assert changes, "the limit never moved"
    late = sorted(limits[len(limits) // 2:])
    assert late[len(late) // 2] < 10  # the median limit in the second half is below the size
