"""Calls that take effect in the order they are made, per key.

The store promises no order between concurrent calls, so callers that need one (a goal's
status must not be overtaken by an older write of it) queue their calls here. Calls on one
key run one after another; calls on different keys run side by side, so that one chat's
goal read never waits behind every other chat's store round trips (with one queue for all,
100 chats on a loaded core took 5 s each to open: bench_load). A call on every key
(key None: list, clear all) waits for all calls made before it, and all made after wait
for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class KeyedOrder:
    def __init__(self) -> None:
        #: key -> its last call not finished yet (a key leaves with its last call).
        self._tails: dict[str, asyncio.Task[Any]] = {}
        #: The last call on every key, while it has not finished.
        self._barrier: asyncio.Task[Any] | None = None

    def run(self, key: str | None, call: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """Start `call()` once the calls it must follow have finished (however they
        ended); the task gives its result. Tasks take their first step in creation
        order, so even calls made from synchronous code keep their order."""
        if key is None:
            before = list(self._tails.values())
        else:
            tail = self._tails.get(key)
            before = [tail] if tail is not None else []
        if self._barrier is not None:
            before.append(self._barrier)

        async def ordered() -> T:
            if before:
                await asyncio.wait(before)
            return await call()

        task = asyncio.create_task(ordered())
        if key is None:
            self._tails.clear()  # every later call waits for this one, which waits for them
            self._barrier = task
        else:
            self._tails[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))
        return task

    def _forget(self, key: str | None, task: asyncio.Task[Any]) -> None:
        if key is None:
            if self._barrier is task:
                self._barrier = None
        elif self._tails.get(key) is task:
            del self._tails[key]
