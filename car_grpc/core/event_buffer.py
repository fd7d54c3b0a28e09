"""A bounded, ordered buffer between one producer and one reader: an agent's chat events
on their way to the host (chats.py), a client's audio on its way to a speech engine
(voice.py).

Chat tokens must neither be lost nor reordered, so a full buffer does not drop: the
producer (the agent's notification handler) waits, and waiting producers are admitted
strictly in arrival order. Waiting is what slows a fast agent down: each waiting handler
holds one of the agent stream's in-flight slots, so once they are all taken the core stops
reading that agent's stream and gRPC flow control pushes back on the agent itself.

Waiting is bounded: when the host takes nothing for `stall_timeout` seconds while
producers wait, `put` answers STALLED and the owner ends the chat. That bound is also the
longest one stalled host can hold up the other chats of the same agent.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class PutResult(enum.Enum):
    QUEUED = "queued"
    #: The buffer was closed before the item got in; the item is dropped.
    CLOSED = "closed"
    #: The reader took nothing for `stall_timeout` while this item waited. The item is
    #: still waiting: the caller is expected to close the buffer.
    STALLED = "stalled"


class EventBuffer(Generic[T]):
    """A FIFO of at most `limit` items with one reader; producers beyond it wait in order."""

    def __init__(self, limit: int, stall_timeout: float) -> None:
        self._limit = max(1, limit)
        self._stall_timeout = stall_timeout
        self._items: deque[T] = deque()
        self._waiting: deque[tuple[asyncio.Future[bool], T]] = deque()
        self._readable = asyncio.Event()
        self._closed = False
        #: Loop time of the reader's last take, or of the moment producers began to wait.
        self._progress_at = 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items) + len(self._waiting)

    async def put(self, item: T) -> PutResult:
        """Append `item` after everything put before it, waiting while the buffer is full."""
        offered = self.offer(item)
        if isinstance(offered, PutResult):
            return offered
        return await self.admitted(offered)

    def offer(self, item: T) -> PutResult | asyncio.Future[bool]:
        """put's first step, which never waits: the item is appended (QUEUED), refused
        (CLOSED), or takes its place in line, and then the future to pass to `admitted`
        is returned. Either way its order among the items is set here."""
        if self._closed:
            return PutResult.CLOSED
        if not self._waiting and len(self._items) < self._limit:
            self._items.append(item)
            self._readable.set()
            return PutResult.QUEUED
        loop = asyncio.get_running_loop()
        if not self._waiting:
            self._progress_at = loop.time()  # the stall clock starts now
        admitted: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((admitted, item))
        return admitted

    async def admitted(self, admitted: asyncio.Future[bool]) -> PutResult:
        """put's second step: wait until the item offered is let in (QUEUED), dropped by
        close (CLOSED), or the reader stalls (STALLED)."""
        loop = asyncio.get_running_loop()
        while not admitted.done():
            remaining = self._progress_at + self._stall_timeout - loop.time()
            if remaining <= 0:
                return PutResult.STALLED
            await asyncio.wait((admitted,), timeout=remaining)
        return PutResult.QUEUED if admitted.result() else PutResult.CLOSED

    async def get(self) -> T | None:
        """The next item, waiting for one; None once the buffer is closed and drained."""
        while not self._items:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        return self._take()

    async def get_many(self, limit: int) -> list[T]:
        """The next items: at least one (waiting for it), at most `limit`, all that the
        buffer holds (not the producers it admits meanwhile); [] once the buffer is
        closed and drained."""
        while not self._items:
            if self._closed:
                return []
            self._readable.clear()
            await self._readable.wait()
        return [self._take() for _ in range(min(limit, len(self._items)))]

    def _take(self) -> T:
        item = self._items.popleft()
        self._progress_at = asyncio.get_running_loop().time()
        if self._waiting:
            admitted, waiting = self._waiting.popleft()
            self._items.append(waiting)
            admitted.set_result(True)
        return item

    def close(self, final: T | None = None, *, drop_waiting: bool = False) -> None:
        """Accept nothing more. Waiting items are admitted (or dropped, with `drop_waiting`),
        then `final` is appended past the limit; the reader drains what is left."""
        if self._closed:
            return
        self._closed = True
        while self._waiting:
            admitted, waiting = self._waiting.popleft()
            if not drop_waiting:
                self._items.append(waiting)
            admitted.set_result(not drop_waiting)
        if final is not None:
            self._items.append(final)
        self._readable.set()

    def discard(self) -> None:
        """Close and forget everything (nobody will read)."""
        self.close(drop_waiting=True)
        self._items.clear()
