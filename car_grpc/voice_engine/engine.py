"""The reference speech engine: one `VoiceService.ServeVoiceBatched` stream to a core
(ServeVoice with many messages per gRPC message), serving

- `sphinx`: speech to text (car_grpc.voice_engine.recognizer), partial and final
  transcript events as the audio arrives;
- `espeak`: text to speech (car_grpc.voice_engine.speaker), when espeak-ng is installed:
  the session's `text` option spoken back as PCM16LE TTS chunks, then the session ends.

It is an ordinary client of the public gRPC API (voice.proto documents the stream), with
the daemon token like any other engine; the core does not know it exists. When the stream
fails or the core restarts it connects again, reading the token afresh.

Each voice session is one task, a provider's coroutine (`Provider`). The stream's reader
hands a session its audio through a bounded queue (SESSION_QUEUE pieces of at most
PIECE_BYTES): while it is full the reader waits, and the core's audio waits in the core's
own bounded queue. Decoding runs in worker threads, so the event loop stays free, and the
reader waits at most as long as one piece takes to decode (the core drops an engine that
reads nothing for 10 s). At most MAX_SESSIONS sessions at once; more are refused.

It registers with `acknowledges_audio`: a session sends `taken` for a chunk once it has
decoded the chunk's last piece and sent the events that came of it (a session that does
not listen takes its audio as it drops it), so the core keeps each session's audio in
flight within what its client can still queue (voice.proto VoiceAudioTaken).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from car_grpc import tls
from car_grpc.config import default_token_dir
from car_grpc.v1 import voice_pb2, voice_pb2_grpc
from car_grpc.voice_engine import speaker
from car_grpc.voice_engine.options import Refusal
from car_grpc.voice_engine.recognizer import Recognizer
from car_grpc.wire import batch, codec
from car_grpc.wire.limits import MESSAGE_SIZE_OPTIONS

log = logging.getLogger("car_grpc.voice_engine")

ServeVoiceRequest = voice_pb2.ServeVoiceRequest
STT_PROVIDER = "sphinx"
TTS_PROVIDER = "espeak"
#: Pieces of audio one session may have waiting for its decoder; a chunk is cut into
#: pieces of at most PIECE_BYTES (0.5 s at 16 kHz), so that the reader never waits longer
#: than one piece takes to decode. Together at most 128 KiB per session: a backlog waits
#: in the core's own queue, where the core sees it.
SESSION_QUEUE = 8
PIECE_BYTES = 16 * 1024
#: Sessions served at once (`--max-sessions`): each speech-to-text session holds its own
#: decoder, about 100 MB with the general language model.
MAX_SESSIONS = 8
#: Seconds of speech per TTS chunk, at least; longer speech comes in at most TTS_CHUNKS
#: chunks (and so never fills the owner's event queue, 256 frames by default).
TTS_CHUNK_SECONDS = 0.5
TTS_CHUNKS = 128
#: Seconds between attempts to reach the core: from the first, doubling up to the last.
RECONNECT_DELAYS = (0.2, 5.0)
#: What the core writes the daemon token to (docs/protocol.md §2), when CAR_AUTH_TOKEN is unset.
AUTH_TOKEN_FILE = "auth-token"


def daemon_token() -> str | None:
    """CAR_AUTH_TOKEN, else the daemon token file under CAR_HOME (read again on every
    connection: the core writes a new one when it starts); None when there is neither (a
    core run with --no-auth needs none)."""
    if token := os.environ.get("CAR_AUTH_TOKEN", "").strip():
        return token
    path = default_token_dir() / AUTH_TOKEN_FILE
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


class Stream:
    """One ServeVoiceBatched call and the one way to write to it: a writer task sends
    every message queued when it gets to write in one gRPC message (at most
    batch.MAX_FRAMES messages and batch.MAX_BYTES, a larger one alone), so what the
    sessions send while a write is under way goes in the next one. A sender waits until
    its message is written (or the write fails, with that error): the queue holds at
    most one message per session task and the reader."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._queued: deque[tuple[ServeVoiceRequest, asyncio.Future[None]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        #: Sessions answered and not ended yet.
        self.answered: set[str] = set()

    async def send(self, request: ServeVoiceRequest) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((request, written))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())
        await written

    async def _write_loop(self) -> None:
        queued = self._queued
        taken: list[tuple[ServeVoiceRequest, asyncio.Future[None]]] = []
        try:
            while queued:
                taken = [queued.popleft()]
                size = taken[0][0].ByteSize()
                while queued and len(taken) < batch.MAX_FRAMES:
                    size += queued[0][0].ByteSize()
                    if size > batch.MAX_BYTES:
                        break
                    taken.append(queued.popleft())
                messages = [request for request, _ in taken]
                await self.call.write(voice_pb2.ServeVoiceBatchedRequest(messages=messages))
                for _, written in taken:
                    if not written.done():
                        written.set_result(None)
                taken = []
        except Exception as e:  # the stream failed: so does every send waiting
            for _, written in [*taken, *queued]:
                if not written.done():
                    written.set_exception(e)
            queued.clear()
        finally:
            self._writer = None

    def close(self) -> None:
        """The call is over: stop writing (senders still waiting are being cancelled)."""
        if self._writer is not None:
            self._writer.cancel()

    async def event(self, session_id: str, event: dict[str, Any]) -> None:
        message = voice_pb2.VoiceEngineEvent(session_id=session_id, event=codec.to_value(event))
        await self.send(ServeVoiceRequest(event=message))

    async def answer(self, session_id: str, error: str | None = None) -> None:
        """Accepts the session, or refuses it with `error`."""
        if error is None:
            self.answered.add(session_id)
        await self.send(
            ServeVoiceRequest(
                answer=voice_pb2.VoiceSessionAnswer(session_id=session_id, error=error)
            )
        )

    async def taken(self, session_id: str, seq: int) -> None:
        """The session is done with its audio through chunk `seq`."""
        await self.send(
            ServeVoiceRequest(taken=voice_pb2.VoiceAudioTaken(session_id=session_id, seq=seq))
        )

    async def end(self, session_id: str, error: str | None = None) -> None:
        await self.send(
            ServeVoiceRequest(end=voice_pb2.EndVoiceSession(session_id=session_id, error=error))
        )


@dataclass(eq=False)
class Session:
    """A voice session the engine serves: what the stream's reader hands it."""

    id: str
    opening: voice_pb2.OpenVoiceSession
    #: Pieces of PCM chunks, each with its chunk's seq on its last piece (None on the
    #: others), then None once the client stopped.
    inbox: asyncio.Queue[tuple[bytes, int | None] | None] = field(
        default_factory=lambda: asyncio.Queue(SESSION_QUEUE)
    )
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether the provider takes audio (a TTS session drops what it is sent).
    listens: bool = True
    task: asyncio.Task[None] | None = None


#: A provider serves one session from `open` to its end: it answers the open (accepting
#: or refusing), then sends events and audio, and finally `end` (after the inbox's None).
Provider = Callable[[Stream, Session], Awaitable[None]]


async def transcribe(stream: Stream, session: Session) -> None:
    """The `sphinx` provider: PocketSphinx speech to text."""
    options = codec.struct_to_json(session.opening.options)
    try:
        recognizer = await asyncio.to_thread(Recognizer, options)
    except Refusal as e:
        await stream.answer(session.id, str(e))
        return
    await stream.answer(session.id)
    while (piece := await session.inbox.get()) is not None:
        pcm, last_of = piece
        for event in await asyncio.to_thread(recognizer.feed, pcm):
            await stream.event(session.id, event)
        if last_of is not None:
            await stream.taken(session.id, last_of)
    for event in await asyncio.to_thread(recognizer.finish):
        await stream.event(session.id, event)
    await stream.end(session.id)


def speak_with(program: str) -> Provider:
    """The `espeak` provider: eSpeak NG text to speech with `program`."""

    async def speak(stream: Stream, session: Session) -> None:
        session.listens = False
        try:
            utterance = speaker.Utterance.from_options(
                codec.struct_to_json(session.opening.options)
            )
        except Refusal as e:
            await stream.answer(session.id, str(e))
            return
        await stream.answer(session.id)
        try:
            pcm = await speaker.synthesize(program, utterance)
        except speaker.SpeechFailed as e:
            await _tts(stream, session.id, voice_pb2.AUDIO_FRAME_TYPE_TTS_ERROR, 0, str(e).encode())
            await stream.end(session.id, str(e))
            return
        samples = len(pcm) // 2
        step = 2 * max(
            round(utterance.sample_rate * TTS_CHUNK_SECONDS), math.ceil(samples / TTS_CHUNKS)
        )
        sent = 0
        for at in range(0, len(pcm), step):
            if session.stopped.is_set():  # the client has heard enough
                break
            chunk = pcm[at : at + step]
            await _tts(stream, session.id, voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK, sent, chunk)
            sent += 1
        await _tts(stream, session.id, voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL, sent, b"")
        await stream.end(session.id)

    return speak


async def _tts(
    stream: Stream, session_id: str, kind: voice_pb2.AudioFrameType.ValueType, seq: int, data: bytes
) -> None:
    audio = voice_pb2.VoiceAudio(
        session_id=session_id, seq=seq, type=kind, format=voice_pb2.AUDIO_FORMAT_PCM16LE, data=data
    )
    await stream.send(ServeVoiceRequest(audio=audio))


def default_providers() -> dict[str, Provider]:
    """`sphinx`, and `espeak` when espeak-ng is installed."""
    providers: dict[str, Provider] = {STT_PROVIDER: transcribe}
    if program := speaker.espeak_ng():
        providers[TTS_PROVIDER] = speak_with(program)
    else:
        log.warning("espeak-ng is not installed: no %s (text to speech) provider", TTS_PROVIDER)
    return providers


class SpeechEngine:
    """Serves `providers` to the core at `address`, connecting again whenever the stream
    ends, until stopped (`start`/`stop`, as `car-grpc voice-engine` runs it)."""

    def __init__(
        self,
        address: str,
        providers: Mapping[str, Provider],
        *,
        name: str = "car-grpc-voice",
        core_ca: Path | None = None,
        token: Callable[[], str | None] = daemon_token,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.address = address
        self.max_sessions = max_sessions
        self.providers = dict(providers)
        self.name = name
        self.core_ca = core_ca
        self.token = token
        #: Set while a core has the engine's providers.
        self.registered = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A CA file that cannot be read fails here, at once, rather than in every attempt.
        await tls.core_channel(self.address, self.core_ca, options=[]).close()
        self._runner = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def run(self) -> None:
        first, longest = RECONNECT_DELAYS
        delay = first
        while True:
            try:
                async with tls.core_channel(
                    self.address, self.core_ca, options=list(MESSAGE_SIZE_OPTIONS)
                ) as channel:
                    registered, reason = await self.serve(channel)
            except Exception as e:  # whatever it is, the engine goes on trying
                log.exception("voice engine %r: the stream failed", self.name)
                registered, reason = False, repr(e)
            if registered:
                delay = first
            log.warning("voice engine %r: %s; connecting again in %.1f s", self.name, reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def serve(self, channel: grpc.aio.Channel) -> tuple[bool, str]:
        """One ServeVoiceBatched stream, until it ends: whether it got as far as
        registering, and how it ended."""
        token = self.token()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        call = voice_pb2_grpc.VoiceServiceStub(channel).ServeVoiceBatched(metadata=metadata)
        stream = Stream(call)
        sessions: dict[str, Session] = {}
        registered = False
        try:
            register = voice_pb2.RegisterVoiceEngine(
                engine=self.name, providers=list(self.providers), acknowledges_audio=True
            )
            await stream.send(ServeVoiceRequest(register=register))
            async for received in stream.call:
                for message in received.messages:
                    await self._handle(stream, sessions, message)
                    if message.HasField("registered"):
                        registered = True
            return registered, "the core ended the stream"
        except grpc.aio.AioRpcError as e:
            return registered, f"{e.code().name}: {e.details()}"
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as e:  # a write after the end
            return registered, f"the stream failed: {e}"
        finally:
            self.registered.clear()
            for session in list(sessions.values()):
                if session.task is not None:
                    session.task.cancel()
            stream.close()
            stream.call.cancel()

    async def _handle(
        self, stream: Stream, sessions: dict[str, Session], message: voice_pb2.ServeVoiceResponse
    ) -> None:
        """One message of the core's, in order."""
        body = message.WhichOneof("body")
        if body == "registered":
            self.registered.set()
            log.info(
                "voice engine %r: serving providers %s for the core at %s",
                message.registered.engine,
                ", ".join(message.registered.providers),
                self.address,
            )
        elif body == "open":
            await self._open(stream, sessions, message.open)
        elif body == "audio":
            audio = message.audio
            session = sessions.get(audio.session_id)
            if session is not None and not session.listens:
                await stream.taken(session.id, audio.seq)  # dropped: taken at once
            elif session is not None:
                data = audio.data
                for at in range(0, len(data), PIECE_BYTES):
                    if sessions.get(session.id) is not session:
                        break  # it ended meanwhile
                    last_of = audio.seq if at + PIECE_BYTES >= len(data) else None
                    piece = (data[at : at + PIECE_BYTES], last_of)
                    await session.inbox.put(piece)  # waits while full
        elif body == "stop":
            if (session := sessions.get(message.stop.session_id)) is not None:
                session.stopped.set()
                await session.inbox.put(None)
        elif body == "closed":
            session = sessions.pop(message.closed.session_id, None)
            if session is not None and session.task is not None:
                session.task.cancel()

    async def _open(
        self, stream: Stream, sessions: dict[str, Session], opening: voice_pb2.OpenVoiceSession
    ) -> None:
        if len(sessions) >= self.max_sessions:
            busy = f"the engine is busy: it serves at most {self.max_sessions} sessions at once"
            await stream.answer(opening.session_id, busy)
            return
        session = Session(opening.session_id, opening)
        sessions[session.id] = session
        provider = self.providers[opening.provider]

        async def serve_session() -> None:
            try:
                await provider(stream, session)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass  # the stream is gone: the reader sees it too
            except Exception as e:  # a provider's bug fails its session, not the engine
                log.exception("voice session %s failed", session.id)
                with contextlib.suppress(Exception):
                    if session.id in stream.answered:
                        await stream.end(session.id, f"engine error: {e}")
                    else:
                        await stream.answer(session.id, f"engine error: {e}")
            finally:
                stream.answered.discard(session.id)
                sessions.pop(session.id, None)
                while not session.inbox.empty():  # a reader waiting to put gets through
                    session.inbox.get_nowait()

        session.task = asyncio.create_task(serve_session())
