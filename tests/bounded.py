"""Bounded waits for the tests: a stop or a wait that hangs fails its test within a bound,
with a message naming what did not finish, instead of stalling the suite.

    await stopped(core.stop(grace=0))               # "Core.stop() did not finish within 20 s"
    await bounded(engine.closed.get(), "the engine's close")
    await until(lambda: not root.exists(), "the directory's removal")   # no event to await

The bound is an asyncio timeout, so it fires in the waiting coroutine: pytest-timeout's
alarm lands wherever the main thread is, and inside grpc.aio's callbacks it can be
swallowed, leaving the xdist worker hung with every later result. Both bounds stay under
pytest's own (60 s, pyproject.toml) so that this message, not pytest's, is what one reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds a server's (or a client's, a process's) stop may take.
STOP_BOUND = 20.0
#: Seconds any other wait of a test may take: for a reply, an event, a task, a queue item.
WAIT_BOUND = 30.0


def _named(awaitable: Awaitable[object]) -> str:
    """What `awaitable` is, for a failure message: `Core.stop()`, `Event.wait()`, a task's
    coroutine."""
    if isinstance(awaitable, asyncio.Task):
        awaitable = awaitable.get_coro()  # type: ignore[assignment]
    name = getattr(awaitable, "__qualname__", None)
    return f"{name}()" if name else repr(awaitable)


async def bounded(wait: Awaitable[T], what: str | None = None, *, within: float = WAIT_BOUND) -> T:
    """What `wait` returns; the test fails saying `what` (by default the coroutine's name)
    did not finish when it takes more than `within` seconds. A TimeoutError that `wait`
    raises itself passes through unchanged."""
    bound = asyncio.timeout(within)
    try:
        async with bound:
            return await wait
    except TimeoutError:
        if not bound.expired():
            raise
        raise AssertionError(f"{what or _named(wait)} did not finish within {within:g} s") from None


async def stopped(stop: Awaitable[T], what: str | None = None, *, within: float = STOP_BOUND) -> T:
    """`bounded` for a stop: `await stopped(gateway.stop())`."""
    return await bounded(stop, what, within=within)


async def until(
    condition: Callable[[], bool], what: str, *, within: float = WAIT_BOUND, every: float = 0.01
) -> None:
    """Poll `condition` every `every` seconds until it holds, for a state with no event to
    wait on (another process's, a file's); `bounded` by `within`, failing with `what`."""

    async def holds() -> None:
        while True:
            if condition():
                return
            await asyncio.sleep(every)

    await bounded(holds(), what, within=within)
