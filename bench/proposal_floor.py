"""The floor of the proposal figures: a bare core of the same protocol, and the bare relay.

bench_proposals measures `proposal.submit` with one tool call against a `state.get`, over
gRPC (LeanClient on SessionService.Connect) and through the gateway (LeanWsClient). Its
floor here is the same clients and the same frames through a bare path: `BareCore`, a
grpc.aio server on the generated stubs that does for those frames what any server of this
protocol must and nothing more, and for the WebSocket figure bench_gateway's multiplexed
relay in a process of its own (as `car-grpc serve` runs its gateway) in front of
`BareTextCore`, the same work on the JSON-RPC texts (orjson) on one bytes stream.

What either does, per frame: a `state.get` looks the key up in the session's own map and
answers its value; a `proposal.submit` (one tool call: what the benchmark sends) writes the
`tools.execute` request for its action (its tool, parameters, a `cb-N` id), and when the
client's answer to that comes, writes the response car-grpc writes (the proposal's id, the
action's result with the answer's output, status, duration and time, the cost). Every
answer is built per call (protobuf messages, or orjson of a dict): no bytes kept from one
call to the next. No access rule, session registry, deadline, metric, policy, timer or
task; the reads and writes are the loop's own.

`check_frames` (bench_proposals runs it before measuring) asserts that the bare core
answers the benchmark's exchange with the frames car-grpc answers it with (fields over
gRPC, text over WebSocket; the ids, times and durations aside).

    python -m bench.proposal_floor   (logs its gRPC address and its relay's URL; serves
                                      until stdin closes)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
from google.protobuf import struct_pb2
from websockets.asyncio.client import connect

from bench.bench_gateway import mux_frame, mux_frames, run_floor_processes
from car_grpc.v1 import session_pb2, tools_pb2
from car_grpc.v1.options_pb2 import CALLER_ROLE_DAEMON

#: What the bare core answers the handshake with: what car-grpc answers (check_frames compares).
SERVER_VERSION = "0.58.0"
PROTOCOL_VERSION = 3

SUCCEEDED = tools_pb2.ACTION_STATUS_SUCCEEDED


class _Ids:
    """Fresh proposal ids in car-grpc's form (`proposal-` and 32 hex digits: a random
    prefix of this process and a count)."""

    def __init__(self) -> None:
        self._prefix = "proposal-" + os.urandom(8).hex()
        self._count = itertools.count()

    def fresh(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


class BareCore:
    """SessionService.Connect for bench_proposals' LeanClient, bare (see the module)."""

    def __init__(self) -> None:
        self.ids = _Ids()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve Connect on `server`, as the generated `add_SessionServiceServicer_to_server`
        does (its messages, its (de)serializers), without the other methods."""
        connect: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(
            self.connect,
            request_deserializer=session_pb2.ClientFrame.FromString,
            response_serializer=session_pb2.ServerFrame.SerializeToString,
        )
        service = "car.v1.SessionService"
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {"Connect": connect})]
        )

    async def connect(
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        state: dict[str, struct_pb2.Value] = {}
        #: A proposal waiting for its call's answer: its request's id, the proposal, when.
        calls: dict[str, tuple[str, tools_pb2.ActionProposal, float]] = {}
        callbacks = itertools.count(1)
        while (frame := await context.read()) is not grpc.aio.EOF:
            assert isinstance(frame, session_pb2.ClientFrame)
            member = frame.WhichOneof("body")
            if member == "state_get":
                out = session_pb2.ServerFrame(id=frame.id)
                value = state.get(frame.state_get.key)
                if value is None:
                    out.state_get.value.null_value = struct_pb2.NULL_VALUE
                else:
                    out.state_get.value.CopyFrom(value)
            elif member == "proposal_submit":
                proposal = frame.proposal_submit.proposal
                [action] = proposal.actions  # one tool call, as the benchmark sends
                call_id = f"cb-{next(callbacks)}"
                calls[call_id] = (frame.id, proposal, time.monotonic())
                out = session_pb2.ServerFrame(id=call_id)
                request = out.tools_execute
                request.action_id = action.id
                request.tool = action.tool
                request.parameters.CopyFrom(action.parameters)
                request.attempt = 1
                request.request_id = call_id
            elif member == "tools_execute":
                request_id, proposal, start = calls.pop(frame.id)
                out = session_pb2.ServerFrame(id=request_id)
                result = out.proposal_submit.result
                result.proposal_id = proposal.id or self.ids.fresh()
                item = result.results.add(action_id=proposal.actions[0].id, status=SUCCEEDED)
                item.output.CopyFrom(frame.tools_execute.output)
                item.state_changes.SetInParent()
                item.duration_ms = _ms_since(start)
                item.timestamp = _now_ms()
                result.cost.tool_calls = 1
                result.cost.actions_executed = 1
                result.cost.total_duration_ms = _ms_since(start)
            elif member == "session_auth":
                out = session_pb2.ServerFrame(id=frame.id)
                out.session_auth.ok = True
                out.session_auth.session_id = uuid.uuid4().hex
                out.session_auth.role_enum = CALLER_ROLE_DAEMON
            elif member == "server_handshake":
                out = session_pb2.ServerFrame(id=frame.id)
                handshake = out.server_handshake
                handshake.protocol_version = PROTOCOL_VERSION
                handshake.server_version = SERVER_VERSION
                handshake.client_protocol_version = PROTOCOL_VERSION
                handshake.client_version = frame.server_handshake.client_version
            else:
                raise ValueError(f"the bare core does not serve {member}")
            await context.write(out)


class _TextSession:
    """One WebSocket connection's session on `BareTextCore`."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        #: A proposal waiting for its call's answer: its request's id, the proposal, when.
        self.calls: dict[str, tuple[Any, dict[str, Any], float]] = {}
        self.callbacks = itertools.count(1)


class BareTextCore:
    """`BareCore`'s work on the JSON-RPC texts of LeanWsClient, behind the multiplexed
    relay (bench_gateway's framing both ways): orjson in, orjson out."""

    def __init__(self) -> None:
        self.ids = _Ids()
        self.sessions: dict[int, _TextSession] = {}

    async def serve(self, requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            assert isinstance(message, bytes)
            for conn_id, payload in mux_frames(message):
                session = self.sessions.setdefault(conn_id, _TextSession())
                await context.write(mux_frame(conn_id, self.handle(session, payload)))

    def handle(self, session: _TextSession, payload: bytes) -> bytes:
        """The text that answers `payload` on `session`."""
        message = orjson.loads(payload)
        method = message.get("method")
        if method == "state.get":
            answer = {"jsonrpc": "2.0", "id": message["id"]}
            answer["result"] = session.state.get(message["params"]["key"])
        elif method == "proposal.submit":
            proposal = message["params"]["proposal"]
            [action] = proposal["actions"]  # one tool call, as the benchmark sends
            call_id = f"cb-{next(session.callbacks)}"
            session.calls[call_id] = (message["id"], proposal, time.monotonic())
            params = {
                "action_id": action["id"],
                "tool": action["tool"],
                "parameters": action.get("parameters", {}),
                "attempt": 1,
                "request_id": call_id,
            }
            answer = {"jsonrpc": "2.0", "id": call_id, "method": "tools.execute"}
            answer["params"] = params
        elif method is None:  # the client's answer to a tools.execute
            request_id, proposal, start = session.calls.pop(message["id"])
            duration = _ms_since(start)
            item = {
                "action_id": proposal["actions"][0]["id"],
                "status": "succeeded",
                "output": message["result"],
                "state_changes": {},
                "duration_ms": duration,
                "timestamp": _now_ms(),
            }
            cost = {
                "tool_calls": 1,
                "actions_executed": 1,
                "actions_rejected": 0,
                "actions_skipped": 0,
                "total_duration_ms": _ms_since(start),
                "retries": 0,
            }
            result = {"proposal_id": proposal.get("id") or self.ids.fresh(), "results": [item]}
            result["cost"] = cost
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        elif method == "session.auth":
            result = {"ok": True, "auth_enabled": False, "session_id": uuid.uuid4().hex}
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        elif method == "server.handshake":
            result = {
                "protocol_version": PROTOCOL_VERSION,
                "server_version": SERVER_VERSION,
                "client_protocol_version": PROTOCOL_VERSION,
                "client_version": message["params"]["client_version"],
                "negotiated_capabilities": [],
            }
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        else:
            raise ValueError(f"the bare core does not serve {method}")
        return orjson.dumps(answer)


async def run_floor() -> None:
    """`python -m bench.proposal_floor`: `BareCore` and `BareTextCore` on one gRPC port of
    this process, the multiplexed relay to the latter in a process of its own."""

    await run_floor_processes("proposal floor", BareTextCore().serve, BareCore().add_to)


# ------------------------------------------------------------------ the frames checked


_VARYING_TEXT = re.compile(
    r'"(session_id|proposal_id)":"[^"]*"|"(timestamp|duration_ms|total_duration_ms)":\d+'
)


def _plain_text(text: str) -> str:
    """`text` with the values that differ from call to call (ids, times) blanked."""
    return _VARYING_TEXT.sub(lambda m: f'"{m[1] or m[2]}":_', text)


def _plain_frame(data: bytes) -> session_pb2.ServerFrame:
    """The ServerFrame of `data` with the values that differ from call to call blanked."""
    frame = session_pb2.ServerFrame.FromString(data)
    if frame.HasField("session_auth"):
        frame.session_auth.session_id = ""
    if frame.HasField("proposal_submit"):
        result = frame.proposal_submit.result
        result.proposal_id = ""
        result.cost.total_duration_ms = 0
        for item in result.results:
            item.timestamp = 0
            item.duration_ms = 0
    return frame


async def _one_by_one(
    write: Callable[[Any], Awaitable[object]], read: Callable[[], Awaitable[Any]], items: list[Any]
) -> list[Any]:
    """Each of `items` written after the answer to the one before (within 10 s): the
    answers, in order."""
    answers = []
    async with asyncio.timeout(10):
        for item in items:
            await write(item)
            answers.append(await read())
    return answers


async def grpc_answers(address: str, frames: list[session_pb2.ClientFrame]) -> list[bytes]:
    """The bytes of every ServerFrame the server at `address` sends on one Connect stream
    for `frames`, each sent after the answer to the one before (a `tools.execute` is
    answered by the next frame: give it the id `cb-1`)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call: grpc.aio.StreamStreamCall[Any, Any] = channel.stream_stream(
            "/car.v1.SessionService/Connect",
            request_serializer=session_pb2.ClientFrame.SerializeToString,
        )()
        answers = await _one_by_one(call.write, call.read, frames)
        call.cancel()
    assert all(isinstance(answer, bytes) for answer in answers)
    return answers


async def ws_answers(url: str, texts: list[str]) -> list[str]:
    """Every text the server at `url` sends on one WebSocket for `texts`, each sent after
    the answer to the one before."""
    async with connect(url, ping_interval=None, compression=None) as ws:
        answers = await _one_by_one(ws.send, ws.recv, texts)
    assert all(isinstance(answer, str) for answer in answers)
    return answers


def check_frames(
    car_grpc: list[bytes], bare: list[bytes], car_grpc_texts: list[str], bare_texts: list[str]
) -> None:
    """Raise unless the bare core answered as car-grpc did: the same ServerFrames (every
    field but the ids and times that differ from call to call) and the same texts."""
    for ours, theirs in zip(car_grpc, bare, strict=True):
        if _plain_frame(ours) != _plain_frame(theirs):
            raise AssertionError(
                f"the bare core's frame differs from car-grpc's:\n{_plain_frame(theirs)}\n"
                f"car-grpc:\n{_plain_frame(ours)}"
            )
    for text, bare_text in zip(car_grpc_texts, bare_texts, strict=True):
        if _plain_text(text) != _plain_text(bare_text):
            raise AssertionError(
                f"the bare core's text differs from car-grpc's:\n{bare_text}\ncar-grpc:\n{text}"
            )


if __name__ == "__main__":
    asyncio.run(run_floor())
