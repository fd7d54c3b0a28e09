"""A burst of 2,000 WebSocket connections at once against `car-grpc serve` (auth on).

Every TCP connection is made first, then every upgrade request is written in one go, so
the server takes the whole burst as fast as it can. Each connection authenticates
(`session.auth` with the daemon token) and does a round trip (`tools.list`): its setup
time runs from the moment the upgrade requests went out. Then every connection stays open
for HOLD seconds, reading (a close from the server would show), and does one more round
trip. Each connection's outcome is "ok" or what went wrong; every one must be "ok".

Before the fix, one connection in ten was refused by gRPC's queue of calls the core had
not picked up yet (-32603 or a close 1011 "core unavailable: CANCELLED"); see
tests/test_gateway_burst.py.

Baseline, in the same run: the same burst against a bare `websockets` echo server in its
own process (the same listen backlog), each request echoed. Figures are printed as
ratios to it.

    python -m bench bench_burst          (or ./dev bench bench_burst)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import resource
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from tests.processes import car_grpc_serve, launch

CONNECTIONS = 2000
#: Seconds every connection stays open after its first round trip (the closes of the
#: report came about 10 s after the burst).
HOLD = 12.0
#: Longest wait for any one answer.
TIMEOUT = 60.0
#: The listen backlog of the echo server (the gateway's is 4096 too).
BACKLOG = 4096

JSON = Any


# ------------------------------------------------------------------ the baseline server


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def run_echo_server() -> None:
    """`python -m bench.bench_burst echo`: print the port, echo until stdin closes."""
    async with serve(
        _echo, "127.0.0.1", 0, ping_interval=None, compression=None, backlog=BACKLOG
    ) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    argv = (sys.executable, "-m", "bench.bench_burst", "echo")
    async with launch(argv, name="echo", stdin=True, stdout=True) as echo:
        assert echo.proc.stdout is not None
        yield int(await asyncio.wait_for(echo.proc.stdout.readline(), 20))


# ------------------------------------------------------------------ one raw client


class _Client:
    """The client side of a WebSocket on asyncio streams: masked text frames out, frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def upgrade(self, port: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    async def handshake(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())

    def send(self, message: JSON) -> None:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        n = len(payload)
        header = (
            struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0xFE, n)
        )
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
        self.writer.write(header + mask + masked)

    async def receive(self) -> JSON:
        """The next text frame, parsed; a close frame as {"closed": "code reason"}."""
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(n)
        if b0 & 0x0F == 0x8:
            (code,) = struct.unpack("!H", payload[:2]) if len(payload) >= 2 else (1005,)
            return {"closed": f"{code} {payload[2:].decode(errors='replace')}"}
        return json.loads(payload)

    async def call(self, n: int, method: str, params: JSON = None) -> str:
        """One request and its answer: "ok", or what came instead."""
        request: dict[str, JSON] = {"jsonrpc": "2.0", "id": n, "method": method}
        if params is not None:
            request["params"] = params
        self.send(request)
        answer = await self.receive()
        return "ok" if "result" in answer else json.dumps(answer)[:120]


# ------------------------------------------------------------------ the burst


@dataclass
class Burst:
    connect_s: float = 0.0  # making every TCP connection
    setup_s: list[float] = field(default_factory=list)  # upgrade sent -> first round trip
    first: collections.Counter[str] = field(default_factory=collections.Counter)
    later: collections.Counter[str] = field(default_factory=collections.Counter)


async def burst(port: int, token: str | None) -> Burst:
    """CONNECTIONS connections at once; `token` None: the echo server (any answer is ok)."""
    result = Burst()
    start = time.perf_counter()
    streams = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS))
    )
    clients = [_Client(reader, writer) for reader, writer in streams]
    result.connect_s = time.perf_counter() - start
    start = time.perf_counter()
    for client in clients:
        client.upgrade(port)

    async def first(client: _Client) -> bool:
        try:
            async with asyncio.timeout(TIMEOUT):
                await client.handshake()
                outcomes = [
                    await client.call(1, "session.auth", {"token": token}),
                    await client.call(2, "tools.list"),
                ]
        except Exception as e:  # every failure is an outcome
            result.first[repr(e)[:120]] += 1
            return False
        if token is None:  # the echo server sends the request back
            outcomes = ["ok"] * len(outcomes)
        bad = [o for o in outcomes if o != "ok"]
        result.first[bad[0] if bad else "ok"] += 1
        result.setup_s.append(time.perf_counter() - start)
        return not bad

    served = await asyncio.gather(*(first(client) for client in clients))

    async def later(client: _Client) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD):
                    closed = await client.receive()  # nothing may come meanwhile
                    result.later[f"during the hold: {json.dumps(closed)[:100]}"] += 1
                    return
            async with asyncio.timeout(TIMEOUT):
                outcome = await client.call(3, "tools.list")
            result.later["ok" if token is None else outcome] += 1
        except Exception as e:
            result.later[repr(e)[:120]] += 1

    await asyncio.gather(*(later(c) for c, ok in zip(clients, served, strict=True) if ok))
    for client in clients:
        client.writer.close()
    return result


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * CONNECTIONS + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


async def run() -> tuple[Burst, Burst]:
    _raise_file_limit()
    async with echo_server() as port:
        bare = await burst(port, None)
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-dashboard") as server:
            _, url = await server.listeners(2, timeout=30)
            token = (Path(home) / "ai.parslee.car" / "auth-token").read_text().strip()
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            bridged = await burst(port, token)
    return bare, bridged


def report(bare: Burst, bridged: Burst) -> None:
    print(f"{CONNECTIONS} WebSocket connections at once, held {HOLD:g} s")
    for name, b in (("car-grpc serve", bridged), ("bare echo", bare)):
        print(
            f"  {name:15} TCP connects {b.connect_s:5.2f} s; setup (upgrade, auth, round trip)"
            f" p50 {_pct(b.setup_s, 0.5):5.2f} s"
            f" p99 {_pct(b.setup_s, 0.99):5.2f} s max {max(b.setup_s, default=float('nan')):5.2f} s"
        )
        print(f"  {'':15} first round trip: {dict(b.first)}")
        print(f"  {'':15} after the hold:   {dict(b.later)}")
    ratio = max(bridged.setup_s, default=float("nan")) / max(bare.setup_s, default=float("nan"))
    print(f"  whole burst served: {ratio:.1f}x the bare echo")
    ok = bridged.first == {"ok": CONNECTIONS} and bridged.later == {"ok": CONNECTIONS}
    print("  every session served and kept: " + ("yes" if ok else "NO"))


def main() -> None:
    if sys.argv[1:] == ["echo"]:
        asyncio.run(run_echo_server())
        return
    bare, bridged = asyncio.run(run())
    report(bare, bridged)


if __name__ == "__main__":
    main()
