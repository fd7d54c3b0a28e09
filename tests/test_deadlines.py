"""Deadlines: one timer for every request; each expires at its own deadline, in order;
expiry is told from another cancellation as asyncio.timeout tells it."""

from __future__ import annotations

import asyncio

from car_grpc.core.deadlines import Deadlines

LIMIT = 0.05


async def _request(deadlines: Deadlines, done: asyncio.Event, log: list[str], name: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = deadlines.start()
    try:
        await done.wait()
        log.append(f"{name} finished")
    except asyncio.CancelledError:
        timed_out = deadlines.end(deadline)
        if timed_out:  # not one moment before its own deadline
            assert loop.time() - started >= LIMIT, f"{name} expired early"
        log.append(f"{name} timed out" if timed_out else f"{name} cancelled")
        raise
    finally:
        deadlines.end(deadline)


async def test_each_request_expires_at_its_own_deadline_and_only_then() -> None:
    deadlines = Deadlines(LIMIT)
    log: list[str] = []
    early, never = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(_request(deadlines, early, log, "first"))
    second = asyncio.create_task(_request(deadlines, never, log, "second"))
    await asyncio.sleep(0)
    early.set()  # the first ends before its deadline: the timer set for it finds it gone
    await first
    await asyncio.sleep(LIMIT / 2)
    third = asyncio.create_task(_request(deadlines, never, log, "third"))
    results = await asyncio.gather(second, third, return_exceptions=True)
    assert log == ["first finished", "second timed out", "third timed out"]
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert not first.cancelled()


async def test_another_cancellation_is_not_the_deadlines() -> None:
    deadlines = Deadlines(LIMIT)
    log: list[str] = []
    never = asyncio.Event()
    task = asyncio.create_task(_request(deadlines, never, log, "before"))
    await asyncio.sleep(0)
    task.cancel()  # before the deadline: a cancellation of its own, and no later one
    await asyncio.gather(task, return_exceptions=True)
    assert log == ["before cancelled"]

    async def cancelled_twice() -> None:
        deadline = deadlines.start()
        try:
            await asyncio.sleep(LIMIT * 2)
        except asyncio.CancelledError:
            this = asyncio.current_task()
            assert this is not None
            this.cancel()  # another cancellation, beside the deadline's
            log.append("timed out" if deadlines.end(deadline) else "cancelled")
            raise
        finally:
            deadlines.end(deadline)

    results = await asyncio.gather(cancelled_twice(), return_exceptions=True)
    assert log[1:] == ["cancelled"]
    assert isinstance(results[0], asyncio.CancelledError)
