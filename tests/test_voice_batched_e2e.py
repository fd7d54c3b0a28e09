"""VoiceService.ServeVoiceBatched end to end: a real core and gateway on loopback, a
speech engine on the generated stub alone (many messages per gRPC message both ways) and
WebSocket clients.

Covers a burst of audio reaching the engine in one message and coming back in order, the
bound on a batch from the engine, register first inside a batch, and a client that pushes
audio far faster than it reads what comes back: slowed down, not dropped."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.core.voice import State
from car_grpc.gateway import Gateway
from car_grpc.gateway.audio_frames import decode
from car_grpc.v1 import session_pb2, voice_pb2, voice_pb2_grpc
from car_grpc.wire import codec
from tests.bounded import bounded, stopped
from tests.conftest import make_config
from tests.session_client import connect
from tests.voice_helpers import VoiceRpc, partial_event, voice_rpc
from tests.ws_helpers import daemon_token, running, running_core

Request = voice_pb2.ServeVoiceRequest
Batch = voice_pb2.ServeVoiceBatchedRequest


class BatchedEngine:
    """A speech engine on ServeVoiceBatched: it accepts every session, answers each PCM
    chunk `seq` with `partial_event(seq)` and the chunk spoken back (every answer to one
    gRPC message in one, with `taken` for the last chunk unless it does not `acknowledges`
    audio), and ends a session on stop. It records the PCM chunks and how many of them each
    gRPC message from the server held."""

    def __init__(self, channel: grpc.aio.Channel, token: str, *, acknowledges: bool = True) -> None:
        self.acknowledges = acknowledges
        metadata = (("authorization", f"Bearer {token}"),)
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        self.call: Any = stub.ServeVoiceBatched(metadata=metadata)
        self.audio: dict[str, list[voice_pb2.VoiceAudio]] = {}
        #: PCM chunks per gRPC message that held any.
        self.chunks_per_message: list[int] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> voice_pb2.VoiceEngineRegistered:
        register = voice_pb2.RegisterVoiceEngine(
            engine="batched", providers=["echo"], acknowledges_audio=self.acknowledges
        )
        await self.call.write(Batch(messages=[Request(register=register)]))
        first = await asyncio.wait_for(self.call.read(), 5)
        assert [m.WhichOneof("body") for m in first.messages] == ["registered"]
        self._reader = asyncio.create_task(self._read())
        return first.messages[0].registered  # type: ignore[no-any-return]

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            while (received := await self.call.read()) is not grpc.aio.EOF:
                out = self._answer_all(received.messages)
                if out:
                    await self.call.write(Batch(messages=out))

    def _answer_all(self, messages: Sequence[voice_pb2.ServeVoiceResponse]) -> list[Request]:
        """The answers to one gRPC message's messages, then `taken` for its audio."""
        out = [answer for message in messages for answer in self._answer(message)]
        last = {m.audio.session_id: m.audio.seq for m in messages if m.HasField("audio")}
        if last:
            self.chunks_per_message.append(sum(m.HasField("audio") for m in messages))
        if not self.acknowledges:
            return out
        for session_id, seq in last.items():
            out.append(Request(taken=voice_pb2.VoiceAudioTaken(session_id=session_id, seq=seq)))
        return out

    def _answer(self, message: voice_pb2.ServeVoiceResponse) -> list[Request]:
        body = message.WhichOneof("body")
        if body == "open":
            self.audio[message.open.session_id] = []
            return [
                Request(answer=voice_pb2.VoiceSessionAnswer(session_id=message.open.session_id))
            ]
        if body == "audio":
            chunk = message.audio
            self.audio[chunk.session_id].append(chunk)
            event = codec.to_value(partial_event(chunk.seq))
            speech = voice_pb2.VoiceAudio(
                session_id=chunk.session_id,
                seq=chunk.seq,
                type=voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK,
                data=chunk.data,
            )
            return [
                Request(event=voice_pb2.VoiceEngineEvent(session_id=chunk.session_id, event=event)),
                Request(audio=speech),
            ]
        if body == "stop":
            return [Request(end=voice_pb2.EndVoiceSession(session_id=message.stop.session_id))]
        return []

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            await stopped(
                asyncio.gather(self._reader, return_exceptions=True), "the engine's reader"
            )


class HoldingEngine(BatchedEngine):
    """A BatchedEngine that holds the gRPC messages holding audio, unanswered (and so
    untaken), until `release`, as an engine answering an utterance at its end would.
    `lies`: each release starts with `taken`s that must change nothing: seqs never sent,
    repeats of the last real one (a flood of 300), one for a session that is not its."""

    def __init__(
        self, channel: grpc.aio.Channel, token: str, *, acknowledges: bool, lies: bool
    ) -> None:
        super().__init__(channel, token, acknowledges=acknowledges)
        self.lies = lies
        self.holding = True
        self.held: list[voice_pb2.ServeVoiceResponse] = []
        self.held_chunks = 0
        self.received = 0  # PCM chunks, held or answered
        self.released: list[int] = []  # answers (events and speech) per release
        self._last_taken: int | None = None
        self._writing = asyncio.Lock()

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            while (received := await self.call.read()) is not grpc.aio.EOF:
                chunks = sum(m.HasField("audio") for m in received.messages)
                self.received += chunks
                if self.holding and chunks:
                    self.held.extend(received.messages)
                    self.held_chunks += chunks
                elif out := self._answer_all(received.messages):
                    await self._write(out)

    async def release(self) -> None:
        """Answer every message held (and take its audio), in order, in one go."""
        held, self.held, self.held_chunks = self.held, [], 0
        out = self._answer_all(held)
        self.released.append(sum(m.HasField("event") or m.HasField("audio") for m in out))
        if self.lies and held:
            session_id = next(m.audio.session_id for m in held if m.HasField("audio"))
            never_sent = [2**64 - 1, self.received, self.received + 1000]
            repeats = [self._last_taken] * 300 if self._last_taken is not None else []
            lies = [
                Request(taken=voice_pb2.VoiceAudioTaken(session_id=session_id, seq=seq))
                for seq in [*never_sent, *repeats]
            ]
            elsewhere = voice_pb2.VoiceAudioTaken(session_id=uuid.uuid4().hex, seq=0)
            out = [*lies, Request(taken=elsewhere), *out]
        taken = [m.taken.seq for m in out if m.HasField("taken")]
        if taken:
            self._last_taken = taken[-1]
        await self._write(out)

    async def _write(self, out: list[Request]) -> None:
        async with self._writing:
            for at in range(0, len(out), 256):  # a batch's bound
                await self.call.write(Batch(messages=out[at : at + 256]))


@contextlib.asynccontextmanager
async def batched_engine(core: Core) -> AsyncIterator[BatchedEngine]:
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        engine = BatchedEngine(channel, daemon_token(core))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


@contextlib.asynccontextmanager
async def client(core: Core, gateway: Gateway) -> AsyncIterator[VoiceRpc]:
    async with voice_rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        yield c


def pcm_frame(session_id: str, seq: int, payload: bytes) -> bytes:
    return b"\x01" + uuid.UUID(session_id).bytes + struct.pack("<Q", seq) + b"\x00" + payload


async def test_a_burst_of_audio_reaches_the_engine_batched_and_comes_back_in_order(
    tmp_path: Any,
) -> None:
    async with (
        running(make_config(tmp_path)) as (core, gateway),
        batched_engine(core) as engine,
        client(core, gateway) as c,
    ):
        session_id = (await c.start())["session_id"]
        payloads = [bytes([n, 0]) * (n + 1) for n in range(8)]
        # Eight pushes in one WebSocket message (a JSON-RPC batch): they reach the
        # core together and wait in the session's audio queue together.
        await c.send(
            [
                {
                    "jsonrpc": "2.0",
                    "id": f"p{n}",
                    "method": "voice.transcribe_stream.push",
                    "params": {
                        "session_id": session_id,
                        "pcm_b64": base64.b64encode(payload).decode(),
                    },
                }
                for n, payload in enumerate(payloads)
            ]
        )
        speech = [decode(await c.next_binary()) for _ in payloads]
        assert [(s.seq, s.data) for s in speech] == list(enumerate(payloads))
        assert all(s.type == voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK for s in speech)
        assert all(s.format == voice_pb2.AUDIO_FORMAT_PCM16LE for s in speech)
        received = engine.audio[session_id]
        assert [(a.seq, a.data) for a in received] == list(enumerate(payloads))
        # Fewer gRPC messages than chunks: some travelled together.
        assert sum(engine.chunks_per_message) == len(payloads)
        assert max(engine.chunks_per_message) > 1, engine.chunks_per_message
        frames = [await c.next_frame() for _ in range(len(payloads) + 1)]
        [answers] = [f for f in frames if isinstance(f, list)]
        assert [a["result"]["seq"] for a in answers] == list(range(len(payloads)))
        events = [f["params"] for f in frames if isinstance(f, dict)]
        assert events == [
            {"session_id": session_id, "event": partial_event(n)} for n in range(len(payloads))
        ]
        stop = await c.result("voice.transcribe_stream.stop", {"session_id": session_id})
        assert stop == {"session_id": session_id, "stopped": True}


async def test_a_client_that_pushes_far_faster_than_it_reads_is_slowed_down_not_dropped(
    tmp_path: Any,
) -> None:
    """Every chunk makes an event and a speech frame of 64 KiB. The client (a session
    stream) stops reading, sends 128 chunks, then reads again. Without the audio waiting
    for the owner, the engine's answers would pile up past voice_event_queue (64) while
    the client does not read, and the session would end."""
    config = make_config(
        tmp_path,
        voice_event_queue=64,
        voice_audio_queue=4,
        session_outbound_queue=8,
        voice_stall_timeout=30.0,
    )
    async with (
        running_core(config.core) as core,
        batched_engine(core) as engine,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        c = await connect(channel, token=daemon_token(core))
        start = voice_pb2.StartTranscribeStreamRequest()
        session_id = (await c.request("voice_transcribe_stream_start", start)).session_id
        c.pause_reading()
        count, payload = 128, b"\x01\x00" * (32 * 1024)
        for seq in range(count):
            audio = voice_pb2.VoiceAudio(session_id=session_id, seq=seq, data=payload)
            await c.send(session_pb2.ClientFrame(voice_audio=audio))
        c.resume_reading()
        frames: list[session_pb2.ServerFrame] = []
        with contextlib.suppress(TimeoutError):
            while len(frames) < 2 * count:
                frames.append(await c.next_notification(timeout=30))
        # On a shortfall, say what came last (an error event says why the session ended).
        assert len(frames) == 2 * count, (len(frames), frames[-1:])
        speech = [f.voice_audio for f in frames if f.HasField("voice_audio")]
        events = [
            codec.value_to_json(f.voice_event.event) for f in frames if f.HasField("voice_event")
        ]
        assert [(s.seq, s.data) for s in speech] == [(n, payload) for n in range(count)]
        assert events == [partial_event(n) for n in range(count)]
        assert [a.seq for a in engine.audio[session_id]] == list(range(count))
        stop = voice_pb2.StopTranscribeStreamRequest(session_id=session_id)
        assert (await c.request("voice_transcribe_stream_stop", stop)).stopped
        await c.close()


@pytest.mark.parametrize("bad", ["too many", "register not first", "taken unannounced"])
async def test_a_batch_out_of_bounds_ends_the_stream_with_a_precise_error(
    tmp_path: Any, bad: str
) -> None:
    async with running(make_config(tmp_path)) as (core, _):
        metadata = (("authorization", f"Bearer {daemon_token(core)}"),)
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            call: Any = voice_pb2_grpc.VoiceServiceStub(channel).ServeVoiceBatched(
                metadata=metadata
            )
            register = Request(register=voice_pb2.RegisterVoiceEngine(providers=["echo"]))
            end = Request(end=voice_pb2.EndVoiceSession(session_id="0" * 32))
            if bad == "too many":
                # Register and many messages behind it, in one batch of 257.
                await call.write(Batch(messages=[register, *[end] * 256]))
                details = "a batch holds at most 256 messages, got 257"
            elif bad == "register not first":
                await call.write(Batch(messages=[end, register]))
                details = "the first message must be `register`"
            else:  # `taken` from an engine that did not register acknowledges_audio
                taken = Request(taken=voice_pb2.VoiceAudioTaken(session_id="0" * 32))
                await call.write(Batch(messages=[register, taken]))
                details = "`taken` needs acknowledges_audio in register"
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(5):
                    async for _ in call:
                        pass
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details in (ended.value.details() or "")


def event_of(frame: session_pb2.ServerFrame) -> Any:
    return codec.value_to_json(frame.voice_event.event)


async def until(check: Callable[[], str | None], timeout: float = 30) -> str:
    """Poll `check` until it names a state (a bounded wait: the states it looks for
    last until the test acts on them; the server has no event to wait on for them)."""
    async with asyncio.timeout(timeout):
        while True:
            if (state := check()) is not None:
                return state
            await asyncio.sleep(0.002)


@pytest.mark.parametrize(
    ("acknowledges", "lies"),
    [(True, False), (True, True), (False, False)],
    ids=["acknowledges", "acknowledges-and-lies", "does-not-acknowledge"],
)
async def test_a_burst_of_answers_overflows_a_client_not_reading_unless_the_engine_takes(
    tmp_path: Any, acknowledges: bool, lies: bool
) -> None:
    """The engine holds its answers (two a chunk, 32 KiB of speech each) until it has
    HOLD chunks, or until the server holds the rest of the audio for its `taken`; the
    client does not read meanwhile. The owner's room is voice_event_queue (64) and what
    its connection takes (8 frames queued, the 64 KiB window): about 76 answers.

    An engine that acknowledges audio gets no more than its answers fit in three quarters
    of that queue: the client gets every answer, in order, once it reads again (and every
    `taken` that lies, a seq never sent, repeated, or another session's, changes nothing).
    One that does not gets the audio as before (as fast as the client's queue empties):
    the HOLD chunks reach it, and their 128 answers end the session."""
    config = make_config(
        tmp_path, voice_event_queue=64, session_outbound_queue=8, voice_stall_timeout=30.0
    )
    count, hold, room = 128, 64, 64 * 3 // 4
    core = Core(config.core)
    await core.start()
    options = [("grpc.http2.bdp_probe", 0)]  # the client's window stays 64 KiB
    try:
        async with (
            grpc.aio.insecure_channel(core.grpc_address) as engine_channel,
            grpc.aio.insecure_channel(core.grpc_address, options=options) as channel,
        ):
            engine = HoldingEngine(
                engine_channel, daemon_token(core), acknowledges=acknowledges, lies=lies
            )
            await engine.start()
            c = await connect(channel, token=daemon_token(core))
            start = voice_pb2.StartTranscribeStreamRequest()
            session_id = (await c.request("voice_transcribe_stream_start", start)).session_id
            assert core.parts is not None
            vs = core.parts.voice.sessions[session_id]
            c.pause_reading()
            payload = b"\x01\x00" * (16 * 1024)

            async def send_all() -> None:
                for seq in range(count):
                    audio = voice_pb2.VoiceAudio(session_id=session_id, seq=seq, data=payload)
                    await c.send(session_pb2.ClientFrame(voice_audio=audio))

            sending = asyncio.create_task(send_all())

            def state() -> str | None:
                if vs.state is State.ENDED:
                    return "ended"
                if engine.held_chunks >= hold:
                    return "release"
                if engine.received < vs.chunks_sent:
                    return None  # audio on its way to the engine
                if engine.held_chunks and not vs.engine_took.is_set():
                    return "release"  # the server holds the rest for a `taken`
                if not engine.held_chunks and not vs.owner_keeps_up.is_set():
                    return "client"  # ... for the client to read
                return None

            try:
                while (now := await until(state)) == "release":
                    await engine.release()
            except TimeoutError:
                where = (engine.received, engine.held_chunks, vs.chunks_sent, vs.chunks_taken)
                raise AssertionError(f"stuck: {where}, released {engine.released}") from None
            c.resume_reading()
            engine.holding = False
            await engine.release()
            frames: list[session_pb2.ServerFrame] = []
            while len(frames) < 2 * count:
                frame = await c.next_notification(timeout=30)
                frames.append(frame)
                if frame.HasField("voice_event") and "terminal" in event_of(frame):
                    break
            events = [event_of(f) for f in frames if f.HasField("voice_event")]
            speech = [f.voice_audio.seq for f in frames if f.HasField("voice_audio")]
            if not acknowledges:
                assert now == "ended"
                assert events[-1] == {
                    "type": "error",
                    "message": "client not reading: 64 voice events queued",
                    "terminal": True,
                }
                assert engine.released[0] >= 2 * hold
                assert events[:-1] == [partial_event(n) for n in range(len(events) - 1)]
                assert speech == list(range(len(speech)))
                assert len(frames) < 2 * hold
                sending.cancel()
                await stopped(
                    asyncio.gather(sending, return_exceptions=True), "the cancelled sending"
                )
                return
            # Exactly every answer, in order, and nothing else (no error: no overflow).
            assert len(frames) == 2 * count, (now, len(frames), events[-1:], engine.released)
            assert events == [partial_event(n) for n in range(count)]
            assert speech == list(range(count))
            assert [a.seq for a in engine.audio[session_id]] == list(range(count))
            # Each burst fitted three quarters of the client's queue.
            assert engine.released[0] > 0 and max(engine.released) <= room, engine.released
            await bounded(sending, "the sending of the audio")
            stop = voice_pb2.StopTranscribeStreamRequest(session_id=session_id)
            assert (await c.request("voice_transcribe_stream_stop", stop)).stopped
            last = event_of(await c.next_notification())
            assert last == {"type": "ended", "reason": "stopped", "terminal": True}
            await c.close()
            await engine.close()
    finally:
        await stopped(core.stop(grace=0))
