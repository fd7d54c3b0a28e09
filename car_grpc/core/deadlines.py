"""The requests' deadline: one timer for every running request.

Every request that may wait runs under the same limit (`handler_timeout`), so the
requests' deadlines fall in the order they started: they are kept in that order (a dict),
and one timer, set for the oldest, cancels whatever is past its deadline when it fires.
A request costs a dict entry instead of an `asyncio.timeout` of its own (a Timeout, a
timer handle pushed onto the event loop's heap and cancelled again: ~4% of the core's CPU
under bench_load). Expiry is told from any other cancellation as `asyncio.timeout` tells
it: the request's task is cancelled, and the deadline counts only when no other
cancellation came since it started (`Task.uncancel`).
"""

from __future__ import annotations

import asyncio


class Deadline:
    """One request's deadline (`Deadlines.start`)."""

    __slots__ = ("cancelling", "ended", "expired", "task", "timed_out", "when")

    def __init__(self, task: asyncio.Task[object], when: float) -> None:
        self.task = task
        self.when = when
        self.cancelling = task.cancelling()  # cancellations asked for before it began
        #: Whether the deadline passed (the task was cancelled for it).
        self.expired = False
        self.ended = False
        self.timed_out = False


class Deadlines:
    """The deadlines of the running requests, all `limit` seconds after their start."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._running: dict[Deadline, None] = {}  # in the order they expire
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> Deadline:
        """The current task's request starts: it is cancelled `limit` seconds from now
        unless `end` comes first."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        deadline = Deadline(task, loop.time() + self.limit)
        self._running[deadline] = None
        if self._timer is None:
            self._timer = loop.call_at(deadline.when, self._expire)
        return deadline

    def end(self, deadline: Deadline) -> bool:
        """The request is over (called once or more; the first call counts): whether the
        deadline is what cancelled it (it expired, and nothing else cancelled the task
        since the request started). Past its deadline, the task's cancellation is taken
        back here, as `asyncio.timeout` does."""
        if not deadline.ended:
            deadline.ended = True
            if deadline.expired:
                deadline.timed_out = deadline.task.uncancel() <= deadline.cancelling
            else:
                del self._running[deadline]
        return deadline.timed_out

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        running = self._running
        while running:
            deadline = next(iter(running))
            if deadline.when > now:
                self._timer = loop.call_at(deadline.when, self._expire)
                return
            del running[deadline]
            deadline.expired = True
            deadline.task.cancel()
