"""car_grpc.core.background: one error policy for work nobody waits for."""

from __future__ import annotations

import asyncio
import logging

import pytest

from car_grpc.core.background import Background
from car_grpc.wire.errors import INVALID_PARAMS, CarError

log = logging.getLogger("test.background")


async def test_a_client_error_is_logged_at_debug_and_a_fault_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    background = Background(log)

    async def refused() -> None:
        raise CarError(INVALID_PARAMS, "invalid params: unknown run 'x': run_id")

    async def broken() -> None:
        raise RuntimeError("disk on fire")

    tasks = [background.spawn(refused()), background.spawn(broken())]
    await asyncio.wait(tasks)
    await asyncio.sleep(0)  # done callbacks
    levels = {(r.levelname, r.exc_info is not None) for r in caplog.records}
    assert levels == {("DEBUG", False), ("ERROR", True)}
    assert len(background) == 0


async def test_work_run_to_the_end_outlives_its_cancelled_caller() -> None:
    background = Background(log)
    gate = asyncio.Event()
    finished = asyncio.Event()

    async def commit() -> str:
        await gate.wait()
        finished.set()
        return "committed"

    caller = asyncio.create_task(background.to_the_end(commit()))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    gate.set()
    await asyncio.wait_for(finished.wait(), 1)
    await background.drain(1)
    assert len(background) == 0


async def test_the_result_of_work_whose_caller_gave_up_goes_to_gave_up() -> None:
    """A record_turns whose caller gave up (its deadline, its stream's end) still sends
    the events it held for after its answer: the result goes to `gave_up`, whether the
    caller was cancelled before the work ended or after, before it took the result."""
    background = Background(log)
    given: list[str] = []
    for cancel_after_the_result in (False, True):
        gate = asyncio.Event()

        caller = asyncio.create_task(background.to_the_end(_after(gate), gave_up=given.append))
        await asyncio.sleep(0)
        if cancel_after_the_result:
            gate.set()  # the work's step runs next, then the cancel: the caller not resumed
            asyncio.get_running_loop().call_soon(caller.cancel)
        else:
            caller.cancel()
            gate.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await background.drain(1)
    assert given == ["committed", "committed"]
    # A caller that takes the result: nothing given up.
    assert await background.to_the_end(_done(), gave_up=given.append) == "done"
    assert given == ["committed", "committed"]


async def _after(gate: asyncio.Event) -> str:
    await gate.wait()
    return "committed"


async def _done() -> str:
    return "done"
