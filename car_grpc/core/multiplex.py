"""SessionService.ConnectMultiplexed: a gateway's sessions over one stream (wire/multiplex.py).

Each session on the stream is run by the same SessionStream as a ConnectBatched stream of
its own: it is given a `SessionChannel` instead of a gRPC context, which reads the
session's batches from its own queue and puts its batches into the stream's next
message, within the session's credits. The stream's reader never waits for a session
(credits bound what each may have queued, and the stream's credits what all have); its
writer sends every record ready at once in one message.

Per frame the path is kept short: a session has no writer task. When a frame enters its
outbound queue, the session asks the stream to `pull` (once, until taken): the stream
takes every frame queued by then itself when it builds its next message, as one batch,
within the session's credits (a pull the credits hold keeps its place until the
gateway's acknowledgement wakes the writer). A frame with nothing queued before it is
written at once (`try_write`). Neither awaits: no cancellation can leave a write halfway.

What waits to be written is bounded as well: while more than the stream's bytes bound
(multiplex_stream_bytes) of records wait for the gateway to read them, the stream reads
no further record from it, for at most multiplex_stall_timeout (then the stream ends:
RESOURCE_EXHAUSTED). Sessions' credits bound each session's records, but not those
of sessions that end (their end records, and answers) nor of sessions refused, which a
gateway that does not read would otherwise make pile up without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from car_grpc.v1 import session_pb2
from car_grpc.wire import batch, multiplex
from car_grpc.wire.errors import CarError

if TYPE_CHECKING:
    from car_grpc.core.grpc_service import GrpcService
    from car_grpc.core.outbound import OutboundQueue

log = logging.getLogger(__name__)


class _Ended(Exception):
    """The session's stream was aborted (SessionStream calls context.abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class SessionChannel:
    """What SessionStream uses of a gRPC context, for one session of a multiplexed stream."""

    def __init__(self, stream: MultiplexedStream, key: int) -> None:
        self._stream = stream
        self.key = key
        #: Batches from the gateway not yet read by the session (bounded by its credits):
        #: each its size and its bytes, or the message parsed already.
        self.inbound: deque[tuple[int, bytes | session_pb2.ConnectBatchedRequest]] = deque()
        self.inbound_bytes = 0
        self._readable = asyncio.Event()
        self._idle = False  # the session waits for its next batch, all before it handled
        #: Set by the session: what handles a batch as it arrives when nothing in it need
        #: wait, with no hop through its reader (None: the reader handles it).
        self.take_batch: (
            Callable[[session_pb2.ConnectBatchedRequest], Callable[[], None] | None] | None
        ) = None
        self.client_done = False  # the gateway said `end`
        #: Batches written to the gateway and not yet acknowledged, and their bytes.
        self._unacked = 0
        self._unacked_bytes = 0
        #: The session's frames towards the gateway (`attach`), taken by the stream.
        self._outbound: OutboundQueue | None = None
        self._pulling = False  # the stream holds a pull of this session, not yet taken
        self._dropped = False  # cancelled by the gateway: what is queued goes nowhere
        self.ended = False  # the session is over: its end record is on its way

    def peer(self) -> str:
        return self._stream.peer

    def push(self, batch: bytes) -> str | None:
        """A batch from the gateway; what it exceeds (None: nothing): the session's
        credits (what is unread and what was read but not yet acknowledged) or the
        stream's (the same across its sessions)."""
        stream = self._stream
        owed, owed_bytes = stream.owed.of(self.key)
        if not multiplex.fits(len(self.inbound) + owed, self.inbound_bytes + owed_bytes):
            return "a batch past its credits"
        if stream.unacked_bytes >= stream.limit_bytes:
            return (
                f"a batch past the stream's credits ({stream.unacked_bytes} bytes"
                f" unacknowledged across its sessions, at most {stream.limit_bytes})"
            )
        item: bytes | session_pb2.ConnectBatchedRequest = batch
        if self._idle and not self.inbound and self.take_batch is not None:
            # Parsed here rather than in the session's reader: the same work, and a batch
            # that need not wait needs no reader at all. (Bytes that do not parse go to
            # the reader, which fails the session alone, as before.)
            with contextlib.suppress(DecodeError):
                message = session_pb2.ConnectBatchedRequest.FromString(batch)
                if (take := self.take_batch(message)) is not None:
                    # Acknowledged first: an answer written at once carries it.
                    stream.acknowledge(self.key, len(batch))
                    take()
                    return None
                item = message
        self.inbound.append((len(batch), item))
        self.inbound_bytes += len(batch)
        stream.inbound_bytes += len(batch)
        self._readable.set()
        return None

    def release(self, *, cancelled: bool = False) -> None:
        """The session is over (ended, or cancelled by the gateway): what it was sent no
        longer counts, unread or owed (the gateway stops counting it too)."""
        self._dropped = self._dropped or cancelled
        self._stream.inbound_bytes -= self.inbound_bytes
        self.inbound.clear()
        self.inbound_bytes = 0
        self._stream.owed.take(self.key)

    def finish_input(self) -> None:
        self.client_done = True
        self._readable.set()

    def acknowledged(self, batches: int, size: int) -> None:
        self._unacked = max(0, self._unacked - batches)
        self._unacked_bytes = max(0, self._unacked_bytes - size)
        if self._pulling:
            self._stream.wake()  # the pull may wait for these credits

    async def read(self) -> Any:
        while not self.inbound:
            if self.client_done:
                return grpc.aio.EOF
            self._readable.clear()
            self._idle = True
            try:
                await self._readable.wait()
            finally:
                self._idle = False
        size, data = self.inbound.popleft()
        self.inbound_bytes -= size
        self._stream.inbound_bytes -= size
        self._stream.acknowledge(self.key, size)
        # No typed twins to fill in (wire/twins.py): the gateway writes its frames from
        # JSON, which has none, and whatever the core sends on derives its own.
        if isinstance(data, bytes):
            return session_pb2.ConnectBatchedRequest.FromString(data)
        return data

    def attach(self, outbound: OutboundQueue) -> None:
        """The session's outbound queue: the stream takes its frames (no writer task)."""
        self._outbound = outbound
        outbound.on_put = self._pull

    def _pull(self) -> None:
        """A frame was queued: the stream takes what is queued when it writes next."""
        if not self._pulling and not self._dropped:
            self._pulling = True
            self._stream.send(self)

    def pulled(self) -> bytes | None:
        """The record of every frame queued now, as one batch (b"": none), or None while
        the credits hold them back (multiplex.Pull)."""
        queue = self._outbound
        if queue is None or self._dropped:
            self._pulling = False
            return b""
        if not multiplex.fits(self._unacked, self._unacked_bytes):
            if self.ended:  # its end record goes first: the gateway would ignore them
                self._pulling = False
                return b""
            return None
        self._pulling = False  # before the take: frames let in by it pull again, after
        frames = queue.take_ready(batch.MAX_FRAMES, batch.MAX_BYTES)
        queue.task_done(len(frames))
        if not queue.empty():
            self._pull()  # past one batch's bounds: the rest in the next batch
        if not frames:
            return b""
        record = self._record(batch.encode(frames))
        self._stream.made(record)
        return record

    def try_write(self, data: bytes) -> bool:
        """A batch into the stream's next message at once: False (nothing written) when
        the credits hold it back or frames queued before it are not taken yet. Never
        awaits, so no cancellation can leave it halfway."""
        if self._pulling or not multiplex.fits(self._unacked, self._unacked_bytes):
            return False
        if self._outbound is not None and not self._outbound.empty():
            return False
        self._stream.send(self._record(data))
        return True

    def _record(self, data: bytes) -> bytes:
        """The record of batch `data`, sent within the credits; what is owed to the
        gateway goes along (no record of its own)."""
        self._unacked += 1
        self._unacked_bytes += len(data)
        return multiplex.record(self.key, data, ack=self._stream.owed.take(self.key))

    def after_written(self, work: Callable[[], None]) -> None:
        """Run `work` once what the session has queued so far is written (see
        MultiplexedStream.after_written)."""
        self._stream.after_written(work)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Ended(code, details)


class MultiplexedStream:
    """One ConnectMultiplexed call: its sessions, their records both ways."""

    def __init__(self, service: GrpcService, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.service = service
        self.context = context
        self.peer = context.peer()
        self.sessions: dict[int, tuple[SessionChannel, asyncio.Task[None]]] = {}
        self._last_key = -1  # ids only grow: a smaller one is a session that ended
        #: What goes in the next messages, in order: records, and sessions whose pull waits
        #: (their record is made when the message is); the acknowledgements owed.
        self._records: deque[bytes | multiplex.Pull] = deque()
        self.owed = multiplex.Owed()
        #: Bytes from the gateway unread by their sessions; with `owed`, what the stream's
        #: credits bound (at most limit_bytes, plus one batch).
        self.inbound_bytes = 0
        self.limit_bytes = service.multiplex_stream_bytes
        self.stall_timeout = service.multiplex_stall_timeout
        self._ready = asyncio.Event()
        #: Bytes of records made and not yet taken by the writer; past limit_bytes the
        #: reader waits for `_drained` (the gateway must read for the core to read on).
        self.backlog_bytes = 0
        self._drained = asyncio.Event()
        self._paused_once = False  # said in the log (once a stream)
        self._closing = False  # no session is left: the writer ends once all is written
        #: Work to run once the next message is written (after_written).
        self._after_write: list[Callable[[], None]] = []

    @property
    def unacked_bytes(self) -> int:
        """Bytes the gateway sent that the core has not acknowledged, over every session."""
        return self.inbound_bytes + self.owed.bytes

    def send(self, record: bytes | multiplex.Pull) -> None:
        if isinstance(record, bytes):  # a pull counts once its record is made (made())
            self.backlog_bytes += len(record)
        self._records.append(record)
        self._ready.set()

    def made(self, record: bytes) -> None:
        """A pull made `record`, into the message being built (counted as sent ones are)."""
        self.backlog_bytes += len(record)

    async def _read_on(self) -> None:
        """Return once the records waiting for the gateway are within the bound."""
        if self.backlog_bytes <= self.limit_bytes:
            return
        if not self._paused_once:
            self._paused_once = True
            log.warning(
                "multiplexed stream from %s: %d bytes wait for the gateway to read them"
                " (at most %d): reading paused until it does",
                self.peer, self.backlog_bytes, self.limit_bytes,
            )  # fmt: skip
        try:
            async with asyncio.timeout(self.stall_timeout):
                while self.backlog_bytes > self.limit_bytes:
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            why = (
                f"the gateway read none of the {self.backlog_bytes} bytes held for it"
                f" (at most {self.limit_bytes}) in {self.stall_timeout:g} s"
            )
            log.warning("multiplexed stream from %s ended: %s", self.peer, why)
            await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    def wake(self) -> None:
        self._ready.set()

    def after_written(self, work: Callable[[], None]) -> None:
        """Run `work` once the next message (what is queued now, as far as it fits) is
        written, or the stream ends: a recorder's answer leaves before the fan-out that
        `work` builds. Never waits."""
        self._after_write.append(work)
        self._ready.set()

    def _run_after_write(self, done: list[Callable[[], None]]) -> None:
        for work in done:
            try:
                work()
            except Exception:
                log.exception("work after a multiplexed write failed")

    def acknowledge(self, key: int, size: int) -> None:
        """Session `key` took a batch of `size` bytes: owed to the gateway (Owed)."""
        if self.owed.add(key, size):
            self._ready.set()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_loop())
        try:
            await self._read_loop()
            # The gateway half-closed: its sessions end as their clients did, and what they
            # said last is written before the stream ends.
            for channel, _ in list(self.sessions.values()):
                channel.finish_input()
            while self.sessions:
                await asyncio.wait([task for _, task in self.sessions.values()])
            self._closing = True
            self._ready.set()
            await writer
        finally:
            tasks = [task for _, task in self.sessions.values()]
            for task in tasks:
                task.cancel()
            # Shielded: the sessions' close hooks must run to the end (SessionStream.run).
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            left, self._after_write = self._after_write, []
            self._run_after_write(left)  # the stream is over: nothing to wait for

    async def _read_loop(self) -> None:
        while (message := await self.context.read()) is not grpc.aio.EOF:
            assert isinstance(message, session_pb2.ConnectMultiplexedRequest)
            for part in message.sessions:
                await self._read_on()
                if (entry := self._session_for(part)) is None:
                    continue
                channel, task = entry
                if part.ack_batches:
                    channel.acknowledged(part.ack_batches, part.ack_bytes)
                if part.batch and (past := channel.push(part.batch)) is not None:
                    await self.context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"session {part.session}: {past}"
                    )
                if part.end:
                    channel.finish_input()
                if part.cancel:
                    channel.release(cancelled=True)  # the gateway no longer counts them
                    task.cancel()

    def _session_for(
        self, part: session_pb2.MultiplexedClientSession
    ) -> tuple[SessionChannel, asyncio.Task[None]] | None:
        """The live session a record is for, opened by its first record (None: ignored)."""
        key = part.session
        if (entry := self.sessions.get(key)) is not None:
            return entry
        if key <= self._last_key:
            return None  # a session that ended: what was on its way is moot
        self._last_key = key
        if part.cancel or (part.end and not part.batch):
            return None
        if len(self.sessions) >= multiplex.MAX_SESSIONS:
            refused = "too many sessions on one stream"
            self.send(multiplex.record(key, end=True, flag4=_RESOURCE_EXHAUSTED, message=refused))
            return None
        try:
            return self._open(key)
        except CarError as e:  # the core holds max_sessions: this session alone is refused
            self.send(multiplex.record(key, end=True, flag4=e.status.value[0], message=e.message))
            return None

    def _open(self, key: int) -> tuple[SessionChannel, asyncio.Task[None]]:
        from car_grpc.core.grpc_service import SessionStream  # which imports this module

        channel = SessionChannel(self, key)
        stream = SessionStream(self.service, channel, batched=True)  # type: ignore[arg-type]
        stream.session.bridged = True  # only the daemon token opens this stream
        task = asyncio.create_task(self._run_session(channel, stream))
        entry = self.sessions[key] = (channel, task)
        return entry

    async def _run_session(self, channel: SessionChannel, stream: Any) -> None:
        code, details = grpc.StatusCode.OK, ""
        try:
            await stream.run()
        except _Ended as e:
            code, details = e.code, e.details
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "cancelled"
        except Exception:
            log.exception("multiplexed session %d failed", channel.key)
            code, details = grpc.StatusCode.UNKNOWN, "internal error"
        finally:
            del self.sessions[channel.key]
            channel.ended = True
            channel.release()
            self.send(multiplex.record(channel.key, end=True, flag4=code.value[0], message=details))

    async def _write_loop(self) -> None:
        while True:
            await self._ready.wait()
            # One turn of the event loop first: what other sessions have ready by then
            # goes in the same message (no timer; and no turn when no other session could).
            if len(self.sessions) > 1:
                await asyncio.sleep(0)
            self._ready.clear()
            after, self._after_write = self._after_write, []
            try:
                records = self._take()
                if records:
                    await self.context.write(b"".join(records))
            finally:
                self._run_after_write(after)
            if self._closing and not self._records and not self.owed:
                return

    def _take(self) -> list[bytes]:
        """The records of the next message: what the sessions wrote (and what their pulls
        take), up to MAX_MESSAGE_BYTES (the rest waits for the next), then, once some
        session is owed half a window (or the stream is closing), every acknowledgement
        owed."""
        out, more = multiplex.next_records(self._records)
        if more:
            self._ready.set()
        self.backlog_bytes -= sum(map(len, out))
        if self.backlog_bytes <= self.limit_bytes:
            self._drained.set()
        # Otherwise they wait for their sessions' next records (wire/multiplex.py).
        if self.owed.due or self._closing:
            out += self.owed.records()
        return out


_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
