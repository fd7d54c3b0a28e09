"""The queue of frames towards one WebSocket client, bounded in frames and in bytes.

A text frame counts its length (the gateway's JSON is ASCII, so that is its size in
bytes), a binary frame its bytes. While the queue is full a producer waits; it gives up
when the client has taken nothing at all for a given time (a stall), so a client that
reads slowly is waited for and one that does not read is not. A frame larger than the
whole byte budget still goes through: it is let in when the queue is empty.
"""

from __future__ import annotations

import asyncio
import collections

from car_grpc.wire import batch

Frame = str | bytes


class OutboundQueue:
    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: collections.deque[Frame] = collections.deque()
        #: Bytes queued now, and the most ever queued (what a test or a metric reads).
        self.nbytes = 0
        self.peak_bytes = 0
        self._unfinished = 0
        self._finished = asyncio.Event()
        self._finished.set()
        self._getters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._putters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._frames)

    def empty(self) -> bool:
        return not self._frames

    def full(self) -> bool:
        """No room left for any frame (of at least one byte)."""
        return len(self._frames) >= self.max_frames or self.nbytes >= self.max_bytes

    def _fits(self, frame: Frame) -> bool:
        if not self._frames:
            return True  # alone, any frame fits (one larger than the budget included)
        return len(self._frames) < self.max_frames and self.nbytes + len(frame) <= self.max_bytes

    def put_nowait(self, frame: Frame) -> None:
        """Queue `frame`; asyncio.QueueFull when it does not fit."""
        if not self._fits(frame):
            raise asyncio.QueueFull
        self._frames.append(frame)
        self.nbytes += len(frame)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self._unfinished += 1
        self._finished.clear()
        _wake(self._getters)

    async def put(self, frame: Frame, stall: float) -> bool:
        """Queue `frame`, waiting for room while the client takes frames. False when it
        took none for `stall` seconds (nothing was queued then)."""
        while not self._fits(frame):
            # (Only when it waits: get_running_loop() is a system call, getpid.)
            taken = asyncio.get_running_loop().create_future()
            self._putters.append(taken)
            try:
                async with asyncio.timeout(stall):
                    await taken
            except TimeoutError:
                return False
            finally:
                taken.cancel()  # harmless once done; drops a waiter that timed out
        self.put_nowait(frame)
        return True

    async def get(self) -> Frame:
        """The next frame, waiting for one (the writer's idle wait: it ends with the
        connection, which cancels it)."""
        loop = asyncio.get_running_loop()
        while not self._frames:
            queued = loop.create_future()
            self._getters.append(queued)
            try:
                await queued
            finally:
                queued.cancel()
        frame = self._frames.popleft()
        self.nbytes -= len(frame)
        _wake(self._putters)
        return frame

    def take_ready(self, max_frames: int, max_bytes: int) -> list[Frame]:
        """The frames queued now, oldest first, without waiting: at most `max_frames`, and
        within `max_bytes` unless the first alone is larger (for a batched write)."""
        taken, size = batch.take(self._frames, max_frames, max_bytes)
        if taken:
            self.nbytes -= size
            _wake(self._putters)
        return taken

    def task_done(self) -> None:
        """The frame last taken is sent (or will never be)."""
        self._unfinished -= 1
        if self._unfinished == 0:
            self._finished.set()

    async def join(self) -> None:
        """Wait until every queued frame is sent (callers bound the wait)."""
        await self._finished.wait()


def _wake(waiters: collections.deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
