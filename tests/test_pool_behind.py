"""The task-less driver behind ``roll_back_behind`` (no server): any coroutine it runs ends as
it would in a task — same result or error, after the same awaits — with ``done`` called
exactly once, in a context of its own. (The rollback itself: ``test_sqlalchemy_release``.)"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from poolwarden.pool._behind import _Steps
from poolwarden.pool._driver import StatementSection

_caller = contextvars.ContextVar("caller", default="unset")

# one awaited step: a future resolved later with a value, one failed later, a bare yield
_STEP = st.sampled_from(["future", "failed-future", "yield"])


class _Boom(Exception):
    pass


async def _script(steps: list[str], raise_at_end: bool, log: list[str]) -> str:
    loop = asyncio.get_running_loop()
    for i, step in enumerate(steps):
        if step == "yield":
            await asyncio.sleep(0)
        else:
            future = loop.create_future()
            if step == "future":
                loop.call_soon(future.set_result, i)
                log.append(f"got {await future}")
            else:
                loop.call_soon(future.set_exception, _Boom(i))
                try:
                    await future
                except _Boom as exc:
                    log.append(f"caught {exc}")
    if raise_at_end:
        raise _Boom("end")
    return f"done after {len(steps)}"


def _outcome(done: list[BaseException | None], log: list[str]) -> tuple[Any, ...]:
    assert len(done) == 1
    error = done[0]
    return (type(error).__name__ if error else None, str(error) if error else None, log)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(_STEP, max_size=6), raise_at_end=st.booleans())
def test_steps_end_as_a_task_would(steps: list[str], raise_at_end: bool) -> None:
    async def main() -> None:
        task_log: list[str] = []
        task = asyncio.ensure_future(_script(steps, raise_at_end, task_log))
        await asyncio.wait([task])
        task_error = task.exception()

        log: list[str] = []
        done: list[BaseException | None] = []
        finished = asyncio.Event()

        def on_done(error: BaseException | None) -> None:
            done.append(error)
            finished.set()

        driven = _Steps(_script(steps, raise_at_end, log), None, on_done)
        driven.context.run(driven.advance)
        await asyncio.wait_for(finished.wait(), 5)
        await asyncio.sleep(0)  # nothing more may arrive
        expected = (type(task_error).__name__ if task_error else None,
                    str(task_error) if task_error else None, task_log)
        assert _outcome(done, log) == expected

    asyncio.run(main())


async def test_the_first_step_runs_before_the_call_returns() -> None:
    """What the coroutine does before its first await (asyncpg: writing ROLLBACK) is done
    inline; the rest only after what it waits on is resolved."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    marks: list[str] = []
    done: list[BaseException | None] = []

    async def coro() -> None:
        marks.append("sent")
        await future
        marks.append("answered")

    driven = _Steps(coro(), None, done.append)
    driven.context.run(driven.advance)
    assert marks == ["sent"]
    assert done == []
    future.set_result(None)
    await asyncio.sleep(0)
    assert marks == ["sent", "answered"]
    assert done == [None]


async def test_steps_run_in_a_context_of_their_own() -> None:
    """The caller's context variables (its deadline, for one) are not seen by the steps,
    and what the steps set does not reach the caller."""
    seen: list[str] = []
    done: list[BaseException | None] = []

    async def coro() -> None:
        seen.append(_caller.get())
        await asyncio.sleep(0)
        seen.append(_caller.get())
        _caller.set("set by the steps")

    _caller.set("the caller's")
    driven = _Steps(coro(), None, done.append)
    driven.context.run(driven.advance)
    for _ in range(3):
        await asyncio.sleep(0)
    assert done == [None]
    assert seen == ["unset", "unset"]
    assert _caller.get() == "the caller's"


async def test_a_watched_statement_is_unwatched_once_it_ends() -> None:
    """The statement watchdog watches the section from before the first step (the caller
    does that) until the coroutine ends — also when it fails."""
    for fails in (False, True):
        section = StatementSection(conn=None)  # type: ignore[arg-type]
        section.watch_outside()
        done: list[BaseException | None] = []

        async def coro(fails: bool = fails) -> None:
            await asyncio.sleep(0)
            if fails:
                raise _Boom("rollback failed")

        driven = _Steps(coro(), section, done.append)
        driven.context.run(driven.advance)
        assert section.outside == 1
        for _ in range(3):
            await asyncio.sleep(0)
        assert section.outside == 0
        assert len(done) == 1
        assert isinstance(done[0], _Boom) == fails
