"""Helpers for the voice tests: a small speech engine on the generated VoiceService stub,
the JSON-RPC test client keeping binary (audio) frames apart, and for the reference
engine (`car-grpc voice-engine`) its process and speech from espeak-ng."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from websockets.asyncio.client import ClientConnection, connect

from car_grpc.v1 import voice_pb2, voice_pb2_grpc
from car_grpc.wire import codec
from tests.bounded import stopped
from tests.processes import Process, car_grpc_argv, cli_env, launch
from tests.ws_helpers import Rpc

ServeVoiceRequest = voice_pb2.ServeVoiceRequest


def partial_event(seq: int) -> dict[str, Any]:
    return {"type": "transcript", "final": False, "text": f"chunk {seq}", "seq": seq}


def final_event(seq: int, size: int) -> dict[str, Any]:
    return {
        "type": "transcript",
        "final": True,
        "text": f"chunk {seq}: {size} bytes",
        "speaker": "echo",
        "start_ms": seq * 100,
        "end_ms": seq * 100 + 100,
    }


#: The last final segment the engine sends on `stop` with the option `{"farewell": true}`.
FAREWELL = {"type": "transcript", "final": True, "text": "goodbye", "speaker": "echo"}


class EchoEngine:
    """A speech engine for tests, over a real ServeVoice stream.

    It accepts every session (unless told to refuse), and for each PCM chunk `seq` sends a
    partial transcript, then a final one (`partial_event`, `final_event`); with the option
    `{"tts": true}` it also speaks the chunk back as a TTS chunk. On `stop` it ends the
    session (after a last final segment with `{"farewell": true}`, and a TTS final with
    tts), unless told `{"ignore_stop": true}`. Everything it receives is recorded.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        providers: list[str],
        *,
        name: str = "echo",
        token: str | None = None,
        refuse: str | None = None,
    ) -> None:
        self.providers = providers
        self.name = name
        self.refuse = refuse
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.call: Any = voice_pb2_grpc.VoiceServiceStub(channel).ServeVoice(metadata=metadata)
        self.opened: asyncio.Queue[voice_pb2.OpenVoiceSession] = asyncio.Queue()
        self.closed: asyncio.Queue[voice_pb2.CloseVoiceSession] = asyncio.Queue()
        self.audio: dict[str, list[voice_pb2.VoiceAudio]] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self._writing = asyncio.Lock()
        self._reading = asyncio.Event()
        self._reading.set()
        self._reader: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.end_code: grpc.StatusCode | None = None
        self.end_details = ""

    async def start(self) -> voice_pb2.VoiceEngineRegistered:
        register = voice_pb2.RegisterVoiceEngine(engine=self.name, providers=self.providers)
        await self.send(ServeVoiceRequest(register=register))
        first = await asyncio.wait_for(self.call.read(), 5)
        assert first.WhichOneof("body") == "registered", first
        self._reader = asyncio.create_task(self._read())
        return first.registered  # type: ignore[no-any-return]

    async def send(self, message: ServeVoiceRequest) -> None:
        async with self._writing:
            await self.call.write(message)

    def pause_reading(self) -> None:
        """Stop reading the stream, as an engine that hangs would."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def _read(self) -> None:
        try:
            while True:
                await self._reading.wait()
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                # Answers to a call the server already ended fail; its status still comes.
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                    await self._handle(message)
        except grpc.aio.AioRpcError as e:
            self.end_code, self.end_details = e.code(), e.details() or ""
        finally:
            self.ended.set()

    async def _handle(self, message: voice_pb2.ServeVoiceResponse) -> None:
        body = message.WhichOneof("body")
        if body == "open":
            opening = message.open
            self.options[opening.session_id] = codec.struct_to_json(opening.options)
            self.audio[opening.session_id] = []
            answer = voice_pb2.VoiceSessionAnswer(session_id=opening.session_id)
            if self.refuse is not None:
                answer.error = self.refuse
            await self.send(ServeVoiceRequest(answer=answer))
            await self.opened.put(opening)
        elif body == "audio":
            chunk = message.audio
            self.audio[chunk.session_id].append(chunk)
            await self.event(chunk.session_id, partial_event(chunk.seq))
            await self.event(chunk.session_id, final_event(chunk.seq, len(chunk.data)))
            if self.options[chunk.session_id].get("tts"):
                speech = voice_pb2.VoiceAudio(
                    session_id=chunk.session_id,
                    seq=chunk.seq,
                    type=voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK,
                    format=voice_pb2.AUDIO_FORMAT_MP3,
                    data=chunk.data,
                )
                await self.send(ServeVoiceRequest(audio=speech))
        elif body == "stop":
            session_id = message.stop.session_id
            if self.options[session_id].get("ignore_stop"):
                return
            if self.options[session_id].get("farewell"):
                await self.event(session_id, FAREWELL)
            if self.options[session_id].get("tts"):
                final = voice_pb2.VoiceAudio(
                    session_id=session_id, type=voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL
                )
                await self.send(ServeVoiceRequest(audio=final))
            await self.send(ServeVoiceRequest(end=voice_pb2.EndVoiceSession(session_id=session_id)))
        elif body == "closed":
            await self.closed.put(message.closed)

    async def event(self, session_id: str, event: Any) -> None:
        engine_event = voice_pb2.VoiceEngineEvent(
            session_id=session_id, event=codec.to_value(event)
        )
        await self.send(ServeVoiceRequest(event=engine_event))

    async def close(self) -> None:
        """Go away abruptly (the RPC is cancelled)."""
        self.call.cancel()
        if self._reader is not None:
            await stopped(
                asyncio.gather(self._reader, return_exceptions=True), "the voice client's reader"
            )


@contextlib.asynccontextmanager
async def echo_engine(
    address: str, providers: list[str], **kwargs: Any
) -> AsyncIterator[EchoEngine]:
    async with grpc.aio.insecure_channel(address) as channel:
        engine = EchoEngine(channel, providers, **kwargs)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


class VoiceRpc(Rpc):
    """The JSON-RPC test client keeping binary (audio) frames in `binary`
    (`next_binary`), with the voice calls the tests make."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(ws, keep_binary=True)

    async def next_event(self, timeout: float = 5) -> dict[str, Any]:
        """The params of the next frame not answering `call`, which must be voice.event."""
        frame = await self.next_frame(timeout)
        assert frame.get("method") == "voice.event", frame
        params: dict[str, Any] = frame["params"]
        return params

    async def start(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.result("voice.transcribe_stream.start", params)
        return result


@contextlib.asynccontextmanager
async def voice_rpc(url: str) -> AsyncIterator[VoiceRpc]:
    async with connect(url, ping_interval=None) as ws:
        yield VoiceRpc(ws)


# ------------------------------------------------------------------ the reference engine


def say(text: str) -> tuple[bytes, int]:
    """`text` spoken by Debian's espeak-ng, straight from the program: (PCM16LE mono, its
    sample rate, 22050 Hz)."""
    wav = subprocess.run(
        ["espeak-ng", "--stdin", "--stdout"],
        input=text.encode(),
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    with wave.open(io.BytesIO(wav)) as audio:
        # Written to a pipe, the header's length is a placeholder: read to the end.
        return audio.readframes(audio.getnframes()), audio.getframerate()


def silence(seconds: float, rate: int) -> bytes:
    return b"\x00\x00" * round(seconds * rate)


def chunks(pcm: bytes, rate: int, seconds: float = 0.1) -> list[bytes]:
    """`pcm` cut in real-time-sized chunks (100 ms of audio each)."""
    size = 2 * round(rate * seconds)
    return [pcm[at : at + size] for at in range(0, len(pcm), size)]


@contextlib.asynccontextmanager
async def voice_engine_process(
    grpc_address: str, car_home: str | Path, *, registered: bool = True
) -> AsyncIterator[Process]:
    """`car-grpc voice-engine --core ADDRESS` in its own process, with the daemon token
    of the core whose CAR_HOME is `car_home`; yields once its providers are registered
    (`registered`; else at once: `await registration(engine)` when it matters)."""
    argv = car_grpc_argv("voice-engine", "--core", grpc_address)
    async with launch(argv, name="car-grpc voice-engine", env=cli_env(car_home)) as engine:
        if registered:
            await registration(engine)
        yield engine


async def registration(engine: Process) -> str:
    """The engine's next log line saying that a core took its providers."""
    return await engine.next_line("serving providers", timeout=30)
