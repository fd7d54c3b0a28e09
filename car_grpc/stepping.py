"""Coroutines run by hand where the caller is, rather than in a task of their own.

A task's first step waits for the event loop's next turn (Python 3.11 has no eager
tasks), and on the paths of a single request in flight each such turn is time the
request waits. These run a coroutine's first step at once, in the caller:

- `try_lock`: an asyncio.Lock taken when that needs no wait;
- `start`: a coroutine run to its end by the callbacks of what it waits for (no task,
  no awaiting caller: nothing can cancel it halfway, e.g. a gRPC write);
- `finish`: the rest of a coroutine stepped by hand up to a wait, in the task that
  awaits it, as if that task had run it from the start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any


def try_lock(lock: asyncio.Lock) -> bool:
    """Acquire `lock` when that needs no wait (asyncio.Lock has no acquire_nowait)."""
    acquire = lock.acquire()
    try:
        acquire.send(None)
    except StopIteration:
        return True
    acquire.close()  # it would have waited: its waiters are left as they were
    return False


def start(coroutine: Coroutine[Any, Any, object], then: Callable[[], None]) -> None:
    """Run `coroutine` now up to its first wait, and on from each wait when what it waits
    for is done; `then()` once it has ended, however (its outcome is dropped)."""

    def step(_: object = None) -> None:
        try:
            waiting = coroutine.send(None)
        except BaseException:  # ended (returned, or raised: the caller's later use says)
            then()
            return
        if waiting is None:  # a bare yield: on at the event loop's next turn
            asyncio.get_running_loop().call_soon(step)
        else:
            waiting.add_done_callback(step)

    step()


async def finish(coroutine: Coroutine[Any, Any, object], waiting: object) -> object:
    """The rest of `coroutine`, stepped by hand up to a wait (`waiting`: what it yielded
    there): each wait, its outcome and a cancellation passed through to it."""
    return await _Rest(coroutine, waiting)


class _Rest:
    def __init__(self, coroutine: Coroutine[Any, Any, object], waiting: object) -> None:
        self._coroutine, self._waiting = coroutine, waiting

    def __await__(self) -> Generator[Any, None, object]:
        coroutine, waiting = self._coroutine, self._waiting
        while True:
            try:
                yield waiting
            except BaseException as error:
                try:
                    waiting = coroutine.throw(error)
                except StopIteration as done:
                    return done.value
                continue
            try:
                waiting = coroutine.send(None)
            except StopIteration as done:
                return done.value
