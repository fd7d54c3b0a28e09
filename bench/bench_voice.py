"""Audio through car-grpc (client -> gateway -> core -> speech engine and back) against a
bare `websockets` echo of the same binary frames.

Three processes for car-grpc: `car-grpc serve`, an engine (this module's `engine` mode:
a ServeVoice client that answers every PCM chunk with a small partial-transcript event and
speaks the chunk back as a TTS chunk) and the client in this process. The baseline echo
server runs in its own process too. Frames are 100 ms of 16 kHz PCM16 (3200 bytes) in the
26-byte CAR binary frame.

- latency: one chunk at a time, PCM frame out -> TTS frame back: p50 and p99;
- throughput: CHUNKS chunks sent as fast as the socket takes them, timed until the last
  TTS frame is back: chunks/s (and how many seconds of audio that is per second).

    python -m bench bench_voice          (or ./dev bench bench_voice)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from bench import summary
from car_grpc.v1 import voice_pb2, voice_pb2_grpc
from car_grpc.wire import codec
from tests.processes import car_grpc_serve, launch, log_listening

CHUNK = 3200  # 100 ms of 16 kHz mono PCM16
ROUND_TRIPS = 500
CHUNKS = 5000
#: Longest the throughput phase waits for the last TTS chunk once every chunk is sent.
RECEIVE_TIMEOUT = 30.0


def pcm_frame(session: uuid.UUID, seq: int) -> bytes:
    return b"\x01" + session.bytes + struct.pack("<Q", seq) + b"\x00" + b"\x00" * CHUNK


# ------------------------------------------------------------------ the other processes


async def run_engine(address: str) -> None:
    """A speech engine: every PCM chunk gets a partial event and its audio spoken back."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).ServeVoice()
        register = voice_pb2.RegisterVoiceEngine(engine="bench", providers=["bench"])
        await call.write(voice_pb2.ServeVoiceRequest(register=register))
        partial = codec.to_value({"type": "transcript", "final": False, "text": "..."})
        async for message in call:
            body = message.WhichOneof("body")
            if body == "open":
                answer = voice_pb2.VoiceSessionAnswer(session_id=message.open.session_id)
                await call.write(voice_pb2.ServeVoiceRequest(answer=answer))
            elif body == "audio":
                chunk = message.audio
                event = voice_pb2.VoiceEngineEvent(session_id=chunk.session_id, event=partial)
                await call.write(voice_pb2.ServeVoiceRequest(event=event))
                speech = voice_pb2.VoiceAudio(
                    session_id=chunk.session_id,
                    seq=chunk.seq,
                    type=voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK,
                    data=chunk.data,
                )
                await call.write(voice_pb2.ServeVoiceRequest(audio=speech))
            elif body == "stop":
                end = voice_pb2.EndVoiceSession(session_id=message.stop.session_id)
                await call.write(voice_pb2.ServeVoiceRequest(end=end))


async def run_echo() -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
        host, port = server.sockets[0].getsockname()[:2]
        log_listening("echo", f"ws://{host}:{port}/")
        await asyncio.Future()


@contextlib.asynccontextmanager
async def car_grpc_with_engine() -> AsyncIterator[str]:
    """`car-grpc serve` and the bench engine, each in its own process; yields the WS URL."""
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth") as server:
            grpc_address, url = await server.listeners(2, timeout=30)
            engine = [sys.executable, "-m", "bench.bench_voice", "engine", grpc_address]
            async with launch(engine, stdin=True):
                yield url


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    async with launch([sys.executable, "-m", "bench.bench_voice", "echo"], stdin=True) as echo:
        [url] = await echo.listeners(1)
        yield url


# ------------------------------------------------------------------ the client


async def _binary(ws: ClientConnection) -> bytes:
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            return message


async def _open_session(ws: ClientConnection) -> uuid.UUID:
    start = {"jsonrpc": "2.0", "id": 1, "method": "voice.transcribe_stream.start"}
    async with asyncio.timeout(10):
        while True:  # the engine process may still be registering
            await ws.send(json.dumps(start))
            reply = json.loads(await ws.recv())
            if "result" in reply:
                return uuid.UUID(reply["result"]["session_id"])
            await asyncio.sleep(0.05)


async def measure(url: str, bridged: bool) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, chunks/s)."""
    async with connect(url, ping_interval=None, compression=None, max_size=None) as ws:
        session = await _open_session(ws) if bridged else uuid.uuid4()
        times = []
        for seq in range(ROUND_TRIPS):
            t = time.perf_counter()
            await ws.send(pcm_frame(session, seq))
            await _binary(ws)
            times.append(time.perf_counter() - t)
        times.sort()
        p50, p99 = times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3

        received = 0

        async def receive() -> None:
            nonlocal received
            for _ in range(CHUNKS):
                await _binary(ws)
                received += 1

        receiver = asyncio.create_task(receive())
        t = time.perf_counter()
        for seq in range(CHUNKS):
            await ws.send(pcm_frame(session, seq))
        # The flood is far beyond real time: when the core's events for this client pile
        # up past voice_event_queue, it ends the session and the rest never comes back.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECEIVE_TIMEOUT):
                await asyncio.shield(receiver)
        receiver.cancel()
        if received < CHUNKS:
            print(f"({'car-grpc' if bridged else 'echo'}: {received} of {CHUNKS} TTS chunks back;"
                  f" the session ended: its events piled up past voice_event_queue)")  # fmt: skip
        return p50, p99, received / (time.perf_counter() - t)


async def bench() -> None:
    async with echo_server() as url:
        bare = await measure(url, bridged=False)
    async with car_grpc_with_engine() as url:
        voice = await measure(url, bridged=True)
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'chunks/s':>12}{'audio x realtime':>18}")
    for name, (p50, p99, rate) in (("bare echo", bare), ("car-grpc + engine", voice)):
        print(f"{name:24}{p50:10.3f}{p99:10.3f}{rate:12.0f}{rate / 10:18.0f}")
    print(
        f"{'ratio':24}{voice[0] / bare[0]:10.2f}{voice[1] / bare[1]:10.2f}"
        f"{voice[2] / bare[2]:12.2f}"
    )
    summary.report(
        summary.at_least("voice chunks/s", f"{voice[2]:,.0f}/s", voice[2] / bare[2], 0.3, "echo")
    )


def main() -> None:
    if sys.argv[1:2] == ["engine"]:
        asyncio.run(run_engine(sys.argv[2]))
    elif sys.argv[1:2] == ["echo"]:
        asyncio.run(run_echo())
    else:
        asyncio.run(bench())


if __name__ == "__main__":
    main()
