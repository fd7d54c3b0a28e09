"""SessionService.ConnectMultiplexed: a gateway's sessions over one stream (wire/multiplex.py).

Each session on the stream is run by the same SessionStream as a ConnectBatched stream of
its own: it is given a `SessionChannel` instead of a gRPC context, which reads the
session's batches from its own queue and writes its batches into the stream's next
message, within the session's credits. The stream's reader never waits for a session
(credits bound what each may have queued, and the stream's credits what all have); its
writer sends every record ready at once in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import grpc

from car_grpc.v1 import session_pb2
from car_grpc.wire import multiplex

if TYPE_CHECKING:
    from car_grpc.core.grpc_service import GrpcService

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
        #: Batches from the gateway not yet read by the session (bounded by its credits).
        self.inbound: deque[bytes] = deque()
        self.inbound_bytes = 0
        self._readable = asyncio.Event()
        self.client_done = False  # the gateway said `end`
        #: Batches written to the gateway and not yet acknowledged, and their bytes.
        self._unacked = 0
        self._unacked_bytes = 0
        self._credit = asyncio.Event()

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
        self.inbound.append(batch)
        self.inbound_bytes += len(batch)
        stream.inbound_bytes += len(batch)
        self._readable.set()
        return None

    def release(self) -> None:
        """The session is over (ended, or cancelled by the gateway): what it was sent no
        longer counts, unread or owed (the gateway stops counting it too)."""
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
        self._credit.set()

    async def read(self) -> Any:
        while not self.inbound:
            if self.client_done:
                return grpc.aio.EOF
            self._readable.clear()
            await self._readable.wait()
        data = self.inbound.popleft()
        self.inbound_bytes -= len(data)
        self._stream.inbound_bytes -= len(data)
        self._stream.acknowledge(self.key, len(data))
        # No typed twins to fill in (wire/twins.py): the gateway writes its frames from
        # JSON, which has none, and whatever the core sends on derives its own.
        return session_pb2.ConnectBatchedRequest.FromString(data)

    async def write(self, data: bytes) -> None:
        # As a write on a stream of its own waits for the HTTP/2 window: until the gateway
        # has taken enough of what was sent before.
        while not self.try_write(data):
            self._credit.clear()
            await self._credit.wait()

    def try_write(self, data: bytes) -> bool:
        """`write` without waiting: False (nothing written) when the credits hold it back."""
        if not multiplex.fits(self._unacked, self._unacked_bytes):
            return False
        self._unacked += 1
        self._unacked_bytes += len(data)
        # What is owed to the gateway goes along (no record of its own).
        self._stream.send(multiplex.record(self.key, data, ack=self._stream.owed.take(self.key)))
        return True

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
        #: Records for the next message, and the acknowledgements owed to the gateway.
        self._records: list[bytes] = []
        self.owed = multiplex.Owed()
        #: Bytes from the gateway unread by their sessions; with `owed`, what the stream's
        #: credits bound (at most limit_bytes, plus one batch).
        self.inbound_bytes = 0
        self.limit_bytes = service.multiplex_stream_bytes
        self._ready = asyncio.Event()
        self._closing = False  # no session is left: the writer ends once all is written

    @property
    def unacked_bytes(self) -> int:
        """Bytes the gateway sent that the core has not acknowledged, over every session."""
        return self.inbound_bytes + self.owed.bytes

    def send(self, record: bytes) -> None:
        self._records.append(record)
        self._ready.set()

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

    async def _read_loop(self) -> None:
        while (message := await self.context.read()) is not grpc.aio.EOF:
            assert isinstance(message, session_pb2.ConnectMultiplexedRequest)
            for part in message.sessions:
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
                    channel.release()  # the gateway no longer counts them
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
        return self._open(key)

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
            records = self._take()
            if records:
                await self.context.write(b"".join(records))
            if self._closing and not self._records and not self.owed:
                return

    def _take(self) -> list[bytes]:
        """The records of the next message: what the sessions wrote, up to
        MAX_MESSAGE_BYTES (the rest waits for the next), then, once some session is owed
        half a window (or the stream is closing), every acknowledgement owed."""
        out: list[bytes] = []
        size = 0
        records, taken = self._records, 0
        for record in records:
            if taken and size + len(record) > multiplex.MAX_MESSAGE_BYTES:
                break
            out.append(record)
            size += len(record)
            taken += 1
        del records[:taken]
        if records:
            self._ready.set()
        # Otherwise they wait for their sessions' next records (wire/multiplex.py).
        if self.owed.due or self._closing:
            out += self.owed.records()
        return out


_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
