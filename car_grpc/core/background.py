"""Work the core starts and does not wait for, with one error policy.

A domain that must finish something although the request that started it may go away
(a commit under a run's lock, a notice to a speech engine, a goal's status) hands it to
its `Background`. Every task is kept until it ends (asyncio holds only weak references to
tasks) and `drain` waits for what is left at shutdown. A failure is logged once: a
CarError that a client caused at debug level (the client hears of it in its answer), a
store that could not be reached as one warning line (no fault of this code), any other
exception with its traceback (a fault of the server).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from car_grpc.store import StoreUnavailable
from car_grpc.wire.errors import CarError

T = TypeVar("T")


class Background:
    """The background tasks of one domain; `log` names the domain in failures."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def to_the_end(
        self, work: Coroutine[Any, Any, T], gave_up: Callable[[T], None] | None = None
    ) -> T:
        """Run `work` to completion even if the caller is cancelled. The caller is
        answered by the work's last step (one wakeup, where asyncio.shield of the task
        takes two: a write's answer waits on this). `gave_up`: given the work's result
        when the caller was cancelled before taking it."""
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.spawn(_answering(work, answer, gave_up))
        try:
            return await answer
        except asyncio.CancelledError:
            # Cancelled after the answer came but before this resumed: the result is lost.
            done = answer.done() and not answer.cancelled()
            if gave_up is not None and done and answer.exception() is None:
                gave_up(answer.result())
            raise

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, CarError) and error.client_error:
            self._log.debug("refused: %s", error.message)
        elif isinstance(error, StoreUnavailable):
            self._log.warning("background work failed: %s", error)
        else:
            self._log.error("background work failed", exc_info=error)

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the tasks still running, at shutdown."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


async def _answering(
    work: Coroutine[Any, Any, T],
    answer: asyncio.Future[T],
    gave_up: Callable[[T], None] | None = None,
) -> T:
    """`work`, its outcome also given to `answer` (unless its caller gave up on it: then
    its result to `gave_up`)."""
    try:
        result = await work
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except BaseException as e:
        if not answer.done():
            answer.set_exception(e)
        raise
    if not answer.done():
        answer.set_result(result)
    elif gave_up is not None:
        gave_up(result)
    return result
