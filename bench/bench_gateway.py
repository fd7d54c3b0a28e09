"""The WebSocket gateway against a bare `websockets` echo server, in one run.

Both servers run in their own process (as they would in production), the clients in this
one. The request is the same small JSON-RPC frame, `tools.list`: the echo server sends it
straight back; `car-grpc serve` (gateway -> gRPC Connect stream -> core -> back) answers it.

- latency: one client, sequential round trips: p50 and p99;
- throughput: 16 clients at once, each sequential, for a fixed time: round trips/s.

Figures are printed as ratios to the bare echo. Target: bridged p50 at most 2x the echo,
throughput at least half of it.

A third server shows what the architecture itself costs: a relay that forwards each
WebSocket message, as opaque bytes, over a grpc.aio bidi stream to an echo servicer in the
same process and back (no JSON, no protobuf, no session logic). The gateway cannot beat
it; `gateway / relay` is what our own code adds on top of the two hops.

    python -m bench bench_gateway          (or ./dev bench bench_gateway)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from tests.processes import car_grpc_serve, launch, log_listening

REQUEST = '{"jsonrpc":"2.0","id":1,"method":"tools.list"}'
WARMUP = 300
ROUND_TRIPS = 3000
CLIENTS = 16
THROUGHPUT_SECONDS = 4.0


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


async def run_relay_server() -> None:
    """`python -m bench.bench_gateway relay`: WebSocket -> grpc.aio stream -> echo -> back."""
    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(_grpc_echo)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Relay", {"Echo": handler})]
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        echo: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            _RELAY_METHOD
        )

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
    await server.stop(0)


@contextlib.asynccontextmanager
async def echo_server(kind: str = "echo") -> AsyncIterator[str]:
    """A bench server of this module in its own process (`echo` or `relay`)."""
    async with launch([sys.executable, "-m", "bench.bench_gateway", kind], stdin=True) as server:
        [url] = await server.listeners(1)
        yield url


@contextlib.asynccontextmanager
async def car_grpc_server() -> AsyncIterator[str]:
    """`car-grpc serve` with its own CAR_HOME, on ephemeral ports."""
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth") as server:
            _, url = await server.listeners(2, timeout=30)
            yield url


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


async def throughput(url: str, bridged: bool) -> float:
    clients = [await _open(url, bridged) for _ in range(CLIENTS)]
    counts = [0] * CLIENTS
    go = asyncio.Event()

    async def loop(i: int, ws: ClientConnection, until: float) -> None:
        await go.wait()
        while time.perf_counter() < until:
            await _round_trip(ws)
            counts[i] += 1

    try:
        for ws in clients:  # warm up every connection
            await _round_trip(ws)
        start = time.perf_counter()
        until = start + THROUGHPUT_SECONDS
        tasks = [asyncio.create_task(loop(i, ws, until)) for i, ws in enumerate(clients)]
        go.set()
        await asyncio.gather(*tasks)
        return sum(counts) / (time.perf_counter() - start)
    finally:
        for ws in clients:
            await ws.close()


# ------------------------------------------------------------------ report


@dataclass
class Figures:
    p50_us: float
    p99_us: float
    rps: float


async def measure(url: str, bridged: bool) -> Figures:
    samples = sorted(await latency(url, bridged))
    p99 = samples[int(len(samples) * 0.99) - 1]
    return Figures(statistics.median(samples) * 1e6, p99 * 1e6, await throughput(url, bridged))


async def run() -> tuple[Figures, Figures, Figures]:
    async with echo_server() as url:
        echo = await measure(url, bridged=False)
    async with echo_server("relay") as url:
        relay = await measure(url, bridged=False)
    async with car_grpc_server() as url:
        bridged = await measure(url, bridged=True)
    return echo, relay, bridged


def main() -> None:
    started = time.perf_counter()
    echo, relay, bridged = asyncio.run(run())
    print(
        f"{'':26}{'bare echo':>10}{'WS+gRPC relay':>15}{'gateway->core':>15}"
        f"{'gateway/echo':>14}{'gateway/relay':>15}"
    )
    rows = [
        ("p50 round trip (us)", echo.p50_us, relay.p50_us, bridged.p50_us, "(target <= 2x)"),
        ("p99 round trip (us)", echo.p99_us, relay.p99_us, bridged.p99_us, ""),
        (
            f"throughput, {CLIENTS} clients (/s)",
            echo.rps,
            relay.rps,
            bridged.rps,
            "(target >= 0.5x)",
        ),
    ]
    for name, e, r, b, target in rows:
        print(f"{name:26}{e:10.0f}{r:15.0f}{b:15.0f}{b / e:13.2f}x{b / r:14.2f}x  {target}")
    print(
        f"one client x {ROUND_TRIPS} round trips; {CLIENTS} clients x {THROUGHPUT_SECONDS:g}s; "
        f"ran in {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["echo"]:
        asyncio.run(run_echo_server())
    elif sys.argv[1:] == ["relay"]:
        asyncio.run(run_relay_server())
    else:
        main()
