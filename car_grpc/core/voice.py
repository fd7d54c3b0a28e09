"""Voice sessions bridged to external speech engines (docs/protocol.md §7, voice.proto).

The server does no speech: it routes. A speech engine holds one ServeVoice stream (an
`Engine`) and serves named providers. A client opens a voice session for a provider; the
session belongs to that connection (its `owner`) and to the provider's engine, and lives
until the client stops it, the engine ends it, or either side goes away or stalls.

Each session has two bounded lanes:

- audio, owner -> engine: an EventBuffer (car_grpc.core.event_buffer) of PCM chunks that
  the session's audio pump writes to the engine's stream. While it is full, pushes wait in
  arrival order; an engine that takes nothing for `voice_stall_timeout` fails the waiting
  push and the session (and the write that blocks drops the engine).
- events, engine -> owner: a queue of ServerFrames (`voice.event`, TTS audio) that the
  session's event pump sends to the owner. Offering never waits, because one engine stream
  carries all of the engine's sessions: an owner that let `voice_event_queue` frames (or
  `voice_event_queue_bytes` of them) pile up loses its session, with an error event (one
  slot is kept for that last event).

A session ends once, in `Voice._end`, which queues the terminal event (when the owner is
still there to read it), tells the engine (unless the engine ended it) and lets the
session's sink know; the terminal event and the engine's notice go once the sink has
finished, so whoever learns of the end from them finds it stored. A meeting is such a
sink (car_grpc.core.meetings): each event first goes through `Sink.ingest`, then to the
owner untouched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import functools
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf import struct_pb2

from car_grpc.clock import now_ms
from car_grpc.core.background import Background
from car_grpc.core.event_buffer import EventBuffer, PutResult
from car_grpc.core.metrics import Metrics
from car_grpc.core.router import MessageStream, Reply, grpc_only, handles, handles_notification
from car_grpc.core.session import ClientSession, SessionClosed
from car_grpc.v1 import session_pb2, voice_pb2
from car_grpc.wire import batch, codec
from car_grpc.wire.errors import (
    INTERNAL,
    CarError,
    already_exists,
    field_error,
    invalid_params,
    require,
    resource_exhausted,
)
from car_grpc.wire.twins import fill_in, fill_out

log = logging.getLogger(__name__)

ServeVoiceResponse = voice_pb2.ServeVoiceResponse
VoiceAudio = voice_pb2.VoiceAudio

PCM = voice_pb2.AUDIO_FRAME_TYPE_PCM
PCM16LE = voice_pb2.AUDIO_FORMAT_PCM16LE
TTS_TYPES = frozenset(
    {
        voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK,
        voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL,
        voice_pb2.AUDIO_FRAME_TYPE_TTS_ERROR,
    }
)
DEFAULT_AUDIO_SOURCE = "client"
#: Bounds of an engine's registration.
MAX_PROVIDERS = 64
MAX_NAME = 128


# ------------------------------------------------------------------ pure helpers


def canonical_session_id(raw: str, name: str = "session_id") -> str:
    """A voice session id as 32 lowercase hex digits, from any spelling of a UUID."""
    try:
        return uuid.UUID(raw.strip()).hex
    except ValueError:
        raise field_error(name, "not a UUID") from None


def ended_event(reason: str) -> struct_pb2.Value:
    """The terminal event of a session that ended normally ("stopped" or "engine")."""
    return codec.to_value({"type": "ended", "reason": reason, "terminal": True})


def error_event(message: str, *, terminal: bool = True) -> struct_pb2.Value:
    """An error event: the session's terminal one, or a refused audio frame's."""
    event: dict[str, Any] = {"type": "error", "message": message}
    if terminal:
        event["terminal"] = True
    return codec.to_value(event)


def decode_pcm(pcm_b64: str, limit: int) -> bytes:
    """The PCM16LE bytes of a push's `pcm_b64`, or -32602 naming the field."""
    if not pcm_b64:
        raise field_error("pcm_b64")
    try:
        data = base64.b64decode(pcm_b64, validate=True)
    except (binascii.Error, ValueError):
        raise field_error("pcm_b64", "not base64") from None
    check_chunk(data, limit, "pcm_b64")
    return data


def check_chunk(data: bytes, limit: int, name: str) -> None:
    if not data:
        raise field_error(name, "empty audio")
    if len(data) % 2:
        raise field_error(name, f"PCM16LE needs an even number of bytes, got {len(data)}")
    if len(data) > limit:
        raise field_error(name, f"audio chunk of {len(data)} bytes is over {limit}")


def _keeps_up(event_queue: int) -> int:
    """The most events (or bytes of them) an owner may have queued for its session's
    audio to go on."""
    return event_queue // 4


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


def _refuse_audio(owner: ClientSession, raw_id: str, error: CarError) -> None:
    """A binary audio frame's refusal: an error event (not terminal) for its session id."""
    owner.try_send(_event_frame(raw_id, error_event(error.message, terminal=False)))


def _event_frame(session_id: str, event: struct_pb2.Value) -> session_pb2.ServerFrame:
    return session_pb2.ServerFrame(
        voice_event=voice_pb2.VoiceEventNotice(session_id=session_id, event=event)
    )


_EVENT_TAG = batch.varint(voice_pb2.VoiceEventNotice.EVENT_FIELD_NUMBER << 3 | 2)
_VOICE_EVENT_TAG = batch.varint(session_pb2.ServerFrame.VOICE_EVENT_FIELD_NUMBER << 3 | 2)
_VOICE_AUDIO_TAG = batch.varint(session_pb2.ServerFrame.VOICE_AUDIO_FIELD_NUMBER << 3 | 2)


def _notice_head(session_id: str) -> bytes:
    """A session's VoiceEventNotice without its event, serialized (twins derived)."""
    return fill_out(voice_pb2.VoiceEventNotice(session_id=session_id)).SerializeToString()


def _audio_head(session_id: str) -> bytes:
    """A session's PCM VoiceAudio for its engine without seq and data, serialized (twins
    derived)."""
    head = VoiceAudio(session_id=session_id, type=PCM, format=PCM16LE)
    return fill_out(head).SerializeToString()


_AUDIO_FIELD = batch.varint(ServeVoiceResponse.AUDIO_FIELD_NUMBER << 3 | 2)
_SEQ_FIELD = batch.varint(VoiceAudio.SEQ_FIELD_NUMBER << 3)
_DATA_FIELD = batch.varint(VoiceAudio.DATA_FIELD_NUMBER << 3 | 2)


def _audio_message(head: bytes, seq: int, data: bytes) -> bytes:
    """The serialized ServeVoiceResponse carrying chunk `seq` of a session's audio: the
    session's `head` (from _audio_head) with seq and data appended, so that neither a
    message is built nor the audio copied more than once."""
    fields = (head, _SEQ_FIELD, batch.varint(seq), _DATA_FIELD, batch.varint(len(data)), data)
    size = sum(map(len, fields))
    return b"".join((_AUDIO_FIELD, batch.varint(size), *fields))


def _event_bytes(head: bytes, event: struct_pb2.Value | bytes) -> bytes:
    """The serialized ServerFrame of a voice.event: the session's notice (`head`, from
    _notice_head) with the event (or the event serialized) appended, so that only the
    event is serialized, in one join."""
    raw = event if isinstance(event, bytes) else event.SerializeToString()
    event_size = batch.varint(len(raw))
    notice_size = len(head) + len(_EVENT_TAG) + len(event_size) + len(raw)
    return b"".join(
        (_VOICE_EVENT_TAG, batch.varint(notice_size), head, _EVENT_TAG, event_size, raw)
    )


# ------------------------------------------------------------------ sessions and engines


class Sink(Protocol):
    """Something a voice session's events pass through before they reach the owner."""

    async def ingest(self, session: VoiceSession, event: struct_pb2.Value) -> None: ...

    async def finish(self, session: VoiceSession, stopped: bool, reason: str) -> None:
        """The session ended (once): `stopped` when the client stopped it."""


class State(enum.Enum):
    OPENING = "opening"  # waiting for the engine's answer
    LIVE = "live"
    STOPPING = "stopping"  # the client stopped it; waiting for the engine's end
    ENDED = "ended"


@dataclass(eq=False)
class VoiceSession:
    id: str
    provider: str
    audio_source: str
    owner: ClientSession
    engine: Engine
    #: Serialized ServeVoiceResponses (the audio, then `stop`) for the engine.
    audio: EventBuffer[bytes]
    #: (serialized frame, last) towards the owner; sized voice_event_queue + 1 (the
    #: terminal event).
    events: asyncio.Queue[tuple[bytes, bool]]
    answered: asyncio.Future[str | None]  # the engine's answer: None, or its refusal
    engine_end: asyncio.Future[str | None]  # the engine's end: None, or its error
    meeting_id: str | None = None
    sink: Sink | None = None
    started_at: int = field(default_factory=now_ms)
    state: State = State.OPENING
    end_reason: str = ""
    chunks_in: int = 0
    events_out: int = 0
    #: The size of the frames in `events` (bounded by voice_event_queue_bytes).
    events_bytes: int = 0
    terminal_queued: bool = False
    #: Set while the owner's queue of events holds at most a quarter of voice_event_queue
    #: (and of voice_event_queue_bytes):
    #: only then does the audio pump hand the engine more audio (_pump_audio).
    owner_keeps_up: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))
    #: With an engine that acknowledges audio (Engine.acknowledges_audio): the messages of
    #: audio handed to the engine, and the chunks it has taken (its last `taken` seq + 1).
    chunks_sent: int = 0
    chunks_taken: int = 0
    #: The engine's answers (frames towards the owner, and their bytes) since its last
    #: `taken`, and the most per chunk taken it has sent so far (0: nothing taken yet).
    answers: int = 0
    answer_bytes: int = 0
    answers_per_chunk: int = 0
    answer_bytes_per_chunk: int = 0
    #: Cleared while the audio pump waits for the engine's `taken`; set again by one that
    #: takes audio in flight, or by the session's end.
    engine_took: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))
    #: Audio to the engine. Never cancelled (it may be inside a write): once the session
    #: ends, its buffer is discarded and its writes are skipped, so it returns by itself.
    audio_pump: asyncio.Task[None] | None = None
    #: Events to the owner.
    event_pump: asyncio.Task[None] | None = None
    #: The event pump holds a frame it has not yet handed to the owner's queue.
    pumping: bool = False
    finished: asyncio.Task[None] | None = None  # the sink's finish
    #: The session's VoiceEventNotice without the event (_event_bytes), and VoiceAudio
    #: without its audio (_audio_message), serialized.
    notice_head: bytes = b""
    audio_head: bytes = b""

    def info(self) -> voice_pb2.VoiceSession:
        out = voice_pb2.VoiceSession(
            session_id=self.id,
            provider=self.provider,
            audio_source=self.audio_source,
            engine=self.engine.name,
            started_at=self.started_at,
            chunks_in=self.chunks_in,
            events_out=self.events_out,
        )
        if self.meeting_id is not None:
            out.meeting_id = self.meeting_id
        return out


#: A message on its way to an engine (a serialized ServeVoiceResponse): its session, and
#: the future of the send it ends.
_Queued = tuple[bytes, VoiceSession | None, asyncio.Future[bool] | None]


class Engine:
    """One ServeVoice (or ServeVoiceBatched) stream: its providers, its sessions and the
    one way to write to it.

    Every message goes through one writer task, in the order sent. On a batched stream the
    writer sends everything queued when it gets to write in one gRPC message (at most
    batch.MAX_FRAMES messages and batch.MAX_BYTES, a larger message alone): what is sent
    while a write is under way goes in the next one, with no timer. A sender waits until
    its messages are written, so the queue holds at most what its senders hand in: a
    session's audio pump (one batch of its audio buffer at a time), an open or a close
    notice per session.
    """

    def __init__(
        self,
        name: str,
        providers: list[str],
        stream: MessageStream,
        stall_timeout: float,
        *,
        batched: bool = False,
        acknowledges_audio: bool = False,
    ) -> None:
        self.name = name
        self.providers = providers
        self.stream = stream
        self.stall_timeout = stall_timeout
        self.batched = batched
        #: The engine sends `taken` for its sessions' audio (VoiceAudioTaken): each
        #: session's audio in flight is then bounded by its owner's room (_audio_room).
        self.acknowledges_audio = acknowledges_audio
        self.sessions: dict[str, VoiceSession] = {}
        #: Messages waiting for the writer: (message, its session, the future of the
        #: send it ends, if it is the last of one).
        self._queued: deque[_Queued] = deque()
        self._ready = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.gone = False
        #: Set when the stream must end; `failure` says how, if it is the server's doing.
        self.done = asyncio.Event()
        self.failure: CarError | None = None

    async def send(self, message: ServeVoiceResponse) -> bool:
        """Write one message; see send_all."""
        return await self.send_all((fill_out(message).SerializeToString(),))

    async def send_all(
        self, messages: Sequence[bytes], session: VoiceSession | None = None
    ) -> bool:
        """Write messages after everything sent before, and wait until they are written;
        False when the engine is gone (or stalled now and dropped). Messages for
        `session` are skipped once that session has ended."""
        if self.gone or not messages:
            return not self.gone
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        last = len(messages) - 1
        self._queued.extend(
            (message, session, written if i == last else None) for i, message in enumerate(messages)
        )
        self._ready.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())
        return await written

    async def _write_loop(self) -> None:
        queued = self._queued
        written: list[asyncio.Future[bool]] = []
        try:
            while not self.gone:
                if not queued:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                messages, written = self._take()
                if messages and not await self._write(messages):
                    return
                for future in written:
                    if not future.done():
                        future.set_result(True)
                written = []
        finally:
            # Gone (or cancelled with the stream): every sender still waiting gets False.
            written += [future for _, _, future in queued if future is not None]
            queued.clear()
            for future in written:
                if not future.done():
                    future.set_result(False)

    def _take(self) -> tuple[list[bytes], list[asyncio.Future[bool]]]:
        """The next write's messages (one, on a ServeVoice stream) and the futures of the
        sends they end; messages of ended sessions are left out."""
        queued = self._queued
        messages: list[bytes] = []
        written: list[asyncio.Future[bool]] = []
        size = 0
        limit = batch.MAX_FRAMES if self.batched else 1
        while queued and len(messages) < limit:
            message, session, future = queued[0]
            if session is None or session.state is not State.ENDED:
                size += len(message)
                if messages and size > batch.MAX_BYTES:
                    break
                messages.append(message)
            queued.popleft()
            if future is not None:
                written.append(future)
        return messages, written

    async def _write(self, messages: list[bytes]) -> bool:
        # A ServeVoiceBatchedResponse is its messages as field 1, as a session batch is.
        out = batch.encode(messages) if self.batched else messages[0]
        try:
            async with asyncio.timeout(self.stall_timeout):
                await self.stream.write(out)
        except TimeoutError:
            self.fail(
                resource_exhausted(
                    f"voice engine '{self.name}' not reading: a message waited "
                    f"{self.stall_timeout:g}s"
                )
            )
            return False
        except Exception as e:  # the call ended under us
            log.debug("voice engine %s: write failed: %r", self.name, e)
            self.close()
            return False
        return True

    def fail(self, error: CarError) -> None:
        """End the engine's stream with `error` (the first failure wins)."""
        if self.failure is None and not self.gone:
            self.failure = error
        self.close()

    def close(self) -> None:
        """The stream ends: nothing more is written, waiting senders get False."""
        self.gone = True
        self.done.set()
        self._ready.set()  # a waiting writer sees it and lets its senders go
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()  # it may be inside a write that never ends


class EngineMessages:
    """An engine's messages one at a time, from a ServeVoice stream or a batched one, as
    parsed: the stream's handler fills in their twins (router.grpc_only `fills_in`),
    `next` every message's, `Voice._from_engine` the rest (its hot messages, audio and
    events, without the walk of each)."""

    def __init__(self, stream: MessageStream, batched: bool) -> None:
        self._stream = stream
        self._batched = batched
        self._pending: deque[voice_pb2.ServeVoiceRequest] = deque()

    async def next(self) -> voice_pb2.ServeVoiceRequest | None:
        """The next message; None once the engine has finished sending. A batch of more
        than batch.MAX_FRAMES messages: -32602 (INVALID_ARGUMENT)."""
        while not self._pending:
            if not await self._read():
                return None
        return fill_in(self._pending.popleft())

    async def next_many(self) -> list[voice_pb2.ServeVoiceRequest]:
        """Every message read and not taken yet, reading if there is none (the rest of a
        batch, or the next one); [] once the engine has finished sending."""
        while not self._pending:
            if not await self._read():
                return []
        messages = list(self._pending)
        self._pending.clear()
        return messages

    async def _read(self) -> bool:
        message = await self._stream.read()
        if message is None:
            return False
        if not self._batched:
            assert isinstance(message, voice_pb2.ServeVoiceRequest)
            self._pending.append(message)
            return True
        assert isinstance(message, voice_pb2.ServeVoiceBatchedRequest)
        if len(message.messages) > batch.MAX_FRAMES:
            raise invalid_params(
                f"a batch holds at most {batch.MAX_FRAMES} messages, got {len(message.messages)}"
            )
        self._pending.extend(message.messages)
        return True


# ------------------------------------------------------------------ the domain


@dataclass(frozen=True)
class VoiceLimits:
    """Config's voice fields (README: voice sessions): queues per session, how long an
    engine or an owner may stall, ack waits, chunk size and sessions per client."""

    audio_queue: int
    event_queue: int
    audio_queue_bytes: int
    event_queue_bytes: int
    stall_timeout: float
    ack_timeout: float
    max_chunk_bytes: int
    sessions_per_client: int


class Voice:
    """Engines by provider, voice sessions by id and by owner."""

    def __init__(self, limits: VoiceLimits, metrics: Metrics) -> None:
        self.limits = limits
        self._metrics = metrics
        self.providers: dict[str, Engine] = {}
        self.sessions: dict[str, VoiceSession] = {}
        #: owner session id -> its voice sessions. The key stays while the owner lives: it
        #: marks the close hook as registered.
        self._by_owner: dict[str, dict[str, VoiceSession]] = {}
        self._engine_numbers = itertools.count(1)
        #: Background work (close notices to engines, sink finishes), awaited at shutdown.
        self._background = Background(log)

    # -------------------------------------------------------------- opening

    def provider_for(self, name: str | None) -> tuple[str, Engine]:
        """The provider to use and its engine; -32603 when no engine serves it."""
        if not name:
            if len(self.providers) == 1:
                name = next(iter(self.providers))
            elif not self.providers:
                raise CarError(INTERNAL, "no voice engine is connected")
            else:
                names = ", ".join(sorted(self.providers))
                raise field_error("provider", f"several providers ({names}): name one")
        engine = self.providers.get(name)
        if engine is None:
            raise CarError(INTERNAL, f"no voice engine serves provider '{name}'")
        return name, engine

    def new_session_id(self, raw: str | None) -> str:
        """The id for a new voice session: `raw` (any UUID spelling), or a fresh one."""
        session_id = uuid.uuid4().hex if raw is None else canonical_session_id(raw)
        if session_id in self.sessions:
            raise invalid_params(f"invalid params: voice session '{session_id}' already exists")
        return session_id

    async def open(
        self,
        owner: ClientSession,
        *,
        session_id: str,
        provider: str,
        audio_source: str,
        options: struct_pb2.Struct,
        meeting_id: str | None = None,
        sink: Sink | None = None,
    ) -> VoiceSession:
        """Open a session for `owner` and wait for its engine to accept it. The session's
        pumps start with `run` (once the client has its answer)."""
        if not owner.streaming:
            raise CarError(
                INTERNAL,
                "voice sessions need a session stream: call on Connect, or bind the typed "
                "call to one with car-session-id",
            )
        if owner.closed.is_set():  # its close hooks have run: nothing would end the session
            raise CarError(INTERNAL, "the session stream has ended")
        if session_id in self.sessions:
            raise invalid_params(f"invalid params: voice session '{session_id}' already exists")
        mine = self._owned_by(owner)
        limit = self.limits.sessions_per_client
        if len(mine) >= limit:
            raise CarError(INTERNAL, f"too many voice sessions: at most {limit} per connection")
        _, engine = self.provider_for(provider)
        loop = asyncio.get_running_loop()
        vs = VoiceSession(
            id=session_id,
            provider=provider,
            audio_source=audio_source,
            owner=owner,
            engine=engine,
            audio=EventBuffer(
                self.limits.audio_queue,
                self.limits.stall_timeout,
                limit_bytes=self.limits.audio_queue_bytes,
            ),
            events=asyncio.Queue(self.limits.event_queue + 1),
            answered=loop.create_future(),
            engine_end=loop.create_future(),
            meeting_id=meeting_id,
            sink=sink,
            notice_head=_notice_head(session_id),
            audio_head=_audio_head(session_id),
        )
        self.sessions[vs.id] = mine[vs.id] = engine.sessions[vs.id] = vs
        opening = voice_pb2.OpenVoiceSession(
            session_id=vs.id, provider=provider, audio_source=audio_source, options=options
        )
        if meeting_id is not None:
            opening.meeting_id = meeting_id
        refusal: str | None = f"voice engine '{engine.name}' is gone"
        ack = self.limits.ack_timeout
        try:
            if await engine.send(ServeVoiceResponse(open=opening)):
                async with asyncio.timeout(ack):
                    refusal = await asyncio.shield(vs.answered)
        except TimeoutError:
            self._end(vs, None, "the engine did not answer")
            raise CarError(
                INTERNAL, f"voice engine '{engine.name}' did not answer within {ack:g}s"
            ) from None
        except BaseException:  # the start was cancelled: leave nothing half-open
            self._end(vs, None, "the start was cancelled")
            raise
        if vs.state is State.ENDED:
            raise CarError(INTERNAL, f"voice session ended before it started: {vs.end_reason}")
        if refusal is not None:
            self._end(vs, None, refusal, tell_engine=False)
            raise CarError(INTERNAL, f"voice engine '{engine.name}' refused the session: {refusal}")
        vs.state = State.LIVE
        return vs

    def run(self, vs: VoiceSession) -> None:
        """Start the session's pumps (after the client has its start answer)."""
        if vs.state is not State.ENDED:
            vs.audio_pump = asyncio.create_task(self._pump_audio(vs))
        if vs.state is not State.ENDED or vs.terminal_queued:
            vs.event_pump = asyncio.create_task(self._pump_events(vs))

    def _owned_by(self, owner: ClientSession) -> dict[str, VoiceSession]:
        mine = self._by_owner.get(owner.id)
        if mine is None:
            mine = self._by_owner[owner.id] = {}
            owner.on_close(self._owner_closed)
        return mine

    def owned(self, owner: ClientSession, raw_id: str) -> VoiceSession:
        """The owner's voice session with that id; -32602 for any other id (unknown or
        another connection's: the same answer, so no existence oracle)."""
        mine = self._by_owner.get(owner.id)
        if mine is not None and (vs := mine.get(raw_id)) is not None:
            return vs  # the canonical spelling (a binary frame's): nothing to parse
        require(raw_id, "session_id")
        try:
            session_id = uuid.UUID(raw_id.strip()).hex
        except ValueError:
            session_id = raw_id
        vs = (mine or {}).get(session_id)
        if vs is None:
            raise invalid_params(f"invalid params: unknown voice session '{raw_id}'")
        return vs

    # -------------------------------------------------------------- audio in

    async def push(self, owner: ClientSession, raw_id: str, data: bytes) -> int:
        """Queue one PCM chunk for the engine, after every earlier one; its seq."""
        vs, seq, offered = self._offer_audio(owner, raw_id, data)
        if not isinstance(offered, PutResult):
            offered = await vs.audio.admitted(offered)
        self._pushed(vs, offered)
        return seq

    def _offer_audio(
        self, owner: ClientSession, raw_id: str, data: bytes
    ) -> tuple[VoiceSession, int, PutResult | asyncio.Future[PutResult]]:
        """A push's first step, which never waits: the chunk gets its seq and its place
        in the session's audio (queued, or in line: then the future to wait on)."""
        vs = self.owned(owner, raw_id)
        if vs.state is State.STOPPING:
            raise invalid_params(f"invalid params: voice session '{vs.id}' is stopping")
        seq = vs.chunks_in
        vs.chunks_in += 1
        message = _audio_message(vs.audio_head, seq, data)
        return vs, seq, vs.audio.offer(message, len(message))

    def _pushed(self, vs: VoiceSession, result: PutResult) -> None:
        """A push's outcome: a stalled wait ends the session; -32603 unless queued."""
        if result is PutResult.STALLED:
            stall = self.limits.stall_timeout
            message = f"voice engine '{vs.engine.name}' took no audio for {stall:g}s"
            if not vs.owner_keeps_up.is_set():  # the audio waited for the owner
                message = f"client not reading: its voice events stalled the audio for {stall:g}s"
            self._end(vs, error_event(message), message)
        if result is not PutResult.QUEUED:
            raise CarError(INTERNAL, f"voice session '{vs.id}' ended: {vs.end_reason}")

    async def _pump_audio(self, vs: VoiceSession) -> None:
        """The session's audio to its engine: what is queued when the engine takes the
        last batch goes in one send (one gRPC message, on a batched stream).

        Audio makes events, so none goes to the engine while the owner has more than a
        quarter of voice_event_queue (or of voice_event_queue_bytes) still to take, and at
        most a sixteenth of voice_event_queue at a time (a quarter, within _audio_room,
        to an engine that acknowledges audio): a client that pushes audio
        faster than it reads what comes back is slowed down (its pushes wait in the audio
        queue) rather than losing its session when the engine's answers pile up. The
        engine's answers to audio it already has still count: with an engine that
        acknowledges audio, only what they fit goes (_audio_room); with another one, an
        engine that answers several sends behind can still fill the queue."""
        keeps_up = _keeps_up(self.limits.event_queue)
        keeps_up_bytes = _keeps_up(self.limits.event_queue_bytes)
        most = max(1, min(batch.MAX_FRAMES, self.limits.event_queue // 16))
        # An engine's `taken` bounds its answers in flight (_audio_room): then up to a
        # quarter of voice_event_queue a message (bench/README.md, `voice4`: fewer gRPC
        # messages a chunk, about 0.75x the server's CPU a chunk against a sixteenth).
        most_taken = max(1, min(batch.MAX_FRAMES, self.limits.event_queue // 4))
        # One at a time on ServeVoice: each write starts as the chunk leaves the queue,
        # so the queue's stall clock and the write's run together.
        if not vs.engine.batched:
            most = most_taken = 1
        bounded = vs.engine.acknowledges_audio
        while True:
            if vs.events.qsize() > keeps_up or vs.events_bytes > keeps_up_bytes:
                vs.owner_keeps_up.clear()
                await vs.owner_keeps_up.wait()  # set again by the event pump, or _end
                continue
            count = self._audio_room(vs, most, most_taken) if bounded else most
            if count == 0 and vs.state is not State.ENDED:
                vs.engine_took.clear()
                await vs.engine_took.wait()  # set again by a `taken`, or _end
                continue
            messages = await vs.audio.get_many(max(count, 1))
            if not messages:
                return
            # (The last message may be `stop`, after every chunk: never counted as one.)
            vs.chunks_sent = min(vs.chunks_sent + len(messages), vs.chunks_in)
            if not await vs.engine.send_all(messages, vs):
                return  # the engine is gone: its teardown ends the session

    def _audio_room(self, vs: VoiceSession, first: int, most: int) -> int:
        """How many more messages of audio (at most `most`) may go to an engine that
        acknowledges audio: with the audio in flight, they may make at most as many
        answers (events and bytes, at the most per chunk the engine has answered so far)
        as fit three quarters of the owner's queue besides what is queued. Before the
        engine's first `taken`, `first` at a time; never none when nothing is in flight."""
        in_flight = vs.chunks_sent - vs.chunks_taken
        if vs.answers_per_chunk == 0:
            return first if in_flight == 0 else 0
        room = self.limits.event_queue - _keeps_up(self.limits.event_queue) - vs.events.qsize()
        room_bytes = self.limits.event_queue_bytes - _keeps_up(self.limits.event_queue_bytes)
        room_bytes -= vs.events_bytes
        count = min(
            most,
            room // vs.answers_per_chunk - in_flight,
            room_bytes // vs.answer_bytes_per_chunk - in_flight,
        )
        return max(count, 1 if in_flight == 0 else 0)

    def _engine_took(self, vs: VoiceSession, seq: int) -> None:
        """The engine's `taken`: its answers since the last one were to these chunks. A
        seq not above the last taken, or never sent, is ignored (voice.proto
        VoiceAudioTaken): it holds nothing and costs a comparison."""
        taken = seq + 1
        if not vs.chunks_taken < taken <= vs.chunks_sent:
            return  # stale or repeated, or audio never sent (maybe late: an earlier
            # session of the same id, whose close the engine had not read yet)
        chunks = taken - vs.chunks_taken
        vs.answers_per_chunk = max(vs.answers_per_chunk, 1, -(-vs.answers // chunks))
        per_chunk_bytes = -(-vs.answer_bytes // chunks)
        vs.answer_bytes_per_chunk = max(vs.answer_bytes_per_chunk, 1, per_chunk_bytes)
        vs.answers = vs.answer_bytes = 0
        vs.chunks_taken = taken
        vs.engine_took.set()

    # -------------------------------------------------------------- events out

    async def deliver_event(self, vs: VoiceSession, event: struct_pb2.Value) -> bool:
        """Ingest the event into the session's sink, then forward it untouched to the owner."""
        if not self._event_fits(vs, event.ByteSize()):
            return False
        if vs.sink is not None:
            try:
                await vs.sink.ingest(vs, event)
            except Exception:
                log.exception("voice session %s: the sink failed to ingest an event", vs.id)
        return self._offer(vs, _event_bytes(vs.notice_head, event))

    def _event_fits(self, vs: VoiceSession, size: int) -> bool:
        """Whether an event of `size` bytes (serialized) may go on: its session is not
        over, and it is within the size bound (else the session ends)."""
        if vs.state is State.ENDED:
            return False
        if size > self.limits.max_chunk_bytes:
            limit = self.limits.max_chunk_bytes
            message = f"voice event of {size} bytes is over {limit}"
            self._end(vs, error_event(message), message)
            return False
        return True

    def deliver_speech(self, vs: VoiceSession, audio: VoiceAudio) -> bool:
        """Forward the engine's synthesized speech to the owner (a binary frame)."""
        problem = ""
        limit = self.limits.max_chunk_bytes
        if audio.type not in TTS_TYPES:
            problem = "audio from an engine must be TTS_CHUNK, TTS_FINAL or TTS_ERROR"
        # ByteSize (the audio's size and a few bytes) first: it does not copy the audio.
        elif audio.ByteSize() > limit and len(audio.data) > limit:
            problem = f"a speech chunk of {len(audio.data)} bytes is over {limit}"
        if problem:
            message = f"voice engine '{vs.engine.name}' sent invalid audio: {problem}"
            self._end(vs, error_event(message), message)
            return False
        # As the engine sent it, with the session's id and its twin (the engine may have
        # set either: it was found by one); a TTS chunk without a format is PCM16LE.
        if audio.session_id != vs.id:
            audio.session_id = vs.id
        if audio.voice_session_id != vs.id:
            audio.voice_session_id = vs.id
        if audio.type == voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK and not audio.format:
            audio.format = PCM16LE
        return self._offer(vs, batch.member_frame(_VOICE_AUDIO_TAG, audio.SerializeToString()))

    def _offer(self, vs: VoiceSession, frame: bytes) -> bool:
        if vs.state is State.ENDED:
            return False
        vs.answers += 1  # counted against the engine's next `taken` (_audio_room)
        vs.answer_bytes += len(frame)
        queued = vs.events_bytes
        if vs.events.qsize() >= self.limits.event_queue or (
            queued and queued + len(frame) > self.limits.event_queue_bytes
        ):
            self._owner_not_reading(vs)
            return False
        if vs.event_pump is not None and not vs.pumping and vs.events.empty():
            # Nothing of the session's is on its way to the owner: straight into the owner's
            # queue while it has room (no hop through the pump).
            with contextlib.suppress(asyncio.QueueFull):
                vs.owner.outbound.put_nowait(frame)
                vs.events_out += 1
                return True
        vs.events.put_nowait((frame, False))
        vs.events_bytes += len(frame)
        return True

    def _owner_not_reading(self, vs: VoiceSession) -> None:
        """One more event would pass the owner's bound in events or bytes (one larger
        event passes alone): the session ends."""
        self._metrics.queue_drops.inc("voice_events")
        limit = self.limits.event_queue
        if vs.events.qsize() >= limit:
            message = f"client not reading: {limit} voice events queued"
        else:
            queued, limit_bytes = vs.events_bytes, self.limits.event_queue_bytes
            message = f"client not reading: {queued} bytes of voice events queued"
            message += f" (at most {limit_bytes})"
        self._end(vs, error_event(message), message)

    async def _pump_events(self, vs: VoiceSession) -> None:
        keeps_up = _keeps_up(self.limits.event_queue)
        keeps_up_bytes = _keeps_up(self.limits.event_queue_bytes)
        with contextlib.suppress(SessionClosed):
            while True:
                frame, last = await vs.events.get()
                vs.events_bytes -= len(frame)
                vs.pumping = True
                if last:
                    await self._sink_finished(vs)
                await vs.owner.send(frame)
                vs.pumping = False
                vs.events_out += 1
                if last:
                    return
                if vs.events.qsize() <= keeps_up and vs.events_bytes <= keeps_up_bytes:
                    vs.owner_keeps_up.set()

    # -------------------------------------------------------------- ending

    async def stop(self, vs: VoiceSession) -> bool:
        """The client's stop: the engine gets the audio so far, then `stop`, and has
        voice_ack_timeout to send its last events and `end`. Returns once the owner has
        every event queued (and the sink has finished); True when the engine confirmed."""
        if vs.state is State.OPENING:
            raise invalid_params(f"invalid params: voice session '{vs.id}' is not started yet")
        if vs.state is not State.LIVE:
            raise invalid_params(f"invalid params: voice session '{vs.id}' is already stopping")
        vs.state = State.STOPPING
        stop = ServeVoiceResponse(stop=voice_pb2.StopVoiceSession(session_id=vs.id))
        vs.audio.close(fill_out(stop).SerializeToString())
        ack = self.limits.ack_timeout
        confirmed = False
        try:
            # The stop waits behind the queued audio: allow for a slow (not stalled) engine.
            async with asyncio.timeout(ack + self.limits.stall_timeout):
                error = await asyncio.shield(vs.engine_end)
            confirmed = vs.state is State.STOPPING
        except TimeoutError:
            message = f"voice engine '{vs.engine.name}' did not end the session in time"
            self._end(vs, error_event(message), message, stopped=True)
        if confirmed:
            terminal = ended_event("stopped") if error is None else error_event(error)
            self._end(vs, terminal, "stopped", stopped=True, tell_engine=False)
        await self._settled(vs)
        return confirmed

    async def _settled(self, vs: VoiceSession) -> None:
        """Wait (bounded) until the owner has the session's events and the sink is done."""
        waits = [t for t in (vs.event_pump, vs.finished) if t is not None and not t.done()]
        if waits:
            await asyncio.wait(waits, timeout=self.limits.stall_timeout)

    def _engine_ended(self, vs: VoiceSession, error: str | None) -> None:
        if vs.state is State.STOPPING:
            vs.engine.sessions.pop(vs.id, None)  # nothing more from the engine counts
            if not vs.engine_end.done():
                vs.engine_end.set_result(error)
            return
        terminal = ended_event("engine") if error is None else error_event(error)
        self._end(vs, terminal, error or "ended by the engine", tell_engine=False)

    def _end(
        self,
        vs: VoiceSession,
        terminal: struct_pb2.Value | None,
        reason: str,
        *,
        stopped: bool = False,
        tell_engine: bool = True,
    ) -> None:
        """End a session once: `terminal` is the owner's last event (None: the owner is
        gone, or the start fails instead)."""
        if vs.state is State.ENDED:
            return
        started = vs.state is not State.OPENING
        vs.state, vs.end_reason = State.ENDED, reason
        self.sessions.pop(vs.id, None)
        vs.engine.sessions.pop(vs.id, None)
        self._by_owner.get(vs.owner.id, {}).pop(vs.id, None)
        for future in (vs.answered, vs.engine_end):
            if not future.done():
                future.set_result(reason)
        vs.audio.discard()
        vs.owner_keeps_up.set()  # the audio pump sees the end
        vs.engine_took.set()
        if terminal is not None and started:
            last = _event_bytes(vs.notice_head, terminal)
            vs.events.put_nowait((last, True))  # kept slot
            vs.events_bytes += len(last)
            vs.terminal_queued = True
        elif vs.event_pump is not None:
            vs.event_pump.cancel()
        if vs.sink is not None and started:
            vs.finished = self._background.spawn(vs.sink.finish(vs, stopped, reason))
        if tell_engine and not vs.engine.gone:
            self._background.spawn(self._tell_engine_closed(vs, reason))
        log.debug("voice session %s ended: %s", vs.id, reason)

    async def _sink_finished(self, vs: VoiceSession) -> None:
        """Wait (bounded) for the sink to have the end. Whatever reveals the end (the
        engine's close notice, the owner's terminal event) waits for it, so a reader who
        learns of the end from them finds it stored (a meeting not still `live`)."""
        if vs.finished is not None and not vs.finished.done():
            await asyncio.wait((vs.finished,), timeout=self.limits.stall_timeout)

    async def _tell_engine_closed(self, vs: VoiceSession, reason: str) -> None:
        await self._sink_finished(vs)
        closed = voice_pb2.CloseVoiceSession(session_id=vs.id, reason=reason)
        await vs.engine.send(ServeVoiceResponse(closed=closed))

    def _owner_closed(self, owner: ClientSession) -> None:
        for vs in list(self._by_owner.pop(owner.id, {}).values()):
            self._end(vs, None, "client disconnected")

    # -------------------------------------------------------------- the engine stream

    async def serve(self, stream: MessageStream, *, batched: bool = False) -> None:
        """Run one engine's ServeVoice (or ServeVoiceBatched) stream until it ends; raises
        CarError when the server ends it (a bad message, a stalled engine)."""
        messages = EngineMessages(stream, batched)
        engine = await self._register(stream, messages, batched)
        if engine is None:
            return
        reader = asyncio.create_task(self._read_engine(engine, messages))
        try:
            await engine.done.wait()
        finally:
            reader.cancel()
            engine.close()
            for provider in engine.providers:
                if self.providers.get(provider) is engine:
                    del self.providers[provider]
            reason = (
                engine.failure.message
                if engine.failure
                else f"voice engine '{engine.name}' disconnected"
            )
            for vs in list(engine.sessions.values()):
                self._end(vs, error_event(reason), reason, tell_engine=False)
            log.info("voice engine %s gone: %s", engine.name, reason)
        if engine.failure is not None:
            raise engine.failure

    async def _register(
        self, stream: MessageStream, messages: EngineMessages, batched: bool
    ) -> Engine | None:
        ack = self.limits.ack_timeout
        try:
            async with asyncio.timeout(ack):
                first = await messages.next()
        except TimeoutError:
            raise invalid_params(f"register within {ack:g}s of connecting") from None
        if first is None:
            return None
        if first.WhichOneof("body") != "register":
            raise invalid_params("the first message must be `register`")
        providers = list(dict.fromkeys(p.strip() for p in first.register.providers))
        if not providers or not all(0 < len(p) <= MAX_NAME for p in providers):
            raise invalid_params(f"register needs provider names of 1 to {MAX_NAME} characters")
        if len(providers) > MAX_PROVIDERS:
            raise invalid_params(f"an engine serves at most {MAX_PROVIDERS} providers")
        for provider in providers:
            if (other := self.providers.get(provider)) is not None:
                raise already_exists(
                    f"provider '{provider}' is served by voice engine '{other.name}'"
                )
        name = first.register.engine[:MAX_NAME] or f"engine-{next(self._engine_numbers)}"
        engine = Engine(
            name,
            providers,
            stream,
            self.limits.stall_timeout,
            batched=batched,
            acknowledges_audio=first.register.acknowledges_audio,
        )
        for provider in providers:
            self.providers[provider] = engine
        registered = voice_pb2.VoiceEngineRegistered(engine=name, providers=providers)
        await engine.send(ServeVoiceResponse(registered=registered))
        log.info("voice engine %s serves %s", name, ", ".join(providers))
        return engine

    async def _read_engine(self, engine: Engine, messages: EngineMessages) -> None:
        try:
            while read := await messages.next_many():
                for message in read:
                    if engine.gone:
                        return
                    if (rest := self._from_engine(engine, message)) is not None:
                        await rest
        except asyncio.CancelledError:
            raise
        except CarError as e:
            engine.fail(e)
        except Exception:
            log.exception("voice engine %s: reading its stream failed", engine.name)
        finally:
            engine.done.set()

    def _from_engine(
        self, engine: Engine, message: voice_pb2.ServeVoiceRequest
    ) -> Awaitable[bool] | None:
        """Take one message of the engine's (as parsed: EngineMessages) at once; what is
        left to wait for (an event going through its session's sink first), or None."""
        body = message.WhichOneof("body")
        if body == "register":
            engine.fail(invalid_params("register may be sent only once"))
            return None
        if body is None:
            return None
        if body == "taken" and not engine.acknowledges_audio:
            engine.fail(invalid_params("`taken` needs acknowledges_audio in register"))
            return None
        part = getattr(message, body)
        if body == "audio" or body == "event":
            # Their twin is the session id alone, which fill_in would put in place of an
            # empty one (deliver_speech sets both on the speech it passes on).
            session_id = part.session_id or part.voice_session_id
        else:
            session_id = fill_in(part).session_id
        vs = engine.sessions.get(session_id)
        if vs is None:
            return None  # ended (or never this engine's): later messages for it are dropped
        if body == "answer":
            if not vs.answered.done():
                vs.answered.set_result(part.error if part.HasField("error") else None)
        elif body == "event":
            if vs.sink is not None:
                return self.deliver_event(vs, part.event)
            event = part.event.SerializeToString()
            if self._event_fits(vs, len(event)):
                self._offer(vs, _event_bytes(vs.notice_head, event))
        elif body == "audio":
            self.deliver_speech(vs, part)
        elif body == "end":
            self._engine_ended(vs, part.error if part.HasField("error") else None)
        elif body == "taken":
            self._engine_took(vs, part.seq)
        return None

    # -------------------------------------------------------------- listings and life

    def list_sessions(self, session: ClientSession) -> list[voice_pb2.VoiceSession]:
        """The caller's sessions (every session for the host role), oldest first."""
        if session.is_host:
            mine = list(self.sessions.values())
        else:
            mine = list(self._by_owner.get(session.id, {}).values())
        return [vs.info() for vs in sorted(mine, key=lambda vs: vs.started_at)]

    def list_providers(self) -> list[voice_pb2.VoiceProvider]:
        return [
            voice_pb2.VoiceProvider(
                name=name,
                engine=engine.name,
                sessions=sum(vs.provider == name for vs in engine.sessions.values()),
            )
            for name, engine in sorted(self.providers.items())
        ]

    async def shutdown(self) -> None:
        """Let the sinks finish (their store writes) before the store closes."""
        for vs in list(self.sessions.values()):
            self._end(vs, None, "server stopped", tell_engine=False)
        await self._background.drain(self.limits.ack_timeout)

    # ------------------------------------------------------------ handlers

    @handles("voice_transcribe_stream_start")
    async def transcribe_stream_start(
        self, session: ClientSession, req: voice_pb2.StartTranscribeStreamRequest
    ) -> Reply:
        session_id = self.new_session_id(req.session_id or None)
        provider, _ = self.provider_for(req.provider or None)
        audio_source = req.audio_source or DEFAULT_AUDIO_SOURCE
        vs = await self.open(
            session,
            session_id=session_id,
            provider=provider,
            audio_source=audio_source,
            options=req.options,
        )
        answer = voice_pb2.StartTranscribeStreamResponse(
            session_id=vs.id, provider=provider, audio_source=audio_source
        )
        return Reply(answer, lambda: self.run(vs))

    @handles("voice_transcribe_stream_push")
    async def transcribe_stream_push(
        self, session: ClientSession, req: voice_pb2.PushTranscribeAudioRequest
    ) -> voice_pb2.PushTranscribeAudioResponse:
        vs = self.owned(session, req.session_id)
        data = decode_pcm(req.pcm_b64, self.limits.max_chunk_bytes)
        seq = await self.push(session, vs.id, data)
        return voice_pb2.PushTranscribeAudioResponse(session_id=vs.id, seq=seq)

    @handles_notification("voice_audio")
    def voice_audio(
        self, session: ClientSession, audio: VoiceAudio
    ) -> asyncio.Future[PutResult] | None:
        """PCM in a binary frame, taken at once (no task): it is queued for the engine, or
        takes its place in line and the future of its wait for room is returned (its
        outcome handled by a callback: no task per waiting chunk). What cannot be taken
        is answered with a (not terminal) error event for that session id: a notification
        has no answer of its own."""
        try:
            if audio.type not in (voice_pb2.AUDIO_FRAME_TYPE_UNSPECIFIED, PCM):
                raise field_error("type", "clients send PCM audio")
            data = audio.data  # (a copy of the audio each time it is read)
            check_chunk(data, self.limits.max_chunk_bytes, "data")
            vs, _, offered = self._offer_audio(session, audio.session_id, data)
            if isinstance(offered, PutResult):
                self._pushed(vs, offered)
                return None
        except CarError as e:
            _refuse_audio(session, audio.session_id, e)
            return None
        offered.add_done_callback(
            functools.partial(self._audio_admitted, session, vs, audio.session_id)
        )
        return offered

    def _audio_admitted(
        self,
        session: ClientSession,
        vs: VoiceSession,
        raw_id: str,
        admitted: asyncio.Future[PutResult],
    ) -> None:
        """A waiting binary frame's outcome (cancelled: its stream ended)."""
        if admitted.cancelled():
            return
        try:
            self._pushed(vs, admitted.result())
        except CarError as e:
            _refuse_audio(session, raw_id, e)

    @handles("voice_transcribe_stream_stop")
    async def transcribe_stream_stop(
        self, session: ClientSession, req: voice_pb2.StopTranscribeStreamRequest
    ) -> voice_pb2.StopTranscribeStreamResponse:
        vs = self.owned(session, req.session_id)
        stopped = await self.stop(vs)
        return voice_pb2.StopTranscribeStreamResponse(session_id=vs.id, stopped=stopped)

    @handles("voice_sessions_list")
    async def sessions_list(
        self, session: ClientSession, req: voice_pb2.ListVoiceSessionsRequest
    ) -> voice_pb2.ListVoiceSessionsResponse:
        return voice_pb2.ListVoiceSessionsResponse(sessions=self.list_sessions(session))

    @handles("voice_providers_list")
    async def providers_list(
        self, session: ClientSession, req: voice_pb2.ListVoiceProvidersRequest
    ) -> voice_pb2.ListVoiceProvidersResponse:
        return voice_pb2.ListVoiceProvidersResponse(providers=self.list_providers())

    @grpc_only("car.v1.VoiceService.ServeVoice", fills_in=True)
    async def serve_voice(self, session: ClientSession, stream: MessageStream) -> None:
        await self.serve(stream)

    @grpc_only("car.v1.VoiceService.ServeVoiceBatched", fills_in=True)
    async def serve_voice_batched(self, session: ClientSession, stream: MessageStream) -> None:
        await self.serve(stream, batched=True)

    @grpc_only("car.v1.VoiceService.PublishVoiceEvent")
    async def publish_voice_event(
        self,
        session: ClientSession,
        req: voice_pb2.PublishVoiceEventRequest,
    ) -> voice_pb2.PublishVoiceEventResponse:
        raw = require(req.session_id, "session_id")
        if not req.HasField("event"):
            raise field_error("event")
        try:
            vs = self.sessions.get(uuid.UUID(raw.strip()).hex)
        except ValueError:
            vs = None
        delivered = vs is not None and await self.deliver_event(vs, req.event)
        return voice_pb2.PublishVoiceEventResponse(delivered=delivered)
