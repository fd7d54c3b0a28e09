"""One WebSocket connection bridged to one SessionService.ConnectBatched stream (the
session stream with many frames per gRPC message: wire/batch.py).

Six tasks per connection: client -> core (text frames through the Bridge onto a bounded
upstream queue; a message that arrives while this task waits for one is handled as it
arrives, no wakeup, when it needs no wait: _from_client_at_once), the upstream writer
(every frame queued when a write can start, in one gRPC message; on a multiplexed stream
no task: the stream pulls the queue's frames itself when it writes next), core -> client
(opens the stream, then the ServerFrames of each message through the Bridge to the
WebSocket: sent at once, in one socket write, while the client keeps up, else onto a
bounded queue; on a multiplexed stream a batch that finds this task waiting and the client
keeping up is written by the stream's reader itself, no wakeup: _from_core_at_once), the
writer (queue -> WebSocket, what waits in one write), the keepalive and the
authentication deadline.

Opening is paced: a gateway has at most `ws_pending_streams` Connect streams that the core
has not taken in yet (the core says so with its initial metadata), so a burst of
connections waits here rather than overflowing gRPC's queue of calls the core has not
picked up, where calls past the limit are refused (and their sessions would end at once).

A client that reads slowly is met with backpressure, not with a disconnect: while its
queue is full the gateway stops reading its core stream, so gRPC flow control backs up
into the core's bounded session queue. There fan-out (run traces, host events) drops
with a visible gap and responses wait, and the core serves every other session as
before. Memory stays bounded: the queue (in frames and in bytes), the write buffer and
the gRPC stream window.

Whichever side ends first ends the connection once, with one close code and reason:

- the client goes away: what it sent last is forwarded, the stream to the core is
  half-closed and the core gets `ws_half_close_timeout` to read it all and end the
  session (an agent's final chat tokens are not lost); then the stream is cancelled;
- the core ends the stream: open requests get -32603, then the WebSocket closes (1011);
- the core refuses the session (-32001): the error is sent, then the WebSocket closes (1008);
- the core has no room for the session (RESOURCE_EXHAUSTED: it holds max_sessions):
  closed (1013, try again later) with the core's reason, which names the limit;
- the client takes nothing from a full queue for `ws_stall_timeout` seconds: closed (1008);
- the session is not authenticated `ws_auth_timeout` seconds after the core took the
  stream in (and no request is on its way): closed (1008); not when auth is off;
- nothing at all arrives for `ws_idle_timeout` seconds (pongs count): closed (1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConcurrencyError, ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Event, State

from car_grpc.config import GatewayConfig
from car_grpc.gateway import audio_frames, decoder, ws_frames
from car_grpc.gateway.decoder import DecoderPool
from car_grpc.gateway.jsonrpc import MAX_BATCH, Bridge, Inbound
from car_grpc.gateway.multiplex import Batch, MultiplexedCall
from car_grpc.gateway.outbound import OutboundQueue
from car_grpc.v1 import session_pb2, voice_pb2
from car_grpc.wire import batch
from car_grpc.wire.errors import AUTH_TIMEOUT, auth_timeout
from car_grpc.wire.metadata import AUTH_KEY

log = logging.getLogger(__name__)

#: A ClientFrame, or one already serialized (decoded off the loop).
OutFrame = session_pb2.ClientFrame | bytes


class SessionCall(Protocol):
    """A session's stream to the core: a SessionService.ConnectBatched call of its own, or
    one session on a shared ConnectMultiplexed stream (gateway/multiplex.py). Encoded
    batches of ClientFrames up (wire/batch.py), ConnectBatchedResponses down."""

    async def write(self, request: bytes) -> None: ...
    async def read(self) -> Any: ...
    async def done_writing(self) -> None: ...
    def cancel(self) -> bool: ...
    async def initial_metadata(self) -> Any: ...


#: Opens a session's stream (ConnectBatched, or a Multiplexer).
ConnectCallable = Callable[[], SessionCall]


#: RFC 6455 caps a close reason at 123 bytes of UTF-8.
_MAX_REASON_BYTES = 123
#: Longest the gateway works through one client frame (its batch's writes), or through
#: one batch of frames from the core, before it lets other tasks run.
SLICE = 0.002
#: How long a connection the core has no room for (1013) waits for the client's first
#: request, to answer it with the reason before closing: car-runtime sends session.auth
#: right after the handshake, and a close that overtakes it shows as a failed send.
REFUSAL_GRACE = 1.0
#: Longest a connection waits for its turn to open a stream, and then for the core to take
#: it in, before going on without (the pacing is a courtesy, not a condition).
OPEN_TIMEOUT = 30.0


class TrackedConnection(ServerConnection):
    """A server connection that notes when the peer last sent anything at all, and may
    hand a message over as it arrives (`take_message`) rather than wake recv()."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_activity = self.loop.time()
        #: Takes a message as it arrives, while a recv() waits with nothing received
        #: before it: True when it did (recv() never sees it), False to leave it to recv().
        self.take_message: Callable[[str | bytes], bool] | None = None
        #: Whether data_received reads whole data frames itself (ws_frames.py): while the
        #: connection is open with no extension and websockets' parser is at a boundary.
        self._own_frames = False
        #: The start of a frame whose rest has not arrived yet (while _own_frames), and
        #: how many bytes it needs before it is read again: its header's, then the whole
        #: frame's (so a frame sent a byte at a time is copied once, not once a byte),
        self._partial = bytearray()
        self._partial_needs = 0
        #: or the bytes of a large frame that websockets reads still to come.
        self._to_websockets = 0
        #: Asked once the TCP connection is accepted whether it may stay (False: it is
        #: closed at once, nothing read): the gateway's count of handshakes under way.
        self.on_accepted: Callable[[TrackedConnection], bool] | None = None
        #: Frees what the gateway's caps count for this connection (its handshake, then
        #: its connection): called by `release`, and at the latest when the TCP
        #: connection is gone, however it ended.
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.on_accepted is not None and not self.on_accepted(self):
            self.transport.abort()  # websockets keeps it as the asyncio.Transport it is

    def release(self) -> None:
        """Free what the caps count for this connection now (once)."""
        if (lost := self.on_lost) is not None:
            self.on_lost = None
            lost()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.release()

    def data_received(self, data: bytes) -> None:
        # Any bytes count: messages, pongs, pings, close frames.
        self.last_activity = self.loop.time()
        if self._partial:
            self._partial += data
            if len(self._partial) < self._partial_needs:
                return
            data, self._partial = bytes(self._partial), bytearray()
        if self._own_frames and self.protocol.state is State.OPEN:
            self._read_frames(data)
            return
        super().data_received(data)
        self._own_frames = self._may_own_frames()

    def _hold(self, data: bytes, at: int, needs: int) -> None:
        """Keep the frame starting at `at` until it has `needs` bytes."""
        self._partial = bytearray(memoryview(data)[at:])
        self._partial_needs = needs

    def _may_own_frames(self) -> bool:
        protocol = self.protocol
        return (
            protocol.state is State.OPEN
            and not protocol.extensions
            and not protocol.debug
            and ws_frames.at_boundary(protocol)
        )

    def _read_frames(self, data: bytes) -> None:
        """websockets' data_received, with each whole data frame read here (ws_frames.py)
        and every other frame fed to websockets on its own, so that its parser is at a
        frame boundary after it; from a frame it refuses on, the rest is all websockets'."""
        protocol = self.protocol
        events: list[Event | tuple[bool, bytes]] = []  # (text?, payload): read here
        fed = False

        def feed(chunk: bytes) -> None:
            nonlocal fed
            protocol.receive_data(chunk)
            events.extend(protocol.events_received())
            fed = True

        at, end = 0, len(data)
        if left := self._to_websockets:  # the rest of a large frame websockets reads
            at = min(left, end)
            self._to_websockets = left - at
            feed(data[:at])
            if not self._to_websockets and not self._may_own_frames():
                self._own_frames = False
                at = end
                feed(data[at:])
        limit = ws_frames.frame_limit(protocol)  # (it changes with what websockets reads)
        while at < end:
            second = data[at + 1] if end - at > 5 else 0
            if 0x80 <= second < 0xFE:  # masked, under 126 bytes: the header is all there
                size, length = 6, second & 0x7F
            elif (found := ws_frames.header(data, at)) is not None:
                size, length = found
                second = data[at + 1]
            else:
                self._hold(data, at, ws_frames.needed(data, at))
                break
            first, total = data[at], size + length
            if not ws_frames.readable(first, second, length, limit):
                self._own_frames = False  # websockets fails the connection on its header
                feed(data[at:])
                break
            if end - at < total:
                if total <= ws_frames.PARTIAL_BYTES:
                    self._hold(data, at, total)
                else:  # a large frame: websockets reads it into a buffer of its own
                    self._to_websockets = total - (end - at)
                    feed(data[at:])
                break
            if (first == ws_frames.TEXT_HEAD or first == ws_frames.BINARY_HEAD) and (
                protocol.current_size is None
            ):
                text = first == ws_frames.TEXT_HEAD
                payload = ws_frames.unmask(data, at + size, at + total)
                if fed:  # after what websockets read: in order, after its answers go
                    events.append((text, payload))
                elif not self._offer(text, payload):
                    super().process_event(Frame(Opcode.TEXT if text else Opcode.BINARY, payload))
            else:  # a control frame, a fragment: websockets', alone
                feed(data[at : at + total])
                limit = ws_frames.frame_limit(protocol)
                if not self._may_own_frames():
                    self._own_frames = False
                    feed(data[at + total :])
                    break
            at += total
        if fed:  # as websockets' data_received: what it answers (a pong, a close) goes
            try:
                self.send_data()
            except Exception as exc:
                self.logger.debug("! error while sending data", exc_info=True)
                self.set_connection_exc(exc)
            expected, timeout = protocol.close_expected(), self.close_timeout
            if expected and self.close_deadline is None and timeout is not None:
                self.close_deadline = self.loop.time() + timeout
        for event in events:
            if isinstance(event, tuple):
                text, payload = event
                if not self._offer(text, payload):
                    super().process_event(Frame(Opcode.TEXT if text else Opcode.BINARY, payload))
            else:
                self.process_event(event)

    def process_event(self, event: Event) -> None:
        """A message of one frame goes to take_message while recv() waits with nothing
        queued before it (no wakeup, no task step); anything else (a fragment, text that is
        not UTF-8, which recv() refuses as websockets does) as websockets handles it."""
        if (
            self.take_message is not None
            and isinstance(event, Frame)
            and event.fin
            and (event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY)
        ):
            data = event.data if type(event.data) is bytes else bytes(event.data)
            if self._offer(event.opcode is Opcode.TEXT, data):
                return
        super().process_event(event)

    def next_queued(self) -> str | bytes | None:
        """The next message received, as recv() would return it, when it is there already
        and of one frame (text that is UTF-8); None otherwise (nothing there, a recv()
        under way, or one for recv() to take: a fragment, text that is not UTF-8)."""
        messages = self.recv_messages
        queue = messages.frames.queue
        if not queue or messages.get_in_progress or not queue[0].fin:
            return None
        frame = queue[0]
        data = frame.data if type(frame.data) is bytes else bytes(frame.data)
        message: str | bytes = data
        if frame.opcode is Opcode.TEXT:
            try:
                message = data.decode()
            except UnicodeDecodeError:
                return None
        queue.popleft()
        messages.maybe_resume()  # as recv(): reading resumes below the low water mark
        return message

    def _offer(self, text: bool, data: bytes) -> bool:
        """A whole message to take_message, when recv() waits with nothing queued: True
        when it took it."""
        take = self.take_message
        waiting = self.recv_messages
        if take is None or not waiting.get_in_progress or waiting.frames:
            return False
        if not text:
            return take(data)
        try:
            return take(data.decode())
        except UnicodeDecodeError:
            return False  # recv() refuses it, as websockets does

    def can_send_now(self) -> bool:
        """Whether send_now may write: the connection open and its writes not paused."""
        return self.protocol.state is State.OPEN and not self.paused

    def send_now(self, messages: Sequence[str | bytes]) -> bool:
        """send_all without a wait, when can_send_now() (the caller keeps within the write
        buffer's room, so there is nothing to drain); False when the write failed (the
        connection is done for, as send_all would have raised ConnectionClosed)."""
        self._frame(messages)
        try:
            self.send_data()
        except Exception:  # as send_context: the connection is given up
            self.logger.debug("! error while sending data", exc_info=True)
            self.transport.abort()
            return False
        return True

    async def send_all(self, messages: Sequence[str | bytes]) -> None:
        """Send several messages (text: str, binary: bytes) in one write to the socket,
        rather than one system call each; ConnectionClosed as send() raises it."""
        async with self.send_context():
            self._frame(messages)

    def _frame(self, messages: Sequence[str | bytes]) -> None:
        """Frame the messages (text: str, binary: bytes) for the next send_data(): while
        the connection is open with no extension, as ws_frames writes them."""
        protocol = self.protocol
        if (
            protocol.state is not State.OPEN
            or protocol.extensions
            or protocol.expect_continuation_frame
            or protocol.debug
        ):
            for message in messages:
                if isinstance(message, str):
                    protocol.send_text(message.encode())
                else:
                    protocol.send_binary(message)
            return
        writes = protocol.writes
        for message in messages:
            if isinstance(message, str):
                payload, first = message.encode(), ws_frames.TEXT_HEAD
            else:
                payload, first = message, ws_frames.BINARY_HEAD
            writes.append(ws_frames.frame_header(first, len(payload)))
            if payload:  # (an empty write is what marks the end of the stream)
                writes.append(payload)

    def send_data(self) -> None:
        """As websockets writes outgoing data, but the frames ready at once in one write
        (send_all's messages leave together)."""
        ready: list[bytes] = []
        for data in self.protocol.data_to_send():
            if data:
                ready.append(data)
                continue
            if ready:
                self.transport.write(b"".join(ready))
                ready = []
            # The end of the stream: half-close the TCP connection when possible.
            if self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # as websockets: OSError, uvloop's
                    self.transport.write_eof()
            else:
                self.transport.close()
        if ready:
            self.transport.write(b"".join(ready))


def _clip(reason: str) -> str:
    raw = reason.encode()
    if len(raw) <= _MAX_REASON_BYTES:
        return reason
    return raw[: _MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


class _Refused:
    """Where the frames of a connection the core has refused go (in place of a multiplexed
    call's pull): nowhere, once they have said that the client sent something."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    def pull(self, take: Callable[[], bytes]) -> None:
        take()
        self.asked.set()


class Connection:
    """The bridge between one WebSocket and its Connect stream."""

    def __init__(
        self,
        ws: TrackedConnection,
        connect: ConnectCallable,
        config: GatewayConfig,
        opening: asyncio.Semaphore | None = None,
        decoder: DecoderPool | None = None,
    ) -> None:
        self.ws = ws
        self.config = config
        self.bridge = Bridge()
        self._connect = connect
        #: Where large frames are decoded (None: inline, whatever their size).
        self._decoder = decoder
        #: The Connect stream, once opened (see _open).
        self.call: SessionCall
        #: Shared by the gateway's connections: a slot per stream not yet taken in.
        self._opening = opening or asyncio.Semaphore(config.ws_pending_streams)
        self._opened = asyncio.Event()  # self.call exists
        self._accepted = asyncio.Event()  # the core took the stream in (or failed it)
        self._authenticated = asyncio.Event()
        #: Whether the core requires session.auth: its initial metadata says (until then,
        #: assume it does).
        self._auth_required = True
        #: Text frames (JSON-RPC) and binary frames (audio) for the client.
        self.outbound = OutboundQueue(config.ws_outbound_queue, config.ws_outbound_queue_bytes)
        #: Serialized ClientFrames on their way to the core: the next batch, filling while
        #: the writer (a task that exists only while there is something to write, so an
        #: idle connection holds neither) writes the one before; at most a batch's frames
        #: and bytes, past which the client is not read until the writer takes them.
        self._upstream: list[bytes] = []
        self._upstream_bytes = 0
        self._upstream_room: asyncio.Future[None] | None = None
        self._upstream_writer: asyncio.Task[None] | None = None
        #: The session on a multiplexed stream, once opened: it pulls what is queued.
        self._pulled_by: MultiplexedCall | _Refused | None = None
        #: A message _from_client_at_once translated and could not finish: the rest of it
        #: for _client_to_core, which receives that message next.
        self._carried: Inbound | None = None
        self._ended = asyncio.Event()
        self.close_code: int = CloseCode.NORMAL_CLOSURE
        self.close_reason = ""
        self._flush = False  # send what is queued before closing
        self._client_left = False  # the client closed or dropped the WebSocket
        self._writing = False  # the writer task is inside ws.send()
        self._full_size = False  # the message size limit was raised after auth

    def end(self, code: int, reason: str, *, flush: bool = False) -> None:
        """End the connection (the first call wins)."""
        if self._ended.is_set():
            return
        self.close_code, self.close_reason, self._flush = code, _clip(reason), flush
        self._ended.set()

    def _left(self) -> None:
        """The client closed the WebSocket or dropped the connection."""
        if not self._ended.is_set():
            self._client_left = True
        self.end(CloseCode.NORMAL_CLOSURE, "")

    async def run(self) -> None:
        upstream = asyncio.create_task(self._client_to_core())
        downstream = asyncio.create_task(self._core_to_client())
        tasks = [
            upstream,
            downstream,
            asyncio.create_task(self._write()),
            asyncio.create_task(self._keepalive()),
            asyncio.create_task(self._auth_deadline()),
        ]
        for task in tasks:
            task.add_done_callback(self._task_done)
        try:
            await self._ended.wait()
            if self._client_left:
                await self._let_core_finish(upstream, downstream)
        finally:
            if self._opened.is_set():
                self.call.cancel()
            if self._flush:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.ws_close_timeout):
                        await self.outbound.join()
            if self._upstream_writer is not None:
                tasks.append(self._upstream_writer)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()

    async def _let_core_finish(
        self, upstream: asyncio.Task[None], downstream: asyncio.Task[None]
    ) -> None:
        """Forward what the client sent last, half-close the stream, and give the core a
        bounded time to read it all and end the session. Cancelling at once would lose
        the frames still on their way (an agent's last tokens and its `done`)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.ws_half_close_timeout):
                await asyncio.wait((upstream,))
                if not self._opened.is_set():
                    return  # nothing reached the core
                if (writer := self._upstream_writer) is not None:
                    await asyncio.wait((writer,))  # it ends once all is written
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                    await self.call.done_writing()
                await asyncio.wait((downstream,))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A bug in one direction must not leave the other half running on its own.
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("gateway: connection task failed", exc_info=error)
            self.end(CloseCode.INTERNAL_ERROR, "internal error")

    async def _close(self) -> None:
        # websockets bounds the closing handshake, but not the wait for room in the write
        # buffer of a client that stopped reading: bound the whole close here. Meanwhile
        # whatever the client still sends is read and dropped, so that reading (paused
        # once enough was left unread) goes on and its close frame is seen.
        discard = asyncio.create_task(self._discard_incoming())
        try:
            async with asyncio.timeout(self.config.ws_close_timeout):
                await self.ws.close(self.close_code, self.close_reason)
        except TimeoutError:
            self.ws.transport.abort()
        finally:
            discard.cancel()
        if self.close_code != CloseCode.NORMAL_CLOSURE:
            log.info(
                "gateway: closed %s: %d %s",
                self.ws.remote_address,
                self.close_code,
                self.close_reason,
            )

    async def _discard_incoming(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                pass

    async def _queue(self, text: str | bytes) -> None:
        """Queue behind what waits. While the queue is full (in frames or in bytes) the
        caller waits, and so stops reading its source (the core stream, or the client);
        when the client has taken no frame for ws_stall_timeout it is given up on."""
        stall = self.config.ws_stall_timeout
        if not await self.outbound.put(text, stall):
            self.end(CloseCode.POLICY_VIOLATION, f"client not reading: stalled for {stall:g}s")

    async def _client_to_core(self) -> None:
        ws = self.ws
        ws.take_message = self._from_client_at_once  # while this waits in recv()
        try:
            while True:
                # What was received meanwhile without recv() each (a flood), then recv().
                message = ws.next_queued()
                if message is None:
                    message = await ws.recv()
                if (carried := self._carried) is not None:
                    inbound, self._carried = carried, None  # translated in _from_client_at_once
                elif (translated := self._translate(message)) is not None:
                    inbound = translated
                else:  # off the event loop: see decoder.py
                    assert self._decoder is not None
                    try:
                        first_id = self.bridge.reserve_ids(MAX_BATCH)
                        callbacks = self.bridge.callbacks
                        decoded = await self._decoder.decode(message, callbacks, first_id)
                    except decoder.DecodeFailed as e:
                        decoded = decoder.failed(str(e))
                    inbound = self.bridge.admit(decoded)
                frames = inbound.frames or inbound.wire
                if inbound.replies or not self._push_now(frames):
                    for text in inbound.replies:
                        await self._queue(text)
                    await self._write_to_core(frames)
        except ConnectionClosed:
            pass
        finally:
            self.ws.take_message = None
        self._left()

    def _translate(self, message: str | bytes) -> Inbound | None:
        """What a client message becomes, translated on the event loop; None for one
        decoded off it (decoder.py)."""
        if isinstance(message, bytes) and audio_frames.is_audio_frame(message):
            return audio_frames.from_client(message)  # CAR binary audio frame
        if self._decoder is None or decoder.inline(message):
            return self.bridge.from_client(message)
        return None

    def _from_client_at_once(self, message: str | bytes) -> bool:
        """A client message taken as it arrives (TrackedConnection.take_message), while
        _client_to_core waits for one with nothing received before it (no wakeup): on a
        multiplexed stream that pulls, translated and its frame queued as _push_now does
        it, when that needs no wait. False leaves the message to _client_to_core (and with
        it, in `_carried`, what it was translated into, when it was: replies to queue, or
        frames that need _write_to_core)."""
        if self._pulled_by is None:
            return False
        try:
            inbound = self._translate(message)
            if inbound is None:
                return False
            if not inbound.replies and self._push_now(inbound.frames or inbound.wire):
                return True
            self._carried = inbound
            return False
        except Exception as e:  # as _task_done: a bug ends this connection
            log.error("gateway: connection task failed", exc_info=e)
            self.end(CloseCode.INTERNAL_ERROR, "internal error")
            return True

    async def _write_to_core(self, frames: Sequence[OutFrame]) -> None:
        """Queue the frames of one client frame (a batch: up to 1,000) for the core,
        waiting while the upstream queue is full and letting other tasks run every SLICE
        seconds (a put that need not wait does not give the event loop back)."""
        loop = self.ws.loop  # (asyncio.get_running_loop() is a system call: getpid)
        deadline = loop.time() + SLICE
        for frame in frames:
            data = frame if isinstance(frame, bytes) else frame.SerializeToString()
            while self._upstream and (
                len(self._upstream) >= batch.MAX_FRAMES
                or self._upstream_bytes + len(data) > batch.MAX_BYTES
            ):
                # Full: wait (as long as the core does not read) for the writer to take it.
                self._upstream_room = room = loop.create_future()
                await room
            self._upstream.append(data)
            self._upstream_bytes += len(data)
            if (pulled_by := self._pulled_by) is not None:
                pulled_by.pull(self._take_upstream)  # no task: see multiplex.py
            elif self._upstream_writer is None:
                self._upstream_writer = asyncio.create_task(self._write_upstream())
                self._upstream_writer.add_done_callback(self._task_done)
            if loop.time() >= deadline:
                await asyncio.sleep(0)
                deadline = loop.time() + SLICE

    def _push_now(self, frames: Sequence[OutFrame]) -> bool:
        """_write_to_core of one frame that need not wait, on a multiplexed stream that
        pulls: without a coroutine (a frame a chat token). False: nothing queued."""
        if len(frames) != 1 or (pulled_by := self._pulled_by) is None:
            return False
        frame = frames[0]
        data = frame if isinstance(frame, bytes) else frame.SerializeToString()
        if self._upstream and (
            len(self._upstream) >= batch.MAX_FRAMES
            or self._upstream_bytes + len(data) > batch.MAX_BYTES
        ):
            return False
        self._upstream.append(data)
        self._upstream_bytes += len(data)
        pulled_by.pull(self._take_upstream)
        return True

    async def _write_upstream(self) -> None:
        """Write what the client sent onto the stream, every frame queued when a write
        can start in that one message, until nothing is left; then, on a multiplexed
        stream, leave the next ones to its pulls."""
        try:
            await self._opened.wait()  # bounded: see _open
            while self._upstream:
                await self.call.write(self._take_upstream())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the stream ended: _core_to_client says why
        finally:
            self._upstream_writer = None
            opened = self._opened.is_set() and self._pulled_by is None  # (not _Refused)
            if opened and isinstance(self.call, MultiplexedCall):
                self._pulled_by = self.call

    def _take_upstream(self) -> bytes:
        """The batch of every frame queued (b"": none), which makes room for more."""
        frames = self._upstream
        self._upstream, self._upstream_bytes = [], 0
        if (room := self._upstream_room) is not None and not room.done():
            room.set_result(None)
        return batch.encode(frames) if frames else b""

    async def _open(self) -> None:
        """Open the Connect stream once a slot is free, and hold the slot until the core
        has taken the stream in (its initial metadata) or the call failed: each wait at
        most OPEN_TIMEOUT, after which the connection goes on regardless."""
        acquired = False
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OPEN_TIMEOUT):
                    await self._opening.acquire()
                    acquired = True
            self.call = self._connect()
            if isinstance(self.call, MultiplexedCall) and self._upstream_writer is None:
                self._pulled_by = self.call
            self._opened.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OPEN_TIMEOUT):
                    # Empty when the call failed first (the read that follows says why).
                    metadata = await self.call.initial_metadata()
                    auth = dict(metadata or ()).get(AUTH_KEY)
                    if auth is not None:
                        self._auth_required = auth != "off"
        finally:
            if acquired:
                self._opening.release()
            self._accepted.set()

    async def _auth_deadline(self) -> None:
        """Close a connection that has not authenticated ws_auth_timeout seconds after the
        core took its stream in. A request still on its way at the deadline (the core
        may be slow under load) gets one more ws_auth_timeout to be answered."""
        await self._accepted.wait()  # bounded: see _open
        if not self._auth_required:
            return
        timeout = self.config.ws_auth_timeout
        for grace in (False, True):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._authenticated.wait()
                    return
            if grace or not self.bridge.open_requests:
                break
        self.end(CloseCode.POLICY_VIOLATION, auth_timeout(timeout))

    async def _core_to_client(self) -> None:
        await self._open()
        code = CloseCode.INTERNAL_ERROR  # how the connection closes when the stream ends
        if isinstance(self.call, MultiplexedCall):
            self.call.take_now = self._from_core_at_once  # while this waits in read()
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await self.call.read()
                if self.bridge.auth_refused:
                    return  # met by _from_core_at_once, which ended the connection
                if message is grpc.aio.EOF:
                    reason = "core ended the session"
                    break
                assert isinstance(message, session_pb2.ConnectBatchedResponse)
                out: list[str | bytes] = []
                refused = False
                deadline = loop.time() + SLICE
                for frame in message.frames:
                    if (sent := self._from_core(frame)) is not None:
                        out.append(sent)
                    if refused := self.bridge.auth_refused:
                        break
                    if loop.time() >= deadline:  # a long batch: let other tasks run
                        if out:
                            await self._send(out)
                        out = []
                        await asyncio.sleep(0)
                        deadline = loop.time() + SLICE
                if out:
                    await self._send(out)
                if refused:
                    self._refused()
                    return
        except grpc.aio.AioRpcError as e:
            if self.bridge.auth_refused:
                return  # as above
            reason = f"core unavailable: {e.code().name}: {e.details()}"
            details = e.details() or ""
            if e.code() == grpc.StatusCode.UNAUTHENTICATED and details.startswith(AUTH_TIMEOUT):
                # The core's own auth deadline (CoreConfig.auth_timeout), met first.
                code, reason = CloseCode.POLICY_VIOLATION, details
            elif e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # The core is full (max_sessions, which the details name): the client may
                # come back once sessions have ended.
                code, reason = CloseCode.TRY_AGAIN_LATER, details or "server busy"
                await self._first_request()
        self._abandon(reason)
        self.end(code, reason, flush=True)

    async def _first_request(self) -> None:
        """Return once the client has sent something (at most REFUSAL_GRACE): from now on
        its frames go nowhere, and the first says so. (A request is open in the bridge
        before its frames are handed on, so the refusal answers it.)"""
        if self.bridge.open_requests:
            return
        refused = self._pulled_by = _Refused()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFUSAL_GRACE):
                await refused.asked.wait()

    def _from_core_at_once(self, data: bytes, turn_ends: float) -> Batch | None:
        """A batch from the core taken at once, in the multiplexed stream's reader, while
        _core_to_client waits in read() with nothing unread (no wakeup, no task): its
        frames go to the client there and then, as _core_to_client would send them, so
        long as that needs no wait (the connection open, nothing queued or being written,
        within the write buffer's room) and the reader's turn lasts. The frame that finds
        no room waits in the queue (empty until then: it fits); what is left of the batch
        (None: nothing) is for _core_to_client, in order."""
        ws = self.ws
        if (
            self._ended.is_set()
            or self._writing
            or not self.outbound.empty()
            or not ws.can_send_now()
            or ws.loop.time() >= turn_ends
        ):
            return data
        room = self.config.ws_write_limit - ws.transport.get_write_buffer_size()
        try:
            message = session_pb2.ConnectBatchedResponse.FromString(data)
            frames = message.frames
            out: list[str | bytes] = []
            overflow: str | bytes | None = None
            taken, n = 0, len(frames)
            while taken < n:
                sent = self._from_core(frames[taken])
                taken += 1
                if sent is not None:
                    room -= len(sent) + 14  # as _send counts it
                    if room <= 0:
                        overflow = sent
                        break
                    out.append(sent)
                if self.bridge.auth_refused or ws.loop.time() >= turn_ends:
                    break
            if out and not ws.send_now(out):
                self._left()
            if overflow is not None:
                self.outbound.put_nowait(overflow)
        except Exception as e:  # as _task_done: a bug ends this connection, not the stream
            log.error("gateway: connection task failed", exc_info=e)
            self.end(CloseCode.INTERNAL_ERROR, "internal error")
            return None
        if self.bridge.auth_refused:
            self._refused()
            return None
        if taken == n:
            return None
        del frames[:taken]
        return message

    def _refused(self) -> None:
        """The core refused the session (-32001): what is queued goes, then the close."""
        self._abandon("auth required")
        self.end(CloseCode.POLICY_VIOLATION, "auth required", flush=True)

    def _from_core(self, frame: session_pb2.ServerFrame) -> str | bytes | None:
        """What one frame of the core's becomes for the client (None: nothing)."""
        if frame.HasField("voice_audio"):
            return self._audio(frame.voice_audio)
        text = self.bridge.from_core(frame)
        if self.bridge.authenticated and not self._full_size:
            self._full_size = True
            self.ws.protocol.max_message_size = self.config.ws_max_message_bytes
            self._authenticated.set()
        return text

    def _audio(self, audio: voice_pb2.VoiceAudio) -> bytes | None:
        """Speech for the client, as a CAR binary frame (never JSON)."""
        try:
            return audio_frames.encode(audio)
        except audio_frames.BinaryFrameError as e:
            log.warning("gateway: dropped an audio frame the core sent: %s", e)
            return None

    async def _send(self, messages: list[str | bytes]) -> None:
        """Send at once, in one write, while the client keeps up (no hop through the
        writer task); once it falls behind, queue behind what is already waiting."""
        # Texts are ASCII (json.dumps escapes the rest): len() is the payload's size, and a
        # frame header is at most 14 bytes. Below the write limit, sending never waits.
        room = self.config.ws_write_limit - self.ws.transport.get_write_buffer_size()
        size = sum(len(m) + 14 for m in messages)
        if self.outbound.empty() and not self._writing and size < room:
            if self.ws.can_send_now():  # no wait: see send_now
                if not self.ws.send_now(messages):
                    self._left()
                return
            try:
                await self.ws.send_all(messages)
            except ConnectionClosed:
                self._left()
        else:
            for message in messages:
                try:  # no coroutine a frame while it fits (a client behind, in a flood)
                    self.outbound.put_nowait(message)
                except asyncio.QueueFull:
                    await self._queue(message)
                if self._ended.is_set():
                    return

    def _abandon(self, reason: str) -> None:
        """Fail the client's open requests (the connection is ending: what does not fit
        in the queue is left out)."""
        for text in self.bridge.abandon(reason):
            with contextlib.suppress(asyncio.QueueFull):
                self.outbound.put_nowait(text)

    async def _write(self) -> None:
        """Send what waits in the queue: every message queued by then in one write (at
        most a write limit's worth, so that a write never waits long for room)."""
        queue, ws = self.outbound, self.ws
        while True:
            first = await queue.get()
            messages = [first, *queue.take_ready(batch.MAX_FRAMES - 1, self.config.ws_write_limit)]
            self._writing = True
            try:
                await ws.send_all(messages)
            except ConnectionClosed:
                self._left()
            finally:
                self._writing = False
                for _ in messages:
                    queue.task_done()

    async def _keepalive(self) -> None:
        interval, idle = self.config.ws_ping_interval, self.config.ws_idle_timeout
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + interval
        while True:
            silent_at = self.ws.last_activity + idle
            await asyncio.sleep(max(0.0, min(next_ping, silent_at) - loop.time()))
            now = loop.time()
            if now >= self.ws.last_activity + idle:
                self.end(CloseCode.GOING_AWAY, f"idle timeout: nothing received for {idle:g}s")
                return
            if now >= next_ping:
                next_ping = now + interval
                # ping() waits for room in the write buffer: never past the idle deadline.
                with contextlib.suppress(ConnectionClosed, ConcurrencyError, TimeoutError):
                    async with asyncio.timeout(self.ws.last_activity + idle - now):
                        await self.ws.ping()
