"""A gateway's connections over a few SessionService.ConnectMultiplexed streams
(wire/multiplex.py), instead of a ConnectBatched stream each.

`Multiplexer()` opens a session the way `channel.stream_stream(ConnectBatched)()` opens a
stream: it returns a `MultiplexedCall` with the same methods (write, read, done_writing,
cancel, initial_metadata), so a Connection does not know which it has. Connections are
spread over the streams round-robin; a stream that fails fails every session on it as
each call would have failed (the connections end: "core unavailable"), and the next
connection opens a new one.

Flow control per session, as each stream's HTTP/2 window gave it: a session writes a
batch only within its credits, and acknowledges a batch from the core when its
connection reads it (which it stops doing while its client's queue is full), so a slow
client holds back only its own session. What a session holds here: its unread batches,
at most the credits' worth. Besides, no batch goes up while the stream has as many bytes
unacknowledged across its sessions as the core allows (its initial metadata says how
many; until it has, nothing goes up).

Per frame the path is kept short: a connection need not write (a task of its own each
time it has something to send); it may `pull` instead, and the stream takes the
connection's next batch itself when it writes its next message, within the credits: all
the frames that came meanwhile in one batch, and no task. An acknowledgement owed to a
session goes in the record of the session's next batch (one record per round trip each
way, not two); on its own only once half a window is owed (wire/multiplex.py).

Down, a connection need not be woken for each batch: while it waits in read() with
nothing unread, the stream's reader hands it the batch (`take_now`), and the connection
writes it to its client there and then when it can do so without waiting; the batch is
acknowledged at once. What it cannot take so (its client behind, a write under way, the
reader's turn over) is read as before, in order, and acknowledged when read.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from car_grpc.v1 import session_pb2
from car_grpc.wire import batch, multiplex
from car_grpc.wire.metadata import AUTH_KEY

_CONNECT_MULTIPLEXED = (
    f"/{session_pb2.DESCRIPTOR.services_by_name['SessionService'].full_name}/ConnectMultiplexed"
)
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
#: Longest the stream's reader works through one message's batches itself (take_now)
#: before it leaves the rest to the sessions' own reads: no session hogs the loop.
TURN = 0.002

#: A batch from the core, as read() returns it: serialized, or what is left of one.
Batch = bytes | session_pb2.ConnectBatchedResponse
#: Takes a batch at once (its bytes, and the time the reader's turn ends): None when it
#: took all of it, else what is left for read() (its bytes when it took nothing).
TakeNow = Callable[[bytes, float], Batch | None]
_NO_METADATA = grpc.aio.Metadata()


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, _NO_METADATA, _NO_METADATA, details)


def _as_sessions_see_it(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """The error of a stream, for its sessions: a refused stream is the gateway's own
    token refused (a session's own credentials never fail the stream), said so."""
    if error.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return error
    return _error(error.code(), f"the core refused the gateway's own token ({error.details()})")


class MultiplexedCall:
    """One session on a shared stream, used as its own ConnectBatched call."""

    def __init__(self, stream: _Stream, key: int) -> None:
        self._stream = stream
        self.key = key
        #: Batches from the core not yet read (at most the session's credits), each with
        #: the size it counts for.
        self._inbound: deque[tuple[Batch, int]] = deque()
        self._inbound_bytes = 0
        #: The connection's taker of batches at once (see the module's doc), and whether
        #: a read() waits with nothing unread, when it may be used.
        self.take_now: TakeNow | None = None
        self._waiting = False
        #: Batches sent up and not yet acknowledged by the core, and their bytes.
        self._unacked = 0
        self._unacked_bytes = 0
        #: What a read() waits for (batches, the end) and what a write() waits for
        #: (credits, the stream's room, the end): apart, so that an acknowledgement does
        #: not wake a read() for nothing.
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._end: grpc.aio.AioRpcError | None = None  # how the session ended (OK: EOF)
        self._ended = False
        self._half_closed = False
        #: Gives the connection's next batch (b"": none), while a pull waits in the stream.
        self._take: Callable[[], bytes] | None = None
        self._end_after_take = False  # done_writing came while a pull waited

    # -------------------------------------------------------------- as Connection uses it

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return await self._stream.initial_metadata()

    def _may_send(self) -> bool:
        """Within the session's credits and the stream's."""
        return multiplex.fits(self._unacked, self._unacked_bytes) and self._stream.has_room()

    async def write(self, data: bytes) -> None:
        while not self._may_send():
            self._check_writable()
            self._writable.clear()
            await self._writable.wait()
        self._check_writable()
        self._stream.send(self._record(data))

    def pull(self, take: Callable[[], bytes]) -> None:
        """Have the stream take the next batch with `take()` when it writes next (and the
        credits allow), rather than write() it: what the connection gets meanwhile goes
        along. Instead of write(), never beside a write() under way."""
        if self._take is None and not self._ended and not self._half_closed:
            self._take = take
            self._stream.send(self)

    def pulled(self) -> bytes | None:
        """The record of the batch a pull waits for (b"": none after all), or None while
        the credits do not allow it."""
        take = self._take
        if take is None or self._ended:
            self._take = None
            return b""
        if not self._may_send():
            return None
        self._take = None
        data = take()
        end, self._end_after_take = self._end_after_take, False
        if not data:
            return multiplex.record(self.key, end=True) if end else b""
        return self._record(data, end=end)

    def _record(self, data: bytes, *, end: bool = False) -> bytes:
        """Session record of batch `data`, sent within the credits, with what is owed."""
        self._unacked += 1
        self._unacked_bytes += len(data)
        self._stream.unacked_bytes += len(data)
        return multiplex.record(self.key, data, end=end, ack=self._stream.owed.take(self.key))

    async def read(self) -> Any:
        while not self._inbound:
            if self._ended:
                if self._end is not None:
                    raise self._end
                return grpc.aio.EOF
            self._readable.clear()
            self._waiting = True
            try:
                await self._readable.wait()
            finally:
                self._waiting = False
        data, size = self._inbound.popleft()
        self._inbound_bytes -= size
        self._stream.acknowledge(self.key, size)
        if isinstance(data, bytes):
            return session_pb2.ConnectBatchedResponse.FromString(data)
        return data

    async def done_writing(self) -> None:
        if not self._ended and not self._half_closed:
            self._half_closed = True
            if self._take is not None:
                self._end_after_take = True  # the end goes after what the pull takes
            else:
                self._stream.send(multiplex.record(self.key, end=True))

    def cancel(self) -> bool:
        if self._ended:
            return False
        self._stream.forget(self.key, cancelled=True)
        self._stream.send(multiplex.record(self.key, flag4=1))
        self.finish(_error(grpc.StatusCode.CANCELLED, "cancelled"))
        return True

    def _check_writable(self) -> None:
        if self._ended:
            raise self._end or grpc.aio.UsageError("the session has ended")
        if self._half_closed:
            raise grpc.aio.UsageError("done_writing was called")

    # -------------------------------------------------------------- as the stream feeds it

    def deliver(self, data: bytes, turn_ends: float) -> bool:
        """A batch from the core; False when it exceeds the session's credits (what is
        unread and what was read but not yet acknowledged). Taken at once when a read()
        waits with nothing unread and the connection can (until `turn_ends`)."""
        owed, owed_bytes = self._stream.owed.of(self.key)
        if not multiplex.fits(len(self._inbound) + owed, self._inbound_bytes + owed_bytes):
            return False
        left: Batch = data
        if self._waiting and not self._inbound and (take := self.take_now) is not None:
            rest = take(data, turn_ends)
            if rest is None:
                self._stream.acknowledge(self.key, len(data))  # taken: as read() would
                return True
            left = rest
        self._inbound.append((left, len(data)))
        self._inbound_bytes += len(data)
        self._readable.set()
        return True

    def acknowledged(self, batches: int, size: int) -> None:
        self._unacked = max(0, self._unacked - batches)
        freed = min(size, self._unacked_bytes)
        self._unacked_bytes -= freed
        self._writable.set()
        self._stream.release(freed)
        if self._take is not None:
            self._stream.wake()  # a pull may wait for these credits

    def forgotten(self) -> int:
        """The bytes the session had unacknowledged, which no longer count for it."""
        freed, self._unacked_bytes = self._unacked_bytes, 0
        return freed

    def room(self) -> None:
        """The stream has room again: a write waiting for it goes on."""
        self._writable.set()

    def finish(self, error: grpc.aio.AioRpcError | None) -> None:
        """The session ended (None: OK); what was delivered is still read first."""
        if not self._ended:
            self._ended, self._end = True, error
            self._readable.set()
            self._writable.set()


class _Stream:
    """One ConnectMultiplexed call and the sessions on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, Any]) -> None:
        self.call = call
        self.calls: dict[int, MultiplexedCall] = {}
        self.failed = False
        #: What goes in the next messages, in order: records, and sessions whose pull
        #: waits (their record is made when the message is).
        self._records: deque[bytes | multiplex.Pull] = deque()
        self.owed = multiplex.Owed()  # the acknowledgements owed to the core
        #: Bytes sent up and not yet acknowledged, over every session, and what the core
        #: allows (None until its initial metadata has said).
        self.unacked_bytes = 0
        self.limit_bytes: int | None = None
        #: Sessions cancelled here whose end record has not come: their unacknowledged
        #: bytes, released when it does.
        self._cancelled: dict[int, int] = {}
        self._ready = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop())
        self._reader = asyncio.create_task(self._read_loop())

    def open(self, key: int) -> MultiplexedCall:
        call = self.calls[key] = MultiplexedCall(self, key)
        self.send(multiplex.record(key))  # the core opens the session now, as on Connect
        return call

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return await self.call.initial_metadata()

    async def accepted(self) -> None:
        """Once the core has taken the stream in; its error when the core refused it."""
        metadata = await self.call.initial_metadata()
        if AUTH_KEY in dict(metadata or ()):
            return  # the core's own initial metadata
        # A refusal: a status with no initial metadata of its own.
        code, details = await self.call.code(), await self.call.details()
        raise _as_sessions_see_it(_error(code, details or ""))

    def send(self, record: bytes | MultiplexedCall) -> None:
        self._records.append(record)
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    def acknowledge(self, key: int, size: int) -> None:
        """Session `key` took a batch of `size` bytes: owed to the core (Owed)."""
        if self.owed.add(key, size):
            self._ready.set()

    def has_room(self) -> bool:
        """Whether a batch may go up as far as the stream's credits go."""
        return self.limit_bytes is not None and self.unacked_bytes < self.limit_bytes

    def release(self, size: int) -> None:
        """`size` bytes were acknowledged (or released): wake what waited for room."""
        full = not self.has_room()
        self.unacked_bytes -= size
        if full and self.has_room():
            self._room()

    def _room(self) -> None:
        for call in self.calls.values():
            call.room()
        self._ready.set()  # pulls held back go too

    def forget(self, key: int, *, cancelled: bool = False) -> None:
        """The session is over here. What it had unacknowledged stops counting towards
        the stream's credits once the core has ended it too: now when it did (its end
        record), else at its end record to come (the core ends a cancelled session with
        one), since records sent meanwhile may reach the core before the cancel."""
        call = self.calls.pop(key, None)
        self.owed.take(key)
        if call is None:
            return
        if cancelled:
            self._cancelled[key] = call.forgotten()
        else:
            self.release(call.forgotten())

    async def _learn_limit(self) -> None:
        """The stream's credits, from the core's initial metadata (none from a core that
        announces none)."""
        metadata = await self.call.initial_metadata()
        announced = dict(metadata or ()).get(multiplex.STREAM_BYTES_KEY)
        self.limit_bytes = int(announced) if isinstance(announced, str) else sys.maxsize
        self._room()

    async def _read_loop(self) -> None:
        error = _error(grpc.StatusCode.UNAVAILABLE, "the multiplexed stream ended")
        loop = asyncio.get_running_loop()
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                assert isinstance(message, session_pb2.ConnectMultiplexedResponse)
                turn_ends = loop.time() + TURN
                for part in message.sessions:
                    self._take(part, turn_ends)
        except grpc.aio.AioRpcError as e:
            error = _as_sessions_see_it(e)
        finally:
            self.failed = True
            for call in self.calls.values():
                call.finish(error)
            self.calls.clear()
            self._writer.cancel()

    def _take(self, part: session_pb2.MultiplexedServerSession, turn_ends: float) -> None:
        call = self.calls.get(part.session)
        if call is None:
            # Cancelled here: what was on its way is moot, but for its end.
            if part.end and (freed := self._cancelled.pop(part.session, None)) is not None:
                self.release(freed)
            return
        if part.ack_batches:
            call.acknowledged(part.ack_batches, part.ack_bytes)
        if (data := part.batch) and not call.deliver(data, turn_ends):  # (a copy per access)
            call.cancel()
            call.finish(_error(grpc.StatusCode.INTERNAL, "the core sent past the credits"))
            return
        if part.end:
            self.forget(part.session)
            code = _STATUS.get(part.code, grpc.StatusCode.UNKNOWN)
            call.finish(None if code == grpc.StatusCode.OK else _error(code, part.message))

    async def _write_loop(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._learn_limit()
            while True:
                await self._ready.wait()
                # One turn of the event loop first: what other sessions have ready by then
                # goes in the same message (no timer; and no turn when no other session could).
                if len(self.calls) > 1:
                    await asyncio.sleep(0)
                self._ready.clear()
                if records := self._take_records():
                    await self.call.write(b"".join(records))

    def _take_records(self) -> list[bytes]:
        """The records of the next message: what is queued (and what the pulls take), up
        to MAX_MESSAGE_BYTES, then, once some session is owed half a window, every
        acknowledgement owed (the others wait for their sessions' next records)."""
        out, more = multiplex.next_records(self._records)
        if more:
            self._ready.set()
        if self.owed.due:
            out += self.owed.records()
        return out

    async def close(self) -> None:
        self.call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class Multiplexer:
    """Opens sessions over `streams` ConnectMultiplexed streams of one channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        streams: int,
        metadata: Callable[[], tuple[tuple[str, str], ...]],
    ) -> None:
        self._open_stream = channel.stream_stream(
            _CONNECT_MULTIPLEXED,
            request_serializer=batch.serialize,
            response_deserializer=session_pb2.ConnectMultiplexedResponse.FromString,
        )
        #: The metadata of each stream opened (its token read anew each time).
        self._metadata = metadata
        self._streams: list[_Stream | None] = [None] * streams
        self._next_key = 0

    def __call__(self) -> MultiplexedCall:
        key = self._next_key
        self._next_key += 1
        return self._stream(key % len(self._streams)).open(key)

    def _stream(self, slot: int) -> _Stream:
        stream = self._streams[slot]
        if stream is None or stream.failed:
            stream = self._streams[slot] = _Stream(self._open_stream(metadata=self._metadata()))
        return stream

    async def check(self) -> None:
        """Open the first stream now and return once the core has taken it in: the
        stream's error (AioRpcError) when the core refuses it, e.g. the gateway's token."""
        await self._stream(0).accepted()

    async def close(self) -> None:
        streams = [s for s in self._streams if s is not None]
        self._streams = [None] * len(self._streams)
        await asyncio.gather(*(s.close() for s in streams))
