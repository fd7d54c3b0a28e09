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
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.gateway.audio_frames import decode
from car_grpc.v1 import session_pb2, voice_pb2, voice_pb2_grpc
from car_grpc.wire import codec
from tests.conftest import make_config
from tests.session_client import connect
from tests.voice_helpers import VoiceRpc, partial_event, voice_rpc
from tests.ws_helpers import daemon_token, running

Request = voice_pb2.ServeVoiceRequest
Batch = voice_pb2.ServeVoiceBatchedRequest


class BatchedEngine:
    """A speech engine on ServeVoiceBatched: it accepts every session, answers each PCM
    chunk `seq` with `partial_event(seq)` and the chunk spoken back (every answer to one
    gRPC message in one, with `taken` for the last chunk), and ends a session on stop. It
    records the PCM chunks and how many of them each gRPC message from the server held."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        metadata = (("authorization", f"Bearer {token}"),)
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        self.call: Any = stub.ServeVoiceBatched(metadata=metadata)
        self.audio: dict[str, list[voice_pb2.VoiceAudio]] = {}
        #: PCM chunks per gRPC message that held any.
        self.chunks_per_message: list[int] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> voice_pb2.VoiceEngineRegistered:
        register = voice_pb2.RegisterVoiceEngine(
            engine="batched", providers=["echo"], acknowledges_audio=True
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
            await asyncio.gather(self._reader, return_exceptions=True)


class BurstEngine(BatchedEngine):
    """A BatchedEngine that answers in bursts: it holds its answers (and `taken`) while
    audio keeps coming, and sends them all at once when none has come for QUIET seconds,
    as an engine that answers an utterance at its pause would. `starved` is set when it
    has been quiet with nothing held: the server sends it nothing more."""

    QUIET = 0.2

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        super().__init__(channel, token)
        self.starved = asyncio.Event()
        self.bursts: list[int] = []  # answers per burst

    async def _read(self) -> None:
        received: asyncio.Queue[voice_pb2.ServeVoiceBatchedResponse | None] = asyncio.Queue()

        async def read_all() -> None:
            try:
                while (message := await self.call.read()) is not grpc.aio.EOF:
                    received.put_nowait(message)
            finally:  # ended, failed or cancelled (close)
                received.put_nowait(None)

        reader = asyncio.create_task(read_all())
        held: list[voice_pb2.ServeVoiceResponse] = []
        try:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                while True:
                    try:
                        message = await asyncio.wait_for(received.get(), self.QUIET)
                    except TimeoutError:
                        if not held:
                            self.starved.set()
                            message = await received.get()
                        else:
                            out = self._answer_all(held)
                            held = []
                            self.bursts.append(len(out))
                            await self.call.write(Batch(messages=out))
                            continue
                    if message is None:
                        return
                    self.starved.clear()
                    if any(m.HasField("audio") for m in message.messages):
                        held.extend(message.messages)
                    elif out := self._answer_all(message.messages):
                        await self.call.write(Batch(messages=out))
        finally:
            reader.cancel()


@contextlib.asynccontextmanager
async def batched_engine(
    core: Core, kind: type[BatchedEngine] = BatchedEngine
) -> AsyncIterator[BatchedEngine]:
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        engine = kind(channel, daemon_token(core))
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
    core = Core(config.core)
    await core.start()
    try:
        async with (
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
                codec.value_to_json(f.voice_event.event)
                for f in frames
                if f.HasField("voice_event")
            ]
            assert [(s.seq, s.data) for s in speech] == [(n, payload) for n in range(count)]
            assert events == [partial_event(n) for n in range(count)]
            assert [a.seq for a in engine.audio[session_id]] == list(range(count))
            stop = voice_pb2.StopTranscribeStreamRequest(session_id=session_id)
            assert (await c.request("voice_transcribe_stream_stop", stop)).stopped
            await c.close()
    finally:
        await core.stop(grace=0)


@pytest.mark.parametrize("bad", ["too many", "register not first"])
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
            else:
                await call.write(Batch(messages=[end, register]))
                details = "the first message must be `register`"
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(5):
                    async for _ in call:
                        pass
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details in (ended.value.details() or "")


async def test_an_engine_answering_in_bursts_cannot_overflow_a_client_that_does_not_read(
    tmp_path: Any,
) -> None:
    """The engine holds its answers (two per chunk) until the audio pauses. Without a bound
    on the audio in flight at the engine, every chunk the client sent would reach it while
    nothing is queued for the client, and the 256 answers would come at once, past
    voice_event_queue (64): the session would end. With the engine's `taken`, the server
    sends only the audio whose answers fit the client's room; the client is slowed down
    and gets every answer once it reads again."""
    config = make_config(
        tmp_path, voice_event_queue=64, session_outbound_queue=8, voice_stall_timeout=30.0
    )
    core = Core(config.core)
    await core.start()
    try:
        async with (
            batched_engine(core, BurstEngine) as engine,
            grpc.aio.insecure_channel(core.grpc_address) as channel,
        ):
            assert isinstance(engine, BurstEngine)
            c = await connect(channel, token=daemon_token(core))
            start = voice_pb2.StartTranscribeStreamRequest()
            session_id = (await c.request("voice_transcribe_stream_start", start)).session_id
            c.pause_reading()
            count = 128
            payload = b"\x01\x00" * (16 * 1024)  # large enough to fill the connection's window
            audio = [
                voice_pb2.VoiceAudio(session_id=session_id, seq=seq, data=payload)
                for seq in range(count)
            ]

            async def send_all() -> None:
                for chunk in audio:
                    await c.send(session_pb2.ClientFrame(voice_audio=chunk))

            sending = asyncio.create_task(send_all())
            # The engine has answered all it got and gets nothing more: the server holds
            # the rest of the audio until the client reads.
            # (Without the bound, all the audio reaches it and its answers end the session.)
            try:
                await asyncio.wait_for(engine.starved.wait(), 20)
            except TimeoutError:
                raise AssertionError(f"the engine never ran dry: bursts {engine.bursts}") from None
            assert engine.bursts, "the engine got no audio"
            c.resume_reading()
            frames: list[session_pb2.ServerFrame] = []
            with contextlib.suppress(TimeoutError):
                while len(frames) < 2 * count:
                    frames.append(await c.next_notification(timeout=30))
            assert len(frames) == 2 * count, (len(frames), frames[-1:], engine.bursts)
            await sending
            speech = [f.voice_audio.seq for f in frames if f.HasField("voice_audio")]
            events = [
                codec.value_to_json(f.voice_event.event)
                for f in frames
                if f.HasField("voice_event")
            ]
            assert speech == list(range(count))
            assert events == [partial_event(n) for n in range(count)]
            # Each burst fitted the client's room (its queue and its connection's).
            assert max(engine.bursts) <= 64 + 8, engine.bursts
            stop = voice_pb2.StopTranscribeStreamRequest(session_id=session_id)
            assert (await c.request("voice_transcribe_stream_stop", stop)).stopped
            await c.close()
    finally:
        await core.stop(grace=0)
