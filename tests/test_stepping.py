"""car_grpc/stepping.py: a coroutine stepped by hand up to a wait and finished by a task
(`finish`) behaves as if that task had run it from the start: each wait (a future, a bare
yield) is waited for, its outcome reaches the coroutine, and so does a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from car_grpc import stepping


async def test_the_rest_runs_in_the_task_with_each_wait_and_outcome() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[None] = loop.create_future()
    steps: list[str] = []

    async def work() -> int:
        steps.append("started")
        a = await first
        await asyncio.sleep(0)  # a bare yield
        try:
            await second
        except ValueError as e:
            steps.append(f"raised {e}")
        return a + 1

    coroutine = work()
    waiting = coroutine.send(None)  # by hand, up to its first wait
    assert waiting is first and steps == ["started"]
    task = asyncio.ensure_future(stepping.finish(coroutine, waiting))
    await asyncio.sleep(0)
    assert not task.done()
    first.set_result(41)
    second.set_exception(ValueError("no"))
    assert await asyncio.wait_for(task, 10) == 42
    assert steps == ["started", "raised no"]


@pytest.mark.parametrize("before_it_runs", [False, True])
async def test_a_cancellation_of_the_task_reaches_the_coroutine(before_it_runs: bool) -> None:
    # Also one that comes before the task's first step (a session ending as its inline
    # request began to wait): the coroutine, suspended at its wait, must see it (to clean
    # up: a queued frame taken back, a reply's `then` run), not be dropped unfinished.
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def work() -> None:
        try:
            await never
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    coroutine = work()
    task = asyncio.ensure_future(stepping.finish(coroutine, coroutine.send(None)))
    if not before_it_runs:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert seen == ["cancelled"]


async def test_start_runs_to_the_end_by_callbacks_then_says_so() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    ended = asyncio.Event()
    steps: list[str] = []

    async def work() -> None:
        steps.append("started")
        await gate
        await asyncio.sleep(0)
        steps.append("done")

    stepping.start(work(), ended.set)
    assert steps == ["started"]  # its first step ran in the caller
    gate.set_result(None)
    await asyncio.wait_for(ended.wait(), 10)
    assert steps == ["started", "done"]


async def test_try_lock_takes_a_free_lock_and_leaves_no_waiter_on_a_held_one() -> None:
    lock = asyncio.Lock()
    assert stepping.try_lock(lock) and lock.locked()
    assert not stepping.try_lock(lock)
    lock.release()
    # A waiter left behind by the refused attempt would be woken by that release and hold
    # the lock's next acquirer back.
    assert stepping.try_lock(lock) and lock.locked()
