"""The queue of frames towards one client (ClientSession.outbound), bounded in frames and
in bytes.

Frames are queued serialized (the stream's serializer passes bytes through), so their size
costs nothing extra: the serialization the write would do happens once, at the queue. A
frame fits while the queue holds fewer than `max_frames` frames and its bytes stay within
`max_bytes`; a single frame larger than `max_bytes` is let in when the queue is empty.
`put` waits, in order, until its frame fits (nothing overtakes a waiting frame);
`put_nowait` refuses at once (QueueFull). `close` ends every wait with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence

from car_grpc.wire import batch


class OutboundQueue:
    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: Bytes queued now.
        self.bytes = 0
        self._items: deque[bytes] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        #: Frames waiting to be let in, in order, with the future of their sender.
        self._putters: deque[tuple[bytes, asyncio.Future[None]]] = deque()
        self._unfinished = 0
        self._finished = asyncio.Event()
        self._finished.set()
        #: Set by close(): makes the error a sender gets from then on.
        self._closed: Callable[[], BaseException] | None = None
        #: Called as each frame is queued, when the stream takes the frames itself rather
        #: than a writer task `get`ting them (a multiplexed session: core/multiplex.py).
        self.on_put: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Senders waiting for their frame to fit."""
        return len(self._putters)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        """True when no frame can be let in now without waiting, whatever its size."""
        return (
            self._closed is not None
            or bool(self._putters)
            or len(self._items) >= self.max_frames
            or (bool(self._items) and self.bytes >= self.max_bytes)
        )

    def _fits(self, size: int) -> bool:
        items = self._items
        return not items or (len(items) < self.max_frames and self.bytes + size <= self.max_bytes)

    def put_nowait(self, data: bytes) -> None:
        if self._closed is not None or self._putters or not self._fits(len(data)):
            raise asyncio.QueueFull
        self._append(data)

    def put_many_nowait(self, frames: Sequence[bytes]) -> int:
        """put_nowait of each frame in order, until one does not fit: how many were
        queued (the rest were not). The stream is told once (on_put)."""
        if self._closed is not None or self._putters:
            return 0
        queued = 0
        for data in frames:
            if not self._fits(len(data)):
                break
            self._items.append(data)
            self.bytes += len(data)
            queued += 1
        if queued:
            self._unfinished += queued
            self._finished.clear()
            if self.on_put is not None:
                self.on_put()
            else:
                for _ in range(queued):
                    self._wake_getter()
        return queued

    async def put(self, data: bytes) -> None:
        """Queue `data`, waiting while it does not fit. Ends with the close error when the
        queue closes first (the frame then is not queued)."""
        if self._closed is not None:
            raise self._closed()
        if not self._putters and self._fits(len(data)):
            self._append(data)
            return
        entry = (data, asyncio.get_running_loop().create_future())
        self._putters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if not entry[1].done() or entry[1].cancelled():
                # Given up before it was let in: the frame is not queued, and those behind
                # it may fit now.
                with contextlib.suppress(ValueError):
                    self._putters.remove(entry)
                self._admit()
            raise

    async def get(self) -> bytes:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_getter()  # it was woken for a frame it will not take
                raise
        data = self._items.popleft()
        self.bytes -= len(data)
        self._admit()
        return data

    def take_ready(self, max_frames: int, max_bytes: int, held: int = 0) -> list[bytes]:
        """The frames queued now, oldest first, without waiting, for a batched write that
        holds `held` bytes already: at most `max_frames`, within `max_bytes` (batch.take)."""
        taken, size = batch.take(self._items, max_frames, max_bytes, held)
        if taken:
            self.bytes -= size
            self._admit()
        return taken

    def task_done(self, frames: int = 1) -> None:
        self._unfinished -= frames
        if self._unfinished <= 0:
            self._finished.set()

    async def join(self) -> None:
        """Until every frame queued so far has been taken and marked done."""
        await self._finished.wait()

    def close(self, error: Callable[[], BaseException]) -> None:
        """Refuse frames from now on: every sender, waiting or not, gets `error()` (its
        frame is dropped)."""
        self._closed = error
        while self._putters:
            _, future = self._putters.popleft()
            if not future.done():
                future.set_exception(error())

    def _append(self, data: bytes) -> None:
        self._items.append(data)
        self.bytes += len(data)
        self._unfinished += 1
        self._finished.clear()
        if self.on_put is not None:
            self.on_put()
        else:
            self._wake_getter()

    def _wake_getter(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def _admit(self) -> None:
        """Let in waiting frames, in order, while the next one fits."""
        putters = self._putters
        while putters and self._fits(len(putters[0][0])):
            data, future = putters.popleft()
            if future.done():  # its sender gave up
                continue
            self._append(data)
            future.set_result(None)
