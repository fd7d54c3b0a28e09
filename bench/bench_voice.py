"""Audio through car-grpc (client -> gateway -> core -> speech engine and back) against a
bare `websockets` echo of the same binary frames.

Three processes for car-grpc: `car-grpc serve`, an engine (this module's `engine` mode:
a ServeVoiceBatched client that answers every PCM chunk with a small partial-transcript event and
speaks the chunk back as a TTS chunk) and the client in this process. The baseline echo
server runs in its own process too. Frames are 100 ms of 16 kHz PCM16 (3200 bytes) in the
26-byte CAR binary frame.

- latency: one chunk at a time, PCM frame out -> TTS frame back: p50 and p99;
- throughput: CHUNKS chunks sent as fast as the socket takes them, timed until the last
  TTS frame is back: chunks/s (and how many seconds of audio that is per second), and the
  CPU time of the server processes per chunk.
- the floor beside them: the same client through a bare relay (`run_relay`), each frame
  over one shared grpc.aio stream to an echo and back.

The three servers run at once and get ROUNDS throughput windows each, in turn (after a
warm-up round): the echo's window is short (5,000 chunks in 0.08-0.12 s quiet), so one
window of it, measured seconds before car-grpc's, compared two moments of the machine more
than the two paths. The ratio reported is the median of the rounds' ratios.

Then speech to text with the reference engine (`car-grpc voice-engine`, PocketSphinx) beside
the same echo engine, on espeak-ng's speech of SPOKEN (six phrases, a second apart, 22,050
Hz: resampled by the engine):

- real-time factor: the audio sent in 100 ms chunks as fast as flow control lets them
  through, then stop; seconds of audio per CPU second of the engine's process (from
  /proc/PID/stat), and the wall-clock rate;
- latency: each phrase alone, its chunks paced in real time, then stop at once, as a
  push-to-talk client does: the time from the last chunk to the final transcript (for the
  echo engine, to the event answering the last chunk); p50 and max of the six.

The engine serves `sphinx` with the phrases as a grammar (`options.phrases`) and with its
general English language model; the phrases it got exactly right are counted.

    python -m bench bench_voice          (or ./dev bench bench_voice)
    python -m bench.bench_voice flood    (the first part only: latency and chunks/s)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from bench import summary
from bench.bench_gateway import run_mux_relay_server
from bench.proc import cpu_seconds
from car_grpc.v1 import voice_pb2, voice_pb2_grpc
from car_grpc.wire import codec
from tests.processes import car_grpc_argv, car_grpc_serve, cli_env, launch, log_listening
from tests.voice_helpers import VoiceRpc, chunks, say, silence, voice_rpc

CHUNK = 3200  # 100 ms of 16 kHz mono PCM16
ROUND_TRIPS = 500
#: Chunks a throughput window (a flood), and the windows each server is given (after a
#: warm-up one): the rates and their ratio are medians of those.
CHUNKS = 5000
ROUNDS = 7
#: Longest the throughput phase waits for the last TTS chunk once every chunk is sent.
RECEIVE_TIMEOUT = 30.0


def pcm_frame(session: uuid.UUID, seq: int) -> bytes:
    return b"\x01" + session.bytes + struct.pack("<Q", seq) + b"\x00" + b"\x00" * CHUNK


# ------------------------------------------------------------------ the other processes


async def run_engine(address: str) -> None:
    """A speech engine: every PCM chunk gets a partial event and its audio spoken back.

    It holds ServeVoiceBatched, as an engine written against voice.proto would: the
    answers to every message of a batch leave together, at most BATCH_MESSAGES and about
    BATCH_BYTES a gRPC message (the bounds the proto states), with `taken` for each
    session's last chunk after them (it registers with acknowledges_audio)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).ServeVoiceBatched()
        register = voice_pb2.RegisterVoiceEngine(
            engine="bench", providers=["bench"], acknowledges_audio=True
        )
        await call.write(batch_of([voice_pb2.ServeVoiceRequest(register=register)]))
        async for received in call:
            answers = Answers()
            last: dict[str, int] = {}  # session -> its last chunk in this batch
            for message in received.messages:
                body = message.WhichOneof("body")
                if body == "registered":
                    print("registered", flush=True)  # what bench_engines waits for
                elif body == "open":
                    answer = voice_pb2.VoiceSessionAnswer(session_id=message.open.session_id)
                    answers.add(voice_pb2.ServeVoiceRequest(answer=answer))
                elif body == "audio":
                    chunk = message.audio
                    answers.partial(chunk.session_id)
                    answers.speak(chunk.session_id, chunk.seq, chunk.data)
                    last[chunk.session_id] = chunk.seq
                elif body == "stop":
                    end = voice_pb2.EndVoiceSession(session_id=message.stop.session_id)
                    answers.add(voice_pb2.ServeVoiceRequest(end=end))
            for session_id, seq in last.items():
                taken = voice_pb2.VoiceAudioTaken(session_id=session_id, seq=seq)
                answers.add(voice_pb2.ServeVoiceRequest(taken=taken))
            for batch in answers.batches:
                await call.write(batch)


#: What one ServeVoiceBatched message may hold (voice.proto).
BATCH_MESSAGES = 256
BATCH_BYTES = 1024 * 1024
#: The partial transcript the engine answers every chunk with.
PARTIAL = codec.to_value({"type": "transcript", "final": False, "text": "..."})
#: A session's partial event as a serialized ServeVoiceRequest (it is the same every time).
_partials: dict[str, bytes] = {}


class Answers:
    """The engine's answers to one received message, as ServeVoiceBatchedRequests within
    the bounds. Each answer is written into its batch in place (no message built, copied
    in and sized twice per answer: this is the bench's engine, not the server under test)."""

    def __init__(self) -> None:
        self.batches: list[voice_pb2.ServeVoiceBatchedRequest] = []
        self._add: Callable[[], voice_pb2.ServeVoiceRequest] | None = None  # the last's
        self._count = self._size = 0

    def _room(self, size: int) -> voice_pb2.ServeVoiceRequest:
        """The next message of the batch that has room for `size` more bytes."""
        if self._add is None or self._count == BATCH_MESSAGES or self._size + size > BATCH_BYTES:
            self.batches.append(voice_pb2.ServeVoiceBatchedRequest())
            self._add = self.batches[-1].messages.add
            self._count = self._size = 0
        self._count += 1
        self._size += size
        return self._add()

    def add(self, message: voice_pb2.ServeVoiceRequest) -> None:
        self._room(message.ByteSize()).CopyFrom(message)

    def partial(self, session_id: str) -> None:
        serialized = _partials.get(session_id)
        if serialized is None:
            event = voice_pb2.VoiceEngineEvent(session_id=session_id, event=PARTIAL)
            serialized = voice_pb2.ServeVoiceRequest(event=event).SerializeToString()
            if len(_partials) < 1024:  # (a cache, bounded: the bench has one session)
                _partials[session_id] = serialized
        self._room(len(serialized)).MergeFromString(serialized)

    def speak(self, session_id: str, seq: int, data: bytes) -> None:
        # A ServeVoiceRequest's size: the audio's fields and their tags and lengths (at
        # most 32 bytes beyond the id and the data, which are under 2 MiB here).
        speech = self._room(len(session_id) + len(data) + 32).audio
        speech.session_id = session_id
        speech.seq = seq
        speech.type = voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK
        speech.data = data


def batch_of(messages: list[voice_pb2.ServeVoiceRequest]) -> voice_pb2.ServeVoiceBatchedRequest:
    return voice_pb2.ServeVoiceBatchedRequest(messages=messages)


async def run_echo() -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
        host, port = server.sockets[0].getsockname()[:2]
        log_listening("echo", f"ws://{host}:{port}/")
        await asyncio.Future()


async def run_relay() -> None:
    """The floor of the path: each binary frame, as opaque bytes, over one shared grpc.aio
    stream to an echo servicer and back (bench_gateway's multiplexed relay): one gRPC hop
    where car-grpc has two (gateway -> core -> engine), no protobuf, no session."""
    await run_mux_relay_server(1, text=False)


@contextlib.asynccontextmanager
async def car_grpc_with_engine() -> AsyncIterator[tuple[str, list[int]]]:
    """`car-grpc serve` and the bench engine, each in its own process; yields the WS URL
    and the two process ids."""
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth") as server:
            grpc_address, url = await server.listeners(2, timeout=30)
            engine = [sys.executable, "-m", "bench.bench_voice", "engine", grpc_address]
            async with launch(engine, stdin=True) as engine_process:
                yield url, [server.proc.pid, engine_process.proc.pid]


@contextlib.asynccontextmanager
async def echo_server(kind: str = "echo") -> AsyncIterator[tuple[str, list[int]]]:
    """The bare echo (`echo`) or the floor's relay (`relay`) in its own process."""
    async with launch([sys.executable, "-m", "bench.bench_voice", kind], stdin=True) as echo:
        [url] = await echo.listeners(1)
        yield url, [echo.proc.pid]


# ------------------------------------------------------------------ the client


async def _binary(ws: ClientConnection) -> bytes:
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            return message


async def open_session(ws: ClientConnection) -> uuid.UUID:
    start = {"jsonrpc": "2.0", "id": 1, "method": "voice.transcribe_stream.start"}
    async with asyncio.timeout(10):
        while True:  # the engine process may still be registering
            await ws.send(json.dumps(start))
            reply = json.loads(await ws.recv())
            if "result" in reply:
                return uuid.UUID(reply["result"]["session_id"])
            await asyncio.sleep(0.05)


async def latency(ws: ClientConnection, session: uuid.UUID) -> tuple[float, float]:
    """One chunk at a time, ROUND_TRIPS times: the p50 and p99 of a round trip, in ms."""
    times = []
    for seq in range(ROUND_TRIPS):
        t = time.perf_counter()
        await ws.send(pcm_frame(session, seq))
        await _binary(ws)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3


async def flood(
    ws: ClientConnection, session: uuid.UUID, pids: list[int], count: int, name: str
) -> tuple[float, float]:
    """The throughput phase: `count` chunks sent as fast as the socket takes them, timed
    until the last TTS chunk is back: chunks/s and the CPU time of `pids` per chunk (us)."""
    received = 0

    async def receive() -> None:
        nonlocal received
        for _ in range(count):
            await _binary(ws)
            received += 1

    receiver = asyncio.create_task(receive())
    t, cpu = time.perf_counter(), sum(map(cpu_seconds, pids))
    for seq in range(count):
        await ws.send(pcm_frame(session, seq))
    # The flood is far beyond real time: when the core's events for this client pile up
    # past voice_event_queue, it ends the session and the rest never comes back.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            await asyncio.shield(receiver)
    receiver.cancel()
    if received < count:
        print(f"({name}: {received} of {count} TTS chunks back;"
              f" the session ended: its events piled up past voice_event_queue)")  # fmt: skip
    rate = received / (time.perf_counter() - t)
    cpu_us = (sum(map(cpu_seconds, pids)) - cpu) / max(received, 1) * 1e6
    return rate, cpu_us


@dataclass
class Side:
    """One of the three servers measured: its latency and its floods' figures."""

    name: str
    url: str
    bridged: bool
    #: Its processes (car-grpc serve and the engine, or the echo or relay server): the
    #: CPU per chunk is theirs, less disturbed than the rate on a busy machine.
    pids: list[int]
    #: Its client's one connection and session (every flood's).
    ws: ClientConnection | None = None
    session: uuid.UUID = field(default_factory=uuid.uuid4)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def _spread(values: list[float], form: str) -> str:
    return f"{statistics.median(values):{form}} ({min(values):{form}}-{max(values):{form}})"


async def bench() -> None:
    async with contextlib.AsyncExitStack() as stack:
        echo_url, echo_pids = await stack.enter_async_context(echo_server())
        relay_url, relay_pids = await stack.enter_async_context(echo_server("relay"))
        url, pids = await stack.enter_async_context(car_grpc_with_engine())
        sides = [
            Side("bare echo", echo_url, False, echo_pids),
            Side("WS+gRPC relay (floor)", relay_url, False, relay_pids),
            Side("car-grpc + engine", url, True, pids),
        ]
        for side in sides:  # one client session a side, as a voice client holds one
            side.ws = ws = await stack.enter_async_context(
                connect(side.url, ping_interval=None, compression=None, max_size=None)
            )
            if side.bridged:
                side.session = await open_session(ws)
            side.p50_ms, side.p99_ms = await latency(ws, side.session)
        # The three servers are up together and flooded in turn, round after round (the
        # order reversed every other round, the first a warm-up): each ratio is of floods
        # a few hundred ms apart, so the machine's load is the same on both sides of it.
        for n in range(ROUNDS + 1):
            for side in sides if n % 2 else sides[::-1]:
                assert side.ws is not None
                rate, cpu_us = await flood(side.ws, side.session, side.pids, CHUNKS, side.name)
                if n:
                    side.rates.append(rate)
                    side.cpu_us.append(cpu_us)
    bare, floor, voice = sides
    print(
        f"{'':24}{'p50 ms':>8}{'p99 ms':>8}{'chunks/s, median (range)':>30}"
        f"{'x realtime':>12}{'CPU us/chunk':>22}"
    )
    for side in sides:
        print(
            f"{side.name:24}{side.p50_ms:8.3f}{side.p99_ms:8.3f}{_spread(side.rates, ',.0f'):>30}"
            f"{statistics.median(side.rates) / 10:12,.0f}{_spread(side.cpu_us, '.1f'):>22}"
        )
    ratios = [v / b for v, b in zip(voice.rates, bare.rates, strict=True)]
    floors = [f / b for f, b in zip(floor.rates, bare.rates, strict=True)]
    print(
        f"car-grpc / bare echo, round by round: chunks/s {_spread(ratios, '.2f')}x,"
        f" the floor's {_spread(floors, '.2f')}x; p50 {voice.p50_ms / bare.p50_ms:.1f}x,"
        f" p99 {voice.p99_ms / bare.p99_ms:.1f}x; {ROUNDS} rounds of {CHUNKS:,} chunks a side"
    )
    summary.report(
        summary.at_least(
            "voice chunks/s",
            f"{statistics.median(voice.rates):,.0f}/s",
            statistics.median(ratios),
            0.3,
            "echo",
            statistics.median(floors),
        )
    )


# ------------------------------------------------------------------ the reference engine

SPOKEN = [
    "open the pod bay doors please",
    "close the pod bay doors",
    "turn on the lights",
    "stop the music",
    "play some music",
    "turn off the lights",
]


@dataclass
class EngineRun:
    audio_seconds: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    exact: int = 0


async def _next_event(c: VoiceRpc) -> dict[str, Any]:
    """The next voice event; the answers to stop (not awaited) are read aside."""
    while True:
        frame = await c.next_frame(timeout=120)
        if frame.get("method") == "voice.event":
            return dict(frame["params"]["event"])


async def _send(c: VoiceRpc, session: str, parts: list[bytes], pace: float = 0.0) -> None:
    for seq, part in enumerate(parts):
        await c.ws.send(
            b"\x01" + uuid.UUID(session).bytes + struct.pack("<Q", seq) + b"\x00" + part
        )
        if pace:
            await asyncio.sleep(pace)


async def _stop(c: VoiceRpc, session: str) -> None:
    """Stop without waiting for the answer (read later, aside)."""
    stop = {"session_id": session}
    await c.send(
        {"jsonrpc": "2.0", "id": "stop", "method": "voice.transcribe_stream.stop", "params": stop}
    )


async def measure_engine(
    url: str, pid: int, provider: str, options: dict[str, Any], finals: bool
) -> EngineRun:
    """The run of one provider (module docstring). `finals`: it sends final transcripts
    (else, like the echo engine, one event per chunk)."""
    phrases = [say(text) for text in SPOKEN]
    rate = phrases[0][1]
    run = EngineRun()
    async with voice_rpc(url) as c:
        # Real-time factor: everything at once, timed until the engine has caught up (the
        # last phrase's final segment, or the echo of the last chunk). Only then stop: the
        # core gives a stopped session 5 s to end, and a backlog may take longer.
        audio = b"".join(pcm + silence(1, rate) for pcm, _ in phrases)
        last_phrase_ms = (len(audio) - len(phrases[-1][0])) / 2 / rate * 1000 - 1000
        parts = chunks(audio, rate)
        session = (await c.start(provider=provider, options=options))["session_id"]
        before, t = cpu_seconds(pid), time.perf_counter()
        await _send(c, session, parts)
        texts, count = [], 0
        while True:
            event = await _next_event(c)
            count += 1
            if event.get("final"):
                texts.append(event["text"])
            if event.get("end_ms", 0) >= last_phrase_ms if finals else count == len(parts):
                break
        run.wall_seconds = time.perf_counter() - t
        run.cpu_seconds = cpu_seconds(pid) - before
        run.audio_seconds = len(audio) / 2 / rate
        run.exact = sum(1 for said, heard in zip(SPOKEN, texts, strict=False) if said == heard)
        await _stop(c, session)
        while not (await _next_event(c)).get("terminal"):
            pass
        # Latency: one phrase at a time, in real time.
        for pcm, _ in phrases:
            session = (await c.start(provider=provider, options=options))["session_id"]
            parts = chunks(pcm, rate)
            await _send(c, session, parts[:-1], pace=0.1)
            t = time.perf_counter()
            await _send(c, session, parts[-1:])
            await _stop(c, session)
            count, heard = 0, False
            while True:
                event = await _next_event(c)
                count += 1
                if not heard and (event.get("final") if finals else count == len(parts)):
                    run.latencies.append(time.perf_counter() - t)
                    heard = True
                if event.get("terminal"):  # (a phrase heard as nothing has no latency)
                    break
    return run


async def bench_engines() -> None:
    grammar = {"sample_rate": 22050, "phrases": SPOKEN}
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth") as server:
            grpc_address, url = await server.listeners(2, timeout=30)
            echo = [sys.executable, "-m", "bench.bench_voice", "engine", grpc_address]
            real = car_grpc_argv("voice-engine", "--core", grpc_address)
            async with (
                launch(echo, stdin=True) as echo_engine,
                launch(real, name="voice-engine", env=cli_env(home)) as real_engine,
            ):
                await real_engine.next_line("serving providers", timeout=30)
                await echo_engine.next_line("registered", timeout=30)
                runs = {
                    "echo engine": await measure_engine(
                        url, echo_engine.proc.pid, "bench", {}, finals=False
                    ),
                    "sphinx, phrases (grammar)": await measure_engine(
                        url, real_engine.proc.pid, "sphinx", grammar, finals=True
                    ),
                    "sphinx, general English": await measure_engine(
                        url, real_engine.proc.pid, "sphinx", {"sample_rate": 22050}, finals=True
                    ),
                }
    print(
        f"{'':28}{'audio s':>9}{'CPU s':>8}{'RTF':>9}{'x realtime':>12}"
        f"{'p50 ms':>9}{'max ms':>9}{'exact':>7}"
    )
    for name, run in runs.items():
        latencies = sorted(run.latencies) or [math.nan]
        exact = f"{run.exact}/{len(SPOKEN)}" if name.startswith("sphinx") else ""
        print(
            f"{name:28}{run.audio_seconds:9.1f}{run.cpu_seconds:8.2f}"
            f"{run.audio_seconds / max(run.cpu_seconds, 0.01):9.1f}"
            f"{run.audio_seconds / run.wall_seconds:12.1f}"
            f"{latencies[len(latencies) // 2] * 1e3:9.1f}{latencies[-1] * 1e3:9.1f}{exact:>7}"
        )


def main() -> None:
    if sys.argv[1:2] == ["engine"]:
        asyncio.run(run_engine(sys.argv[2]))
    elif sys.argv[1:2] == ["echo"]:
        asyncio.run(run_echo())
    elif sys.argv[1:2] == ["relay"]:
        asyncio.run(run_relay())
    elif sys.argv[1:2] == ["flood"]:  # the first part only (the reference engine is slow)
        asyncio.run(bench())
    else:
        asyncio.run(bench())
        asyncio.run(bench_engines())


if __name__ == "__main__":
    main()
