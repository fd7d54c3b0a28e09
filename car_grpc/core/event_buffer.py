"""A bounded, ordered buffer between one producer and one reader: an agent's chat events
on their way to the host (chats.py), a client's audio on its way to a speech engine
(voice.py).

The buffer is bounded in items and in bytes (each item's size is given by its producer,
e.g. the length of its serialized frame); it is full when either bound would be passed,
except that an empty buffer always takes one item, so a large one is never stuck.

Chat tokens must neither be lost nor reordered, so a full buffer does not drop: the
producer (the agent's notification handler) waits, and waiting producers are admitted
strictly in arrival order. Waiting is what slows a fast agent down: each waiting handler
holds one of the agent stream's in-flight slots, so once they are all taken the core stops
reading that agent's stream and gRPC flow control pushes back on the agent itself.

Waiting is bounded: when the host takes nothing for `stall_timeout` seconds while
producers wait, `put` answers STALLED and the owner ends the chat. That bound is also the
longest one stalled host can hold up the other chats of the same agent. One timer per
buffer keeps that clock (not one per waiting producer: a flood keeps many waiting).
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
    """A FIFO of at most `limit` items and `limit_bytes` bytes (but always one item) with
    one reader; producers beyond it wait in order."""

    def __init__(self, limit: int, stall_timeout: float, *, limit_bytes: int) -> None:
        self._limit = max(1, limit)
        self._limit_bytes = limit_bytes
        self._stall_timeout = stall_timeout
        #: (item, its size) in order, and the sum of their sizes.
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._waiting: deque[tuple[asyncio.Future[PutResult], T, int]] = deque()
        self._readable = asyncio.Event()
        self._closed = False
        #: Loop time of the reader's last take, or of the moment producers began to wait.
        self._progress_at = 0.0
        #: Armed while producers wait, for the moment they would have waited too long.
        self._stall_timer: asyncio.TimerHandle | None = None
        #: The event loop, once known: asyncio.get_running_loop() is a system call
        #: (getpid) in CPython 3.11, too dear for every item.
        self._event_loop: asyncio.AbstractEventLoop | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items) + len(self._waiting)

    @property
    def nbytes(self) -> int:
        """The size of the items in the buffer (not of those waiting)."""
        return self._bytes

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self._event_loop
        if loop is None:
            loop = self._event_loop = asyncio.get_running_loop()
        return loop

    def _fits(self, size: int) -> bool:
        items = self._items
        if not items:
            return True
        return len(items) < self._limit and self._bytes + size <= self._limit_bytes

    async def put(self, item: T, size: int) -> PutResult:
        """Append `item` (of `size` bytes) after everything put before it, waiting while
        the buffer is full."""
        offered = self.offer(item, size)
        if isinstance(offered, PutResult):
            return offered
        return await self.admitted(offered)

    def offer(self, item: T, size: int) -> PutResult | asyncio.Future[PutResult]:
        """put's first step, which never waits: the item is appended (QUEUED), refused
        (CLOSED), or takes its place in line, and then the future to pass to `admitted`
        is returned. Either way its order among the items is set here."""
        if self._closed:
            return PutResult.CLOSED
        if not self._waiting and self._fits(size):
            self._items.append((item, size))
            self._bytes += size
            self._readable.set()
            return PutResult.QUEUED
        loop = self._loop()
        if not self._waiting:
            self._progress_at = loop.time()  # the stall clock starts now
        admitted: asyncio.Future[PutResult] = loop.create_future()
        self._waiting.append((admitted, item, size))
        if self._stall_timer is None:
            self._check_stall()
        return admitted

    async def admitted(self, admitted: asyncio.Future[PutResult]) -> PutResult:
        """put's second step: wait until the item offered is let in (QUEUED), dropped by
        close (CLOSED), or the reader stalls (STALLED)."""
        return await admitted

    def _check_stall(self) -> None:
        """The stall clock: while producers wait, answer them all STALLED once the reader
        has taken nothing for stall_timeout (they stay in line: the caller closes the
        buffer); until then, look again when that time would be up."""
        self._stall_timer = None
        if not self._waiting or self._closed:
            return
        loop = self._loop()
        deadline = self._progress_at + self._stall_timeout
        if loop.time() < deadline:
            self._stall_timer = loop.call_at(deadline, self._check_stall)
            return
        for admitted, _, _ in self._waiting:
            if not admitted.done():
                admitted.set_result(PutResult.STALLED)

    async def get(self) -> T | None:
        """The next item, waiting for one; None once the buffer is closed and drained."""
        while not self._items:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        return self._take(self._loop().time())

    def get_nowait(self) -> T | None:
        """The next item if the buffer holds one, without waiting; None otherwise (see
        `closed` for whether more may come)."""
        if not self._items:
            return None
        return self._take(self._loop().time())

    async def get_many(self, limit: int) -> list[T]:
        """The next items: at least one (waiting for it), at most `limit`, all that the
        buffer holds (not the producers it admits meanwhile); [] once the buffer is
        closed and drained."""
        while not self._items:
            if self._closed:
                return []
            self._readable.clear()
            await self._readable.wait()
        now = self._loop().time()
        return [self._take(now) for _ in range(min(limit, len(self._items)))]

    def _take(self, now: float) -> T:
        item, size = self._items.popleft()
        self._bytes -= size
        self._progress_at = now
        # The room made may let in several small waiting items, or not yet a large one.
        waiting = self._waiting
        while waiting and self._fits(waiting[0][2]):
            admitted, next_item, next_size = waiting.popleft()
            self._items.append((next_item, next_size))
            self._bytes += next_size
            if not admitted.done():  # (stalled, or its producer went away)
                admitted.set_result(PutResult.QUEUED)
        return item

    def close(self, final: T | None = None, *, drop_waiting: bool = False) -> None:
        """Accept nothing more. Waiting items are admitted (or dropped, with `drop_waiting`),
        then `final` is appended past the limits; the reader drains what is left."""
        if self._closed:
            return
        self._closed = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        while self._waiting:
            admitted, waiting, size = self._waiting.popleft()
            if not drop_waiting:
                self._items.append((waiting, size))
                self._bytes += size
            if not admitted.done():
                admitted.set_result(PutResult.CLOSED if drop_waiting else PutResult.QUEUED)
        if final is not None:
            self._items.append((final, 0))
        self._readable.set()

    def discard(self) -> None:
        """Close and forget everything (nobody will read)."""
        self.close(drop_waiting=True)
        self._items.clear()
        self._bytes = 0
