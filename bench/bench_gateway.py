"""The WebSocket gateway against a bare `websockets` echo server, in one run.

Both servers run in their own process (as they would in production), the clients in this
one. The request is the same small JSON-RPC frame, `tools.list`: the echo server sends it
straight back; `car-grpc serve` (gateway -> gRPC Connect stream -> core -> back) answers it.

- latency: one client, sequential round trips: p50 and p99;
- throughput: 16 clients at once, each sequential, for a fixed time: round trips/s;
- scaling: the same with 1, 16, 64 and 256 clients: round trips/s and p99.

Figures are printed as ratios to the bare echo. Targets (the throughput issue): bridged
p50 at most 3x the echo, 16 clients' throughput at least 0.6x of it.

`car-grpc serve` runs twice: as it starts by default (`--gateway-processes auto`: on 2
CPUs or more the gateway in a process of its own, two cores) and with
`--gateway-processes 0` (the gateway in the core's process: one core).

A third server shows what the architecture itself costs: a relay that forwards each
WebSocket message, as opaque bytes, over a grpc.aio bidi stream to an echo servicer in the
same process and back (no JSON, no protobuf, no session logic). The gateway cannot beat
it; `gateway / relay` is what our own code adds on top of the two hops. The same relay with
its echo servicer in a process of its own (`relay-apart`: one client's p50 only) is the
floor of the default server, whose gateway and core are two processes: the summary's
floor for its one-client p50 (the one-process relay's for `--gateway-processes 0`).

A fourth, the multiplexed relay, shows what carrying many connections over few streams
could reach at best: every WebSocket connection of the process shares ONE grpc.aio bidi
stream (`BENCH_MUX_STREAMS` streams, default 1) to the same echo servicer; each gRPC
message carries every frame ready from any connection at that moment, each tagged with its
connection id (raw bytes: no JSON, no protobuf, no credits). Its writer lets the event
loop turn once before taking what is ready (no timer).

For every server the table also gives its CPU per round trip (the server's process and its
children, /proc/PID/stat), which a shared machine disturbs less than wall time.

    python -m bench bench_gateway          (or ./dev bench bench_gateway)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from bench import summary
from bench.proc import cpu_seconds
from tests.processes import car_grpc_serve, launch, log_listening

REQUEST = '{"jsonrpc":"2.0","id":1,"method":"tools.list"}'
WARMUP = 300
ROUND_TRIPS = 3000
CLIENTS = 16
THROUGHPUT_SECONDS = 3.0
SCALING = (1, 16, 64, 256)


# ------------------------------------------------------------------ the servers


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def run_echo_server() -> None:
    """`python -m bench.bench_gateway echo`: log the URL, echo until stdin closes."""
    async with serve(_echo, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
        log_listening("echo", f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


_RELAY_METHOD = "/bench.Relay/Echo"


async def _grpc_echo(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        await context.write(message)


Behaviour = Callable[[object, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


async def relay_servicer(
    behaviour: Behaviour, add: Callable[[grpc.aio.Server], None] | None = None
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server of the relays' one bytes method (`_RELAY_METHOD`) served by
    `behaviour` (and of what `add` adds to it), started on a free loopback port: the
    server and its port."""
    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(behaviour)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Relay", {"Echo": handler})]
    )
    if add is not None:
        add(server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc_port


@contextlib.asynccontextmanager
async def grpc_echo() -> AsyncIterator[grpc.aio.StreamStreamMultiCallable[bytes, bytes]]:
    """A grpc.aio echo servicer in this process, and the method that opens a stream to it."""
    server, grpc_port = await relay_servicer(_grpc_echo)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield channel.stream_stream(_RELAY_METHOD)
    await server.stop(0)


@contextlib.asynccontextmanager
async def grpc_echo_apart() -> AsyncIterator[grpc.aio.StreamStreamMultiCallable[bytes, bytes]]:
    """The same echo servicer in a process of its own (`grpc-echo`), as `car-grpc serve`
    has its core apart from its gateway, and the method that opens a stream to it."""
    argv = [sys.executable, "-m", "bench.bench_gateway", "grpc-echo"]
    async with launch(argv, stdin=True) as servicer:
        [address] = await servicer.listeners(1)
        async with grpc.aio.insecure_channel(address) as channel:
            yield channel.stream_stream(_RELAY_METHOD)


async def run_grpc_echo_server() -> None:
    """`python -m bench.bench_gateway grpc-echo`: the relays' echo servicer alone."""
    server, grpc_port = await relay_servicer(_grpc_echo)
    log_listening("grpc echo", f"127.0.0.1:{grpc_port}")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


async def run_relay_server(*, apart: bool = False) -> None:
    """`python -m bench.bench_gateway relay`: WebSocket -> grpc.aio stream -> echo -> back;
    `relay-apart`: the echo servicer in a process of its own (two processes, as
    `car-grpc serve` runs by default: the floor of its one-client round trip)."""
    async with grpc_echo_apart() if apart else grpc_echo() as echo:

        async def relay(ws: ServerConnection) -> None:
            call = echo()
            async for message in ws:
                await call.write(message.encode() if isinstance(message, str) else message)
                answer = await call.read()
                assert isinstance(answer, bytes)
                await ws.send(answer.decode())
            call.cancel()

        async with serve(relay, "127.0.0.1", 0, ping_interval=None, compression=None) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            log_listening("relay", f"ws://127.0.0.1:{port}/")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


#: A frame on the multiplexed stream: connection id, payload length, then the payload.
_MUX_HEADER = struct.Struct("<II")
MUX_STREAMS = int(os.environ.get("BENCH_MUX_STREAMS", "1"))


def mux_frame(conn_id: int, data: bytes) -> bytes:
    """`data` tagged for the multiplexed stream: connection id and length first."""
    return _MUX_HEADER.pack(conn_id, len(data)) + data


def mux_frames(message: bytes) -> Iterator[tuple[int, bytes]]:
    """The (connection id, payload) of each frame of a message of the multiplexed stream."""
    offset = 0
    while offset < len(message):
        conn_id, length = _MUX_HEADER.unpack_from(message, offset)
        offset += _MUX_HEADER.size
        yield conn_id, message[offset : offset + length]
        offset += length


#: Bytes of one message of the multiplexed stream at most (a frame larger goes alone):
#: frames that piled up while the relay was descheduled (a voice flood: thousands of
#: 3 KiB chunks) once made one message past grpc's 4 MiB limit, which ended the stream.
MUX_MESSAGE_BYTES = 1 << 20


def _messages(frames: list[bytes]) -> Iterator[bytes]:
    """`frames`, in order, joined into messages of at most MUX_MESSAGE_BYTES each."""
    start, size = 0, 0
    for i, frame in enumerate(frames):
        if size + len(frame) > MUX_MESSAGE_BYTES and i > start:
            yield b"".join(frames[start:i])
            start, size = i, 0
        size += len(frame)
    if start < len(frames):
        yield b"".join(frames[start:])


class MuxStream:
    """One shared grpc.aio stream to the echo servicer: `send` queues a tagged frame, every
    frame ready at once goes in one message, and each frame echoed back is handed to
    `deliver(conn_id, payload)`."""

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[bytes, bytes],
        deliver: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        self.call = call
        self.deliver = deliver
        self.pending: list[bytes] = []
        self.ready = asyncio.Event()
        self.tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    def send(self, conn_id: int, data: bytes) -> None:
        self.pending.append(mux_frame(conn_id, data))
        self.ready.set()

    async def _write(self) -> None:
        while True:  # one write in flight; what arrives meanwhile goes in the next
            await self.ready.wait()
            # One turn of the event loop lets every connection already readable add
            # its frame: 2-4x the frames per message at 16-64 clients, no timer.
            await asyncio.sleep(0)
            self.ready.clear()
            frames, self.pending = self.pending, []
            for message in _messages(frames):
                await self.call.write(message)

    async def _read(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            assert isinstance(message, bytes)
            for conn_id, payload in mux_frames(message):
                with contextlib.suppress(Exception):
                    await self.deliver(conn_id, payload)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.call.cancel()


@contextlib.asynccontextmanager
async def mux_echo(
    streams: int, deliver: Callable[[int, bytes], Awaitable[None]], core: str | None = None
) -> AsyncIterator[list[MuxStream]]:
    """A grpc.aio echo servicer in this process and `streams` shared streams to it; or,
    given `core` (a host:port), `streams` shared streams to the same method served by
    another process (bench_runs' floor core, which answers instead of echoing)."""
    async with contextlib.AsyncExitStack() as stack:
        if core is None:
            echo = await stack.enter_async_context(grpc_echo())
        else:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(core))
            echo = channel.stream_stream(_RELAY_METHOD)
        shared = [MuxStream(echo(), deliver) for _ in range(streams)]
        try:
            yield shared
        finally:
            for stream in shared:
                stream.close()


async def run_mux_relay_server(
    streams: int = MUX_STREAMS, *, text: bool = True, core: str | None = None
) -> None:
    """`python -m bench.bench_gateway mux [CORE]`: every WebSocket connection over `streams`
    shared grpc.aio streams to the echo servicer (or to CORE's, see `mux_echo`); a message
    carries every frame ready at once. Frames go back as text messages, or (`text=False`)
    as binary ones."""
    connections: dict[int, ServerConnection] = {}

    async def deliver(conn_id: int, payload: bytes) -> None:
        if (ws := connections.get(conn_id)) is not None:
            await ws.send(payload.decode() if text else payload)

    async with mux_echo(streams, deliver, core) as shared:
        ids = iter(range(1 << 32))

        async def relay(ws: ServerConnection) -> None:
            conn_id = next(ids)
            stream = shared[conn_id % streams]
            connections[conn_id] = ws
            try:
                async for message in ws:
                    stream.send(conn_id, message.encode() if isinstance(message, str) else message)
            finally:
                del connections[conn_id]

        async with serve(
            relay, "127.0.0.1", 0, ping_interval=None, compression=None, max_size=None
        ) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            log_listening("mux relay", f"ws://127.0.0.1:{port}/")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run_floor_processes(
    name: str, behaviour: Behaviour, add: Callable[[grpc.aio.Server], None] | None = None
) -> None:
    """A floor's bare core in this process (`relay_servicer(behaviour, add)`) and the
    multiplexed relay to it in a process of its own (`mux` CORE), as `car-grpc serve` starts
    its gateway: logs the core's gRPC address, then the relay's URL; serves until stdin
    closes."""
    server, port = await relay_servicer(behaviour, add)
    log_listening(f"{name} core: gRPC", f"127.0.0.1:{port}")
    argv = [sys.executable, "-m", "bench.bench_gateway", "mux", f"127.0.0.1:{port}"]
    async with launch(argv, name=f"{name} relay", stdin=True) as relay:
        [url] = await relay.listeners(1)
        log_listening(f"{name} relay: WebSocket", url)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


@dataclass
class Server:
    url: str
    pid: int


@contextlib.asynccontextmanager
async def echo_server(kind: str = "echo") -> AsyncIterator[Server]:
    """A bench server of this module in its own process (`echo`, `relay`, `relay-apart`
    or `mux`)."""
    async with launch([sys.executable, "-m", "bench.bench_gateway", kind], stdin=True) as server:
        [url] = await server.listeners(1)
        yield Server(url, server.proc.pid)


@contextlib.asynccontextmanager
async def car_grpc_server(*flags: str) -> AsyncIterator[Server]:
    """`car-grpc serve` with its own CAR_HOME, on ephemeral ports."""
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth", *flags) as server:
            _, url = await server.listeners(2, timeout=30)
            yield Server(url, server.proc.pid)


# ------------------------------------------------------------------ the clients


async def _open(url: str, bridged: bool) -> ClientConnection:
    ws = await connect(url, ping_interval=None, compression=None, max_size=None)
    if bridged:
        for request in (
            {"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {}},
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "server.handshake",
                "params": {"protocol_version": 3},
            },
        ):
            await ws.send(json.dumps(request))
            assert "result" in json.loads(await ws.recv()), "bridged session did not open"
    return ws


async def _round_trip(ws: ClientConnection) -> None:
    await ws.send(REQUEST)
    await ws.recv()


async def latency(url: str, bridged: bool) -> list[float]:
    ws = await _open(url, bridged)
    try:
        for _ in range(WARMUP):
            await _round_trip(ws)
        samples = []
        clock = time.perf_counter
        for _ in range(ROUND_TRIPS):
            start = clock()
            await _round_trip(ws)
            samples.append(clock() - start)
        return samples
    finally:
        await ws.close()


async def throughput(
    server: Server, bridged: bool, count: int = CLIENTS
) -> tuple[float, float, float]:
    """`count` clients, each one round trip after another: round trips/s, p99 in us, and
    the server's CPU per round trip in us."""
    clients = [await _open(server.url, bridged) for _ in range(count)]
    samples: list[float] = []
    go = asyncio.Event()

    async def loop(ws: ClientConnection, until: float) -> None:
        await go.wait()
        clock = time.perf_counter
        while (start := clock()) < until:
            await _round_trip(ws)
            samples.append(clock() - start)

    try:
        for ws in clients:  # warm up every connection
            await _round_trip(ws)
        cpu = cpu_seconds(server.pid)
        start = time.perf_counter()
        until = start + THROUGHPUT_SECONDS
        tasks = [asyncio.create_task(loop(ws, until)) for ws in clients]
        go.set()
        await asyncio.gather(*tasks)
        rate = len(samples) / (time.perf_counter() - start)
        cpu_us = (cpu_seconds(server.pid) - cpu) / len(samples) * 1e6
        samples.sort()
        return rate, samples[int(len(samples) * 0.99) - 1] * 1e6, cpu_us
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))


# ------------------------------------------------------------------ report


@dataclass
class Figures:
    p50_us: float
    p99_us: float
    #: By number of clients: round trips/s, p99 (us), server CPU per round trip (us).
    scaling: dict[int, tuple[float, float, float]]

    @property
    def rps(self) -> float:
        return self.scaling[CLIENTS][0]


async def measure(server: Server, bridged: bool) -> Figures:
    samples = sorted(await latency(server.url, bridged))
    p99 = samples[int(len(samples) * 0.99) - 1]
    scaling = {n: await throughput(server, bridged, n) for n in SCALING}
    return Figures(statistics.median(samples) * 1e6, p99 * 1e6, scaling)


async def run() -> tuple[Figures, Figures, Figures, Figures, Figures, float]:
    async with echo_server() as server:
        echo = await measure(server, bridged=False)
    async with echo_server("relay") as server:
        relay = await measure(server, bridged=False)
    async with echo_server("relay-apart") as server:  # one client's p50 only
        apart_p50 = statistics.median(await latency(server.url, bridged=False)) * 1e6
    async with echo_server("mux") as server:
        mux = await measure(server, bridged=False)
    async with car_grpc_server() as server:
        bridged = await measure(server, bridged=True)
    async with car_grpc_server("--gateway-processes", "0") as server:
        single = await measure(server, bridged=True)
    return echo, relay, mux, bridged, single, apart_p50


def main() -> None:
    started = time.perf_counter()
    echo, relay, mux, bridged, single, apart_p50 = asyncio.run(run())
    print(
        f"{'':26}{'bare echo':>10}{'WS+gRPC relay':>15}{'gateway->core':>15}"
        f"{'gateway/echo':>14}{'gateway/relay':>15}{'1 process':>13}{'/echo':>7}"
    )
    rows = [
        ("p50 round trip (us)", echo.p50_us, relay.p50_us, bridged.p50_us, single.p50_us),
        ("p99 round trip (us)", echo.p99_us, relay.p99_us, bridged.p99_us, single.p99_us),
        (f"throughput, {CLIENTS} clients (/s)", echo.rps, relay.rps, bridged.rps, single.rps),
    ]
    for name, e, r, b, s in rows:
        print(
            f"{name:26}{e:10.0f}{r:15.0f}{b:15.0f}{b / e:13.2f}x{b / r:14.2f}x{s:13.0f}"
            f"{s / e:6.2f}x"
        )
    print(
        f"p50 round trip of the relay with its echo servicer in a process of its own (the "
        f"floor of the default, two processes): {apart_p50:.0f} us, {apart_p50 / echo.p50_us:.2f}x"
        f" echo; car-grpc serve {bridged.p50_us / apart_p50:.2f}x it"
    )
    print(
        "\nscaling: round trips/s (p99 us) [server CPU us per round trip] by number of "
        "clients, each one request in flight"
    )
    columns = ("bare echo", "WS+gRPC relay", f"mux relay ({MUX_STREAMS})", "car-grpc serve",
               "1 process")  # fmt: skip
    print(f"{'clients':>8}" + "".join(f"{n:>28}" for n in columns)
          + f"{'mux/echo':>10}{'mux/car':>9}{'car/echo':>10}")  # fmt: skip
    for n in SCALING:
        cells = [
            f"{f.scaling[n][0]:7.0f} ({f.scaling[n][1]:6.0f}) [{f.scaling[n][2]:4.0f}]"
            for f in (echo, relay, mux, bridged, single)
        ]
        print(
            f"{n:8d}" + "".join(f"{c:>28}" for c in cells)
            + f"{mux.scaling[n][0] / echo.scaling[n][0]:9.2f}x"
            + f"{mux.scaling[n][0] / bridged.scaling[n][0]:8.2f}x"
            + f"{bridged.scaling[n][0] / echo.scaling[n][0]:9.2f}x"
        )  # fmt: skip
    print(
        f"one client x {ROUND_TRIPS} round trips; clients x {THROUGHPUT_SECONDS:g}s each; "
        f"mux relay: every connection over {MUX_STREAMS} grpc.aio stream(s) "
        f"(BENCH_MUX_STREAMS); car-grpc serve: its default (--gateway-processes auto); "
        f"`1 process`: car-grpc serve --gateway-processes 0; "
        f"ran in {time.perf_counter() - started:.0f}s"
    )
    summary.report(
        summary.at_least(
            f"{CLIENTS} clients, tools.list round trips/s",
            f"{bridged.rps:,.0f}/s",
            bridged.rps / echo.rps,
            0.6,
            "echo",
            mux.rps / echo.rps,
        ),
        summary.at_least(
            "  the same, --gateway-processes 0",
            f"{single.rps:,.0f}/s",
            single.rps / echo.rps,
            0.6,
            "echo",
            mux.rps / echo.rps,
        ),
        summary.at_most(
            "one client, tools.list p50",
            f"{bridged.p50_us:,.0f} us",
            bridged.p50_us / echo.p50_us,
            3.0,
            "echo",
            apart_p50 / echo.p50_us,  # its floor: two processes, as it runs by default
        ),
        summary.at_most(
            "  the same, --gateway-processes 0",
            f"{single.p50_us:,.0f} us",
            single.p50_us / echo.p50_us,
            3.0,
            "echo",
            relay.p50_us / echo.p50_us,
        ),
        summary.Figure(
            f"  bare multiplexed relay ({MUX_STREAMS} stream), {CLIENTS} clients",
            f"{mux.rps:,.0f}/s ({mux.rps / bridged.rps:.1f}x car-grpc)",
            mux.rps / echo.rps,
            "(x echo)",
        ),
        *(
            summary.Figure(
                f"scaling, {n} clients: round trips/s (p99)",
                f"{bridged.scaling[n][0]:,.0f}/s ({bridged.scaling[n][1] / 1000:.1f} ms)",
                bridged.scaling[n][0] / echo.scaling[n][0],
                "(x echo)",
            )
            for n in SCALING
        ),
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["echo"]:
        asyncio.run(run_echo_server())
    elif sys.argv[1:] == ["relay"]:
        asyncio.run(run_relay_server())
    elif sys.argv[1:] == ["relay-apart"]:
        asyncio.run(run_relay_server(apart=True))
    elif sys.argv[1:] == ["grpc-echo"]:
        asyncio.run(run_grpc_echo_server())
    elif sys.argv[1:2] == ["mux"] and len(sys.argv) <= 3:
        asyncio.run(run_mux_relay_server(core=sys.argv[2] if len(sys.argv) == 3 else None))
    else:
        main()
