"""Chat tokens from an agent to a host through the server, against a bare one-way stream.

- bare: a sender process streams token frames over one `websockets` connection straight
  to a receiver in this process;
- through car-grpc: the same sender, attached as an agent to `car-grpc serve` (its own
  process), streams the same frames as `agent.chat.event` for a chat that a WebSocket host
  in this process opened; the host counts `agents.chat.event` notifications. Each token
  goes agent -> gateway -> core (per-chat buffer) -> gateway -> host.
- the floor of that path: the same sender and receiver through a bare relay process (this
  module's `relay` mode) that carries each frame, as opaque bytes, over one shared grpc.aio
  stream to an echo servicer in its own process and on to the receiver's WebSocket, every
  frame ready at once in one message (bench_gateway's multiplexed relay): the two
  WebSocket hops and the gRPC hop, with no JSON, no protobuf and no session.

Tokens per second are timed at the receiver, from the first token to the last, over
ROUNDS rounds of TOKENS tokens; the median is reported with the ratio to bare. The server's
CPU per token is the CPU time of all its processes (`/proc/PID/stat`) over the rounds,
divided by the tokens: on a shared machine it varies less than the rate.

`car-grpc serve` runs twice: as it starts by default (`--gateway-processes auto`: on 2
CPUs or more the gateway in a process of its own, on the second core) and with
`--gateway-processes 0` (one process).

    python -m bench bench_chats          (or ./dev bench bench_chats)
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

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from bench import summary
from bench.bench_gateway import mux_echo
from bench.proc import cpu_seconds
from tests.processes import Process, car_grpc_serve, launch, log_listening

TOKENS = 20_000
ROUNDS = 3
AGENT_ID = "bench-agent"


def token_frame(session_id: str) -> str:
    params = {"session_id": session_id, "kind": "token", "delta": "token "}
    return json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})


def done_frame(session_id: str) -> str:
    params = {"session_id": session_id, "kind": "done", "delta": None}
    return json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})


# ------------------------------------------------------------------ the sender process


async def send_bare(url: str, rounds: int, tokens: int) -> None:
    """Stream `rounds` x (`tokens` token frames + done) straight to a receiver."""
    async with connect(url, ping_interval=None, compression=None) as ws:
        for _ in range(rounds):
            frame = token_frame("bare")
            for _ in range(tokens):
                await ws.send(frame)
            await ws.send(done_frame("bare"))
            await ws.recv()  # the receiver's go-ahead for the next round


async def serve_as_agent(url: str, rounds: int, tokens: int) -> None:
    """Attach as the agent and answer `rounds` chats with `tokens` tokens each."""
    async with connect(url, ping_interval=None, compression=None) as ws:
        auth = {"agent_id": AGENT_ID, "token": "-"}  # the server runs with --no-auth
        for request in (
            {"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": auth},
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "server.handshake",
                "params": {"protocol_version": 3},
            },
        ):
            await ws.send(json.dumps(request))
            assert "result" in json.loads(await ws.recv())
        print("attached", flush=True)
        for _ in range(rounds):
            while (chat := json.loads(await ws.recv())).get("method") != "agent.chat":
                pass
            session_id = chat["params"]["session_id"]
            await ws.send(
                json.dumps({"jsonrpc": "2.0", "id": chat["id"], "result": {"accepted": True}})
            )
            frame = token_frame(session_id)
            for _ in range(tokens):
                await ws.send(frame)
            await ws.send(done_frame(session_id))
        # Stay attached until the host is through (the main process closes our stdin).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.asynccontextmanager
async def sender(mode: str, url: str, rounds: int) -> AsyncIterator[Process]:
    """The sender in its own process; at the end its stdin closes and it has 30 s to leave."""
    argv = [sys.executable, "-m", "bench.bench_chats", mode, url, str(rounds), str(TOKENS)]
    async with launch(argv, name=f"sender ({mode})", stdin=True, stdout=True) as process:
        try:
            yield process
        finally:
            assert process.proc.stdin is not None
            process.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await process.wait(30)


# ------------------------------------------------------------------ the receivers


async def _receive(ws: ServerConnection | ClientConnection, rounds: int) -> list[float]:
    """Tokens/s of each of `rounds` rounds from the sender, saying "next" after each."""
    rates: list[float] = []
    for _ in range(rounds):
        count, start = 0, 0.0
        while True:
            message = json.loads(await ws.recv())
            if message["params"]["kind"] == "done":
                break
            if count == 0:
                start = time.perf_counter()
            count += 1
        rates.append((count - 1) / (time.perf_counter() - start))
        await ws.send("next")
    return rates


async def bare(rounds: int) -> list[float]:
    """Tokens/s of each round over a bare WebSocket from the sender process."""
    rates: list[float] = []
    finished = asyncio.Event()

    async def receive(ws: ServerConnection) -> None:
        rates.extend(await _receive(ws, rounds))
        finished.set()

    async with serve(receive, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with sender("bare", f"ws://127.0.0.1:{port}/", rounds):
            await asyncio.wait_for(finished.wait(), 300)
    return rates


_SENDER, _RECEIVER = 0, 1


async def run_relay_server() -> None:
    """`python -m bench.bench_chats relay`: what the sender sends on `/send` reaches the
    receiver on `/recv` over one shared grpc.aio stream, and the receiver's answers go back
    the same way."""
    connections: dict[int, ServerConnection] = {}

    async def deliver(conn_id: int, payload: bytes) -> None:
        await connections[1 - conn_id].send(payload.decode())

    async with mux_echo(1, deliver) as [stream]:

        async def relay(ws: ServerConnection) -> None:
            assert ws.request is not None
            conn_id = _SENDER if ws.request.path == "/send" else _RECEIVER
            connections[conn_id] = ws
            async for message in ws:
                stream.send(conn_id, message.encode() if isinstance(message, str) else message)

        async with serve(relay, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
            log_listening("chat relay", f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def relayed(rounds: int) -> Measured:
    """Tokens/s of each round through the bare relay, and its CPU seconds per token."""
    argv = [sys.executable, "-m", "bench.bench_chats", "relay"]
    async with launch(argv, name="chat relay", stdin=True) as relay:
        [url] = await relay.listeners(1)
        async with connect(f"{url}/recv", ping_interval=None, compression=None) as ws:
            cpu_before = cpu_seconds(relay.proc.pid)
            async with sender("bare", f"{url}/send", rounds):
                rates = await _receive(ws, rounds)
            cpu = cpu_seconds(relay.proc.pid) - cpu_before
    return rates, cpu / (rounds * TOKENS)


async def through_car_grpc(rounds: int, *flags: str) -> tuple[list[float], float]:
    """Tokens/s of each round for a WebSocket host chatting with the sender as agent, and
    the server's CPU seconds per token over all rounds."""
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth", *flags) as server:
            _, url = await server.listeners(2, timeout=30)
            async with sender("agent", url, rounds) as agent:
                assert agent.proc.stdout is not None
                line = await asyncio.wait_for(agent.proc.stdout.readline(), 20)
                assert line.strip() == b"attached"
                cpu_before = cpu_seconds(server.proc.pid)
                await _host(url, rounds, rates)
                cpu = cpu_seconds(server.proc.pid) - cpu_before
    return rates, cpu / (rounds * TOKENS)


async def host_session(ws: ClientConnection) -> None:
    """Open a host session on `ws` (the server runs with --no-auth)."""
    for i, (method, params) in enumerate(
        [("session.auth", {}), ("server.handshake", {"protocol_version": 3})]
    ):
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}))
        assert "result" in json.loads(await ws.recv())


async def chat_rate(ws: ClientConnection, request_id: int, session_id: str, tokens: int) -> float:
    """Open a chat with the agent on the host session `ws` and read its `tokens` tokens
    up to `done`: tokens/s, from the first token to the last."""
    chat = {"agent_id": AGENT_ID, "prompt": "count", "session_id": session_id}
    await ws.send(
        json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "agents.chat", "params": chat})
    )
    count, start = 0, 0.0
    while True:
        message = json.loads(await ws.recv())
        if message.get("method") != "agents.chat.event":
            assert "result" in message, message  # the chat's `accepted`
            continue
        if message["params"]["kind"] == "done":
            break
        if count == 0:
            start = time.perf_counter()
        count += 1
    assert count == tokens, count
    return (count - 1) / (time.perf_counter() - start)


async def _host(url: str, rounds: int, rates: list[float]) -> None:
    async with connect(url, ping_interval=None, compression=None, max_size=None) as ws:
        await host_session(ws)
        for n in range(rounds):
            rates.append(await chat_rate(ws, 10 + n, f"bench-{n}", TOKENS))


# ------------------------------------------------------------------ report


Measured = tuple[list[float], float]  # tokens/s of each round, CPU seconds per token


async def run() -> tuple[list[float], Measured, Measured, Measured]:
    bare_rates = await bare(ROUNDS)
    floor = await relayed(ROUNDS)
    default = await through_car_grpc(ROUNDS)
    single = await through_car_grpc(ROUNDS, "--gateway-processes", "0")
    return bare_rates, floor, default, single


def main() -> None:
    started = time.perf_counter()
    bare_rates, (floor_rates, floor_cpu), (rates, cpu), (single_rates, single_cpu) = asyncio.run(
        run()
    )
    b, f = statistics.median(bare_rates), statistics.median(floor_rates)
    g, s = statistics.median(rates), statistics.median(single_rates)
    print(f"{'':28}{'tokens/s':>12}{'x bare':>9}{'server CPU us/token':>21}")
    print(f"{'bare WS':28}{b:12.0f}")
    print(f"{'bare WS+gRPC relay (floor)':28}{f:12.0f}{f / b:8.2f}x{floor_cpu * 1e6:21.1f}")
    print(f"{'car-grpc serve (default)':28}{g:12.0f}{g / b:8.2f}x{cpu * 1e6:21.1f}")
    print(f"{'  --gateway-processes 0':28}{s:12.0f}{s / b:8.2f}x{single_cpu * 1e6:21.1f}")
    print(
        f"median of {ROUNDS} rounds x {TOKENS} tokens, agent -> host; each side its own "
        f"process; CPU: all the server's processes; ran in {time.perf_counter() - started:.0f}s"
    )
    summary.report(
        summary.at_least(
            "chat tokens/s agent -> host", f"{g:,.0f}/s", g / b, 0.5, "bare WS", f / b
        ),
        summary.at_least(
            "  the same, --gateway-processes 0", f"{s:,.0f}/s", s / b, 0.5, "bare WS", f / b
        ),
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "bare":
        asyncio.run(send_bare(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    elif len(sys.argv) == 5 and sys.argv[1] == "agent":
        asyncio.run(serve_as_agent(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    elif sys.argv[1:] == ["relay"]:
        asyncio.run(run_relay_server())
    else:
        main()
