"""Proposals whose tool calls go back to the client, through `car-grpc serve` and on an
in-process core, over real gRPC.

- the headline (`_served`): p50 of proposal.submit with one tool_call answered at once
  (request, tools.execute, answer, response) through `car-grpc serve`, over gRPC to its
  core and over WebSocket through its gateway, as a ratio to a plain state.get through the
  same client; beside it the floor, the same ratio of the same clients and frames through
  a bare path (`proposal_floor`: a bare core, and the bare relay in front of it for the
  WebSocket), and as a diagnostic two state.gets one after the other (the same two round
  trips on the stream with no proposal work at all), for both.
- wide: one proposal of 200 independent tool calls (all in flight together): callbacks/s.
- chain: one proposal of 200 tool calls, each taking the previous output ($<id>.output):
  callbacks/s, i.e. the cost of one dependent step.
- interleaved: a state.get, a proposal and two state.gets one after the other, round after
  round (the order rotating), so that all three see the same load on a shared machine:
  their p50s and ratios, and the CPU time of the process (core and client: the core is
  in-process) per operation. Run it against another tree with
  `PYTHONPATH=TREE python bench/bench_proposals.py` (by path: TREE's car_grpc and tests).

Every figure is measured with one client, `LeanClient` below: a Connect client that answers
`tools.execute` in its read loop, as a user writing for speed would. (tests/tool_host.py,
which the tests use, queues each callback and answers it in a task of its own, and records
it for the test to inspect: about 0.3x of a state.get more than the two state.gets.)

    python -m bench bench_proposals          (or ./dev bench bench_proposals)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from websockets.asyncio.client import ClientConnection, connect

from bench import summary
from bench.proposal_floor import check_frames, grpc_answers, ws_answers
from car_grpc.config import CoreConfig
from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2, session_pb2_grpc, state_pb2, tools_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import CarError
from tests.processes import car_grpc_serve, launch

#: The headline's blocks: BLOCKS rounds of a block of BLOCK operations of each kind.
BLOCKS = 24
BLOCK = 40
#: Operations of each kind before any is measured.
WARMUP = 100
WIDTH = 200
#: Rounds of the interleaved part (each: a state.get, a proposal, two state.gets).
ROUNDS = 800


class LeanClient:
    """The client every figure here is measured with: what a user would write for speed.

    One Connect stream, one read loop. The loop matches answers to the requests waiting
    on them and answers each `tools.execute` itself, at once (the tool here returns
    nothing: the cost measured is the callback's round trip, not a tool's work). No
    queue, no task per callback, no condition (tests/tool_host.py records every request
    for the tests to inspect, which a benchmark does not need); requests and answers
    written under one lock (grpc.aio takes one write at a time per call). Requests and
    the callbacks' answers take the same path, so the proposal and the state.gets it is
    compared with pay the client's side alike."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call: Any = session_pb2_grpc.SessionServiceStub(channel).Connect()
        self._ids = 0
        self._waiting: dict[str, asyncio.Future[session_pb2.ServerFrame]] = {}
        self._writing = asyncio.Lock()
        self.callbacks = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        read, waiting = self.call.read, self._waiting
        while (frame := await read()) is not grpc.aio.EOF:
            if (future := waiting.pop(frame.id, None)) is not None:
                future.set_result(frame)
            elif frame.HasField("tools_execute"):
                self.callbacks += 1
                answer = tool_answer(frame.id)
                async with self._writing:
                    await self.call.write(answer)

    async def request(self, member: str, message: Any, timeout: float = 10) -> Any:
        self._ids += 1
        frame_id = str(self._ids)
        frame = lean_frame(frame_id, member, message)
        future = asyncio.get_running_loop().create_future()
        self._waiting[frame_id] = future
        async with asyncio.timeout(timeout):
            async with self._writing:
                await self.call.write(frame)
            answer = await future
        if answer.HasField("error"):
            raise CarError.from_proto(answer.error)
        return getattr(answer, member)

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def lean_frame(frame_id: str, member: str, message: Any) -> session_pb2.ClientFrame:
    """LeanClient's request frame: `message` as `member`, with the id `frame_id`."""
    frame = session_pb2.ClientFrame(id=frame_id)
    getattr(frame, member).CopyFrom(message)
    return frame


_OUTPUT = tools_pb2.ExecuteToolResponse(output=struct_pb2.Value(number_value=1))


def tool_answer(call_id: str) -> session_pb2.ClientFrame:
    """LeanClient's answer to the tools.execute `call_id` (the tool's output: 1)."""
    return session_pb2.ClientFrame(id=call_id, tools_execute=_OUTPUT)


class LeanWsClient:
    """`LeanClient` over a WebSocket (JSON-RPC text frames), for a server's gateway: its
    read loop matches answers to the requests waiting on them and answers each
    `tools.execute` itself, at once (output `1`). Requests take ready-made JSON text with
    `%d` for the id (the same text every time: no encoding measured but the id's)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.callbacks = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        waiting, send = self._waiting, self.ws.send
        async for text in self.ws:
            message = json.loads(text)
            if "method" not in message:
                if (future := waiting.pop(message.get("id"), None)) is not None:
                    future.set_result(message)
            elif message["method"] == "tools.execute":
                self.callbacks += 1
                await send(ws_tool_answer(message["id"]))

    async def request(self, template: str, timeout: float = 10) -> dict[str, Any]:
        """Send `template % id` and wait for its answer's result."""
        self._ids += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._ids] = future
        async with asyncio.timeout(timeout):
            await self.ws.send(template % self._ids)
            answer = await future
        if "result" not in answer:
            raise RuntimeError(f"error answer: {answer}")
        return answer["result"]  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self.ws.close()


#: The JSON-RPC texts of the operations measured over WebSocket (`LeanWsClient.request`).
WS_STATE_GET = '{"jsonrpc":"2.0","id":%d,"method":"state.get","params":{"key":"k"}}'
WS_PROPOSAL = (
    '{"jsonrpc":"2.0","id":%d,"method":"proposal.submit","params":{"proposal":'
    '{"actions":[{"id":"a","type":"tool_call","tool":"t"}]}}}'
)


#: What LeanWsClient's connection sends first (auth off): auth, then the handshake.
WS_OPENING = [
    json.dumps({"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {}}),
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "server.handshake",
            "params": {"protocol_version": 3, "client_version": "bench"},
        }
    ),
]


def ws_tool_answer(call_id: Any) -> str:
    """LeanWsClient's answer to the tools.execute `call_id` (the tool's output: 1)."""
    return f'{{"jsonrpc":"2.0","id":{json.dumps(call_id)},"result":{{"output":1}}}}'


async def lean_ws_connect(url: str) -> LeanWsClient:
    """A `LeanWsClient` on the gateway at `url` (auth off), past auth and the handshake."""
    ws = await connect(url, ping_interval=None, compression=None, max_size=None)
    for request in WS_OPENING:
        await ws.send(request)
        answer = json.loads(await ws.recv())
        if "result" not in answer:
            raise RuntimeError(f"session did not open: {answer}")
    return LeanWsClient(ws)


def _handshake() -> session_pb2.HandshakeRequest:
    handshake = session_pb2.HandshakeRequest(client_version="bench")
    handshake.protocol_version.number_value = 3
    return handshake


async def _lean_connect(
    channel: grpc.aio.Channel, token: str, kind: type[LeanClient] = LeanClient
) -> LeanClient:
    """A client of `kind`, authenticated with `token` and past the handshake."""
    client = kind(channel)
    await client.request("session_auth", session_pb2.AuthenticateRequest(token=token))
    await client.request("server_handshake", _handshake())
    return client


def _submit(actions: list[dict[str, Any]]) -> tools_pb2.SubmitProposalRequest:
    req = tools_pb2.SubmitProposalRequest()
    codec.json_to_message({"proposal": {"actions": actions}}, req)
    return req


async def _callbacks_per_second(
    client: LeanClient, proposal: tools_pb2.SubmitProposalRequest
) -> float:
    start = time.perf_counter()
    reply = await client.request("proposal_submit", proposal)
    elapsed = time.perf_counter() - start
    assert reply.result.cost.tool_calls == len(proposal.proposal.actions)
    return len(proposal.proposal.actions) / elapsed


async def _interleaved(
    client: LeanClient, get: state_pb2.GetStateRequest, one: tools_pb2.SubmitProposalRequest
) -> None:
    """p50 and CPU per operation of the three, interleaved (see the module's docstring)."""

    async def state_get() -> None:
        await client.request("state_get", get)

    async def two() -> None:
        await state_get()
        await state_get()

    async def proposal() -> None:
        await client.request("proposal_submit", one)

    kinds = {"get": state_get, "proposal": proposal, "two": two}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu = dict.fromkeys(kinds, 0.0)
    order = list(kinds)
    for i in range(ROUNDS):
        for kind in order[i % 3 :] + order[: i % 3]:
            cpu_start, start = time.process_time(), time.perf_counter()
            await kinds[kind]()
            times[kind].append(time.perf_counter() - start)
            cpu[kind] += time.process_time() - cpu_start
    p50 = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    per = {k: v / ROUNDS * 1e6 for k, v in cpu.items()}
    print(
        f"interleaved ({ROUNDS} rounds): p50 state.get {p50['get']:.0f} us, proposal "
        f"{p50['proposal']:.0f} us ({p50['proposal'] / p50['get']:.2f}x), two state.gets "
        f"{p50['two']:.0f} us ({p50['two'] / p50['get']:.2f}x)"
    )
    print(
        f"CPU per operation (process): state.get {per['get']:.0f} us, proposal "
        f"{per['proposal']:.0f} us, two state.gets {per['two']:.0f} us; the proposal's "
        f"above its floor: {per['proposal'] - per['two']:.0f} us"
    )


@contextlib.asynccontextmanager
async def lean_session(kind: type[LeanClient] = LeanClient) -> AsyncIterator[LeanClient]:
    """An in-process core with its state in a temporary directory, and a client of `kind`
    on it with the daemon token (`_lean_connect`); both closed after."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        core = Core(CoreConfig(state_root=root, token_dir=root / "tokens", grpc_port=0))
        await core.start()
        try:
            async with grpc.aio.insecure_channel(core.grpc_address) as channel:
                assert core.parts is not None and core.parts.tokens is not None
                client = await _lean_connect(channel, core.parts.tokens.daemon, kind)
                try:
                    yield client
                finally:
                    await client.close()
        finally:
            await core.stop(grace=0)


Op = Callable[[], Awaitable[object]]


async def _blocks(ops: dict[str, Op]) -> dict[str, float]:
    """p50 in us of each operation of `ops`, measured in blocks of BLOCK of one kind one
    after the other (as a client doing one thing at a time does them: what is left of
    one runs into the next of its own kind), the blocks alternated, BLOCKS rounds of
    every kind in a rotating order, so that each sees the same load on a shared machine."""
    times: dict[str, list[float]] = {kind: [] for kind in ops}
    order = list(ops)
    clock = time.perf_counter
    for i in range(BLOCKS):
        for kind in order[i % len(order) :] + order[: i % len(order)]:
            op, samples = ops[kind], times[kind]
            for _ in range(BLOCK):
                start = clock()
                await op()
                samples.append(clock() - start)
    return {kind: statistics.median(t) * 1e6 for kind, t in times.items()}


def _two(op: Op) -> Op:
    async def two() -> None:
        await op()
        await op()

    return two


#: The proposal every figure submits: one tool call.
ONE_CALL = [{"id": "a", "type": "tool_call", "tool": "t"}]
GET = state_pb2.GetStateRequest(key="k")


async def _check_floor(served: list[str], floor: list[str]) -> None:
    """Raise unless the floor (`floor`: its gRPC address and URL) answers LeanClient's
    and LeanWsClient's exchange (auth, the handshake, a state.get, a proposal and its
    call's answer) with the frames car-grpc's (`served`) answers it with
    (`proposal_floor.check_frames`)."""
    frames = [
        lean_frame("1", "session_auth", session_pb2.AuthenticateRequest(token="")),
        lean_frame("2", "server_handshake", _handshake()),
        lean_frame("3", "state_get", GET),
        lean_frame("4", "proposal_submit", _submit(ONE_CALL)),
        tool_answer("cb-1"),
    ]
    texts = [*WS_OPENING, WS_STATE_GET % 2, WS_PROPOSAL % 3, ws_tool_answer("cb-1")]
    check_frames(
        await grpc_answers(served[0], frames),
        await grpc_answers(floor[0], frames),
        await ws_answers(served[1], texts),
        await ws_answers(floor[1], texts),
    )


def _ops(prefix: str, client: LeanClient, ws: LeanWsClient) -> dict[str, Op]:
    """A state.get, a proposal and two state.gets through each client, named `prefix` +
    `get`, `proposal`, `two`, and `ws ` and those for the WebSocket's."""
    one = _submit(ONE_CALL)

    def state_get() -> Awaitable[object]:
        return client.request("state_get", GET)

    def ws_get() -> Awaitable[object]:
        return ws.request(WS_STATE_GET)

    return {
        prefix + "get": state_get,
        prefix + "proposal": lambda: client.request("proposal_submit", one),
        prefix + "two": _two(state_get),
        prefix + "ws get": ws_get,
        prefix + "ws proposal": lambda: ws.request(WS_PROPOSAL),
        prefix + "ws two": _two(ws_get),
    }


async def _served() -> list[summary.Figure]:
    """The headline: `car-grpc serve` as it runs by default (its core in a process of its
    own; on 2 CPUs or more the gateway in another), a LeanClient on the core's gRPC port
    and a LeanWsClient on the gateway, both in this process; and the same two clients on
    the floor (`proposal_floor`: a bare core, and the bare relay in a process of its own in
    front of it), which is first checked to answer with car-grpc's frames. A state.get, a
    proposal and two state.gets through each of the four, in alternated blocks (`_blocks`)."""
    with tempfile.TemporaryDirectory() as home:
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(
                car_grpc_serve(home, "--no-auth", "--no-dashboard")
            )
            served = await server.listeners(2, timeout=60)
            argv = [sys.executable, "-m", "bench.proposal_floor"]
            bare = await stack.enter_async_context(launch(argv, name="floor", stdin=True))
            floor = await bare.listeners(2, timeout=60)
            await _check_floor(served, floor)
            ops: dict[str, Op] = {}
            for prefix, (address, url) in (("", served), ("bare ", floor)):
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
                client = await _lean_connect(channel, "")
                stack.push_async_callback(client.close)
                ws = await lean_ws_connect(url)
                stack.push_async_callback(ws.close)
                ops |= _ops(prefix, client, ws)
            for op in ops.values():  # warm-up
                for _ in range(WARMUP):
                    await op()
            p50 = await _blocks(ops)
    figures = []
    for via, name in (("", "over gRPC"), ("ws ", "over WebSocket, via the gateway")):
        base, proposal, two = (p50[via + kind] for kind in ("get", "proposal", "two"))
        bare_base, bare_proposal, bare_two = (
            p50["bare " + via + kind] for kind in ("get", "proposal", "two")
        )
        ratio, floor_ratio = proposal / base, bare_proposal / bare_base
        print(
            f"car-grpc serve, {name}: p50 state.get {base:.0f} us, proposal {proposal:.0f} "
            f"us ({ratio:.2f}x), two state.gets {two:.0f} us ({two / base:.2f}x; the "
            f"proposal is {proposal / two:.2f}x them)"
        )
        print(
            f"  its floor, the bare core{' behind the bare relay' if via else ''}: p50 "
            f"state.get {bare_base:.0f} us, proposal {bare_proposal:.0f} us "
            f"({floor_ratio:.2f}x), two state.gets {bare_two:.0f} us "
            f"({bare_two / bare_base:.2f}x); car-grpc's ratio is {ratio / floor_ratio:.2f}x "
            "the floor's"
        )
        figures.append(
            summary.at_most(
                "proposal with one tool callback, p50"
                + (", via the gateway (WebSocket)" if via else ""),
                f"{proposal / 1000:.3f} ms",
                ratio,
                2,
                "a state.get",
                floor=floor_ratio,
            )
        )
    return figures


async def _run() -> None:
    figures = await _served()
    async with lean_session() as client:
        wide = _submit([{"id": f"a{i}", "type": "tool_call", "tool": "t"} for i in range(WIDTH)])
        rate = await _callbacks_per_second(client, wide)
        print(f"wide ({WIDTH} independent): {rate:.0f} callbacks/s")

        chain = _submit(
            [
                {
                    "id": f"a{i}",
                    "type": "tool_call",
                    "tool": "t",
                    "parameters": {"prev": f"$a{i - 1}.output"} if i else {},
                }
                for i in range(WIDTH)
            ]
        )
        rate = await _callbacks_per_second(client, chain)
        print(f"chain ({WIDTH} dependent): {rate:.0f} callbacks/s")
        await _interleaved(client, GET, _submit(ONE_CALL))
    summary.report(*figures)


def main() -> None:
    asyncio.run(_run())


if __name__ == "__main__":
    main()
