"""Kept greenlets for SQLAlchemy's sync calls (no server): ``greenlet_call`` behaves as
SQLAlchemy's ``greenlet_spawn`` does — result, exception, awaits inside, context variables,
cancellation — and reuses its greenlets instead of creating one per call."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from greenlet import getcurrent  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.util import await_, greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from poolwarden.sqlalchemy import _greenlets
from poolwarden.sqlalchemy._greenlets import KEPT, greenlet_call

_var: contextvars.ContextVar[str] = contextvars.ContextVar("_var", default="unset")


class Boom(Exception):
    pass


def _steps(plan: list[tuple[str, int]]) -> list[int]:
    """Run a plan of sync steps: "await" hands a value through await_, "raise" raises."""
    seen = []
    for kind, value in plan:
        if kind == "await":
            seen.append(await_(asyncio.sleep(0, value)))
        elif kind == "raise":
            raise Boom(value)
        else:
            seen.append(value)
    return seen


_plans = st.lists(
    st.tuples(st.sampled_from(["await", "raise", "value"]), st.integers(-5, 5)), max_size=6
)


async def _outcome(spawn: Callable[..., Any], plan: list[tuple[str, int]]) -> tuple[str, Any]:
    try:
        return "value", await spawn(_steps, plan)
    except Boom as exc:
        return "raised", exc.args


@settings(max_examples=60, deadline=None)
@given(plans=st.lists(_plans, min_size=1, max_size=4))
def test_every_plan_ends_as_with_greenlet_spawn(plans: list[list[tuple[str, int]]]) -> None:
    """Sequences of calls, each awaiting, returning or raising at any step: the same
    results and exceptions as SQLAlchemy's greenlet_spawn, one kept greenlet for them all."""
    async def main() -> None:
        for plan in plans:
            assert await _outcome(greenlet_call, plan) == await _outcome(greenlet_spawn, plan)

    asyncio.run(main())


async def test_the_call_runs_where_await_is_allowed_and_in_the_tasks_context() -> None:
    def call() -> tuple[bool, str]:
        seen = _var.get()
        _var.set("set in the call")
        return in_greenlet(), seen

    _var.set("the task's")
    assert await greenlet_call(call) == (True, "the task's")
    # as with greenlet_spawn, the call runs in the task's own context
    assert _var.get() == "set in the call"
    assert not in_greenlet()


async def test_a_cancellation_reaches_the_call_at_its_await_and_then_the_caller() -> None:
    seen: list[str] = []

    def call() -> None:
        try:
            await_(asyncio.sleep(30))
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    task = asyncio.create_task(greenlet_call(call))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled inside"]
    assert await greenlet_call(lambda: 5) == 5  # the greenlet is kept and works


async def test_one_greenlet_serves_calls_in_turn_and_one_each_at_once() -> None:
    def which() -> Any:
        await_(asyncio.sleep(0.01))
        return getcurrent()

    in_turn = {id(await greenlet_call(which)) for _ in range(20)}
    assert len(in_turn) == 1
    at_once = await asyncio.gather(*(greenlet_call(which) for _ in range(8)))
    assert len({id(g) for g in at_once}) == 8
    again = await asyncio.gather(*(greenlet_call(which) for _ in range(8)))
    assert {id(g) for g in again} == {id(g) for g in at_once}  # reused, none created


async def test_at_most_kept_greenlets_wait_between_calls() -> None:
    release = asyncio.Event()

    def wait() -> None:
        await_(release.wait())

    calls = [asyncio.create_task(greenlet_call(wait)) for _ in range(KEPT + 10)]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(*calls)
    assert len(_greenlets._kept.idle) == KEPT


async def test_an_idle_greenlet_holds_nothing_of_its_last_call() -> None:
    class Payload:
        pass

    def call(arg: Payload) -> Payload:
        await_(asyncio.sleep(0))
        return arg

    payload = Payload()
    ref = weakref.ref(payload)
    result = await greenlet_call(call, payload)
    del payload, result
    gc.collect()
    assert ref() is None

    def fail(arg: Payload) -> None:
        raise Boom(arg)

    payload = Payload()
    ref = weakref.ref(payload)
    with pytest.raises(Boom):
        await greenlet_call(fail, payload)
    del payload
    gc.collect()
    assert ref() is None
