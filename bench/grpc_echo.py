"""A bare grpc.aio bidi echo between two processes: CPU and voluntary context switches
(wakeups) per message of each side, to screen gRPC's settings before bench_load.

    python -m bench.grpc_echo MESSAGES STREAMS ADDRESS

ADDRESS: `127.0.0.1:0` (TCP loopback, a free port) or e.g. `unix:/tmp/echo.sock`.
STREAMS streams each ping-pong MESSAGES / STREAMS messages of 300 bytes. Both processes take
`GRPC_EXPERIMENTS` etc. from the environment (read as grpc is imported) and channel/server
options from ECHO_OPTS (JSON: [["grpc.optimization_target", "throughput"], ...]). Prints
one JSON line. Not part of `python -m bench` (bench/README.md, "gRPC's own settings").
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc

from bench.proc import own_cpu_seconds

_OPTIONS = [tuple(option) for option in json.loads(os.environ.get("ECHO_OPTS", "[]"))]
_PAYLOAD = b"x" * 300


def _same(data: bytes) -> bytes:
    return data


def _wakeups(pid: int) -> tuple[int, int]:
    """Voluntary and forced context switches so far of all of `pid`'s threads."""
    voluntary = forced = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue
        voluntary += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        forced += int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    return voluntary, forced


def _sample(pid: int) -> tuple[float, int, int]:
    return (own_cpu_seconds(pid), *_wakeups(pid))


async def _serve(address: str) -> None:
    async def echo(requests: AsyncIterator[bytes], _: object) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    server = grpc.aio.server(options=_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(echo, _same, _same)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("e.E", {"E": handler})])
    print(server.add_insecure_port(address), flush=True)
    await server.start()
    await server.wait_for_termination()


async def _client(messages: int, streams: int, address: str, server_pid: int) -> None:
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        method = channel.stream_stream("/e.E/E", _same, _same)

        async def ping_pong(count: int) -> None:
            call = method()
            for _ in range(count):
                await call.write(_PAYLOAD)
                await call.read()
            await call.done_writing()

        await asyncio.gather(*(ping_pong(50) for _ in range(streams)))  # warm up
        each = messages // streams
        server, client = _sample(server_pid), _sample(os.getpid())
        started = time.perf_counter()
        await asyncio.gather(*(ping_pong(each) for _ in range(streams)))
        wall = time.perf_counter() - started
        server_after, client_after = _sample(server_pid), _sample(os.getpid())
    n = each * streams
    row: dict[str, float] = {"msg/s": round(n / wall)}
    for side, before, after in (("srv", server, server_after), ("cli", client, client_after)):
        row[f"{side} us"] = round((after[0] - before[0]) / n * 1e6, 1)
        row[f"{side} vcs"] = round((after[1] - before[1]) / n, 2)
        row[f"{side} ics"] = round((after[2] - before[2]) / n, 2)
    print(json.dumps(row))


def main() -> None:
    if sys.argv[1] == "serve":
        asyncio.run(_serve(sys.argv[2]))
        return
    messages, streams, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    argv = [sys.executable, "-m", "bench.grpc_echo", "serve", address]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        if address.endswith(":0"):
            address = f"{address[:-2]}:{port}"
        asyncio.run(_client(messages, streams, address, server.pid))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
