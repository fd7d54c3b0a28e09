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


def finish(coroutine: Coroutine[Any, Any, object], waiting: object) -> Coroutine[Any, Any, object]:
    """The rest of `coroutine`, stepped by hand up to a wait (`waiting`: what it yielded
    there), as a coroutine for a task to run: each wait, its outcome and a cancellation
    passed through to it, even a cancellation that comes before the task first runs."""
    return _Rest(coroutine, waiting)


class _Rest(Coroutine[Any, Any, object]):
    # Not an `async def`: a task cancelled before its first step throws into its coroutine
    # before that has begun, which ends it there; `coroutine`, suspended at its wait, would
    # never see the cancellation (nor clean up: a queued frame, a reply's `then`).
    def __init__(self, coroutine: Coroutine[Any, Any, object], waiting: object) -> None:
        self._coroutine = coroutine
        self._waiting: object = waiting
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:  # first the wait the coroutine stopped at
            self._started = True
            return self._waiting
        return self._coroutine.send(value)

    def throw(self, *error: Any) -> Any:
        self._started = True
        return self._coroutine.throw(*error)

    def close(self) -> None:
        self._coroutine.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> _Rest:
        return self

    def __await__(self) -> Generator[Any, None, object]:
        return (yield from self)
