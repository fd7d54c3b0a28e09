"""Fuzzing the gRPC API of a real core on loopback: random and mutated ClientFrames (and
bytes that are no ClientFrame at all) on SessionService.Connect, and random requests,
with every kind of credential, on every other RPC of every service.

The oracle: on Connect, each request member gets exactly one answer under its id (the
same member, or an error with a documented code), a frame without a body gets -32600,
answers and notifications get nothing, and bytes that do not decode end the stream with a
status. On the other RPCs, a failure is the gRPC status twin of a car.v1.Error carried in
full in the `car-error-bin` trailer, UNAUTHENTICATED without valid credentials. Every
example ends with Rig.settle (sessions gone, bystander served, nothing raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from car_grpc.v1 import errors_pb2, host_pb2, session_pb2, state_pb2, voice_pb2
from car_grpc.wire import api
from car_grpc.wire.errors import ERROR_TRAILER, INVALID_REQUEST
from car_grpc.wire.metadata import AGENT_ID_KEY, SESSION_ID_KEY
from tests.error_details import assert_rich_status
from tests.fuzz_rig import DOCUMENTED, EXAMPLE_TIMEOUT, HANDLER_ERRORS, Rig, rig, strict_json
from tests.fuzz_strategies import (
    FUZZ,
    FUZZ_AGENT,
    client_frames,
    messages,
    mutate_bytes,
    strings,
)
from tests.session_client import SessionClient

ClientFrame = session_pb2.ClientFrame
ServerFrame = session_pb2.ServerFrame
CONNECT = "/car.v1.SessionService/Connect"
ROLES = st.sampled_from(["agent", "host", "daemon"])


@pytest.fixture
async def fuzzed(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path) as the_rig:
        yield the_rig


def own_frame(frame_id: str, member: str, message: Message) -> bytes:
    frame = ClientFrame(id=frame_id)
    getattr(frame, member).CopyFrom(message)
    return frame.SerializeToString()


def auth_request(fuzzed: Rig, role: str) -> session_pb2.AuthenticateRequest:
    return session_pb2.AuthenticateRequest(**fuzzed.credentials(role))


# ------------------------------------------------------------------ Connect


def connect_frames(data: st.DataObject) -> list[bytes]:
    """1-4 frames as bytes: well-formed random frames, mutated ones, or random bytes."""
    one = st.one_of(
        client_frames().map(ClientFrame.SerializeToString),
        client_frames().map(ClientFrame.SerializeToString),
        client_frames().flatmap(lambda f: mutate_bytes(f.SerializeToString())),
        st.binary(max_size=48),
    )
    return data.draw(st.lists(one, min_size=1, max_size=4), label="frames")


class ConnectOracle:
    """The answers due on one Connect stream, by frame id (ids may repeat: answers to one
    id may come in any order, so they are checked as a whole)."""

    def __init__(self) -> None:
        #: frame id -> the request members sent under it ("" for a frame without a body).
        self.due: dict[str, list[str]] = {}
        #: frame id -> what came back: a response member, "invalid" (-32600) or "failed"
        #: (a handler's error).
        self.got: dict[str, list[str]] = {}

    def sent(self, frame: ClientFrame) -> None:
        member = frame.WhichOneof("body")
        if member is None:
            self.due.setdefault(frame.id, []).append("")
        elif member != "error" and api.CLIENT_MEMBERS[member].kind == api.REQUEST:
            self.due.setdefault(frame.id, []).append(member)

    @property
    def done(self) -> bool:
        return all(len(self.got.get(i, [])) == len(due) for i, due in self.due.items())

    def answer(self, frame: ServerFrame) -> None:
        member: str = frame.WhichOneof("body") or ""
        if member == "error":
            assert frame.error.message, frame
            assert frame.error.code in HANDLER_ERRORS | {INVALID_REQUEST}, frame
            member = "invalid" if frame.error.code == INVALID_REQUEST else "failed"
        due, got = self.due.get(frame.id, []), self.got.setdefault(frame.id, [])
        got.append(member)
        requests = [m for m in due if m]
        responses = [m for m in got if m not in ("invalid", "failed")]
        assert (
            len(got) <= len(due)
            and all(got.count(m) <= due.count(m) for m in responses)
            and got.count("invalid") <= due.count("")
            and len(responses) + got.count("failed") <= len(requests)
        ), f"an answer nobody asked for: {frame}; sent under its id: {due}, answered: {got}"


def server_request_answer(frame: ServerFrame, data: st.DataObject) -> bytes:
    """The fuzzer's answer to tools.execute / agent.chat / ...: an error, the right member
    with any content, or any frame at all under the callback id."""
    method = api.SERVER_MEMBERS[frame.WhichOneof("body") or ""].method
    right = api.CLIENT_RESPONSES[method]
    how = data.draw(st.sampled_from(["error", "right", "any"]), label=f"answer to {method}")
    if how == "error":
        error = data.draw(messages(errors_pb2.Error.DESCRIPTOR), label="error")
        return own_frame(frame.id, "error", error)
    if how == "right":
        return own_frame(frame.id, right.field, data.draw(messages(right.message), label="answer"))
    other = data.draw(client_frames(), label="any frame")
    other.id = frame.id
    return other.SerializeToString()


@settings(FUZZ, max_examples=150)
@given(data=st.data())
async def test_connect_frames_of_any_shape(fuzzed: Rig, data: st.DataObject) -> None:
    connect: Any = fuzzed.channel.stream_stream(
        CONNECT, request_serializer=None, response_deserializer=ServerFrame.FromString
    )
    call = connect()
    try:
        await call.write(own_frame("#auth", "session_auth", auth_request(fuzzed, data.draw(ROLES))))
        assert (await call.read()).WhichOneof("body") == "session_auth"
        oracle = ConnectOracle()
        corrupt = False
        for raw in connect_frames(data):
            await call.write(raw)
            try:
                oracle.sent(ClientFrame.FromString(raw))
            except DecodeError:
                corrupt = True  # the stream ends here; nothing after it is read
                break
        if not corrupt:
            await call.write(own_frame("#sentinel", "state_keys", state_pb2.ListStateKeysRequest()))
            oracle.due["#sentinel"] = ["state_keys"]
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            await read_connect(call, oracle, data, corrupt)
        if data.draw(st.booleans(), label="half-close"):
            with contextlib.suppress(grpc.aio.UsageError, grpc.aio.AioRpcError):
                await call.done_writing()
    finally:
        call.cancel()
    await fuzzed.settle()


async def read_connect(
    call: Any, oracle: ConnectOracle, data: st.DataObject, corrupt: bool
) -> None:
    """Read until every due answer came; with a corrupt frame sent, until the stream ends
    with an error status (what came before it must still be due)."""
    while corrupt or not oracle.done:
        try:
            frame = await call.read()
        except grpc.aio.AioRpcError as e:
            assert corrupt, f"the stream failed: {e.code()} {e.details()}"
            assert e.code() != grpc.StatusCode.OK and "ClientFrame" in (e.details() or "")
            return
        assert frame is not grpc.aio.EOF, "the core ended the stream"
        assert isinstance(frame, ServerFrame)
        member = frame.WhichOneof("body")
        assert member is not None, f"a frame without a body: {frame}"
        kind = api.RESPONSE if member == "error" else api.SERVER_MEMBERS[member].kind
        if kind == api.REQUEST:
            with contextlib.suppress(grpc.aio.UsageError, asyncio.InvalidStateError):
                await call.write(server_request_answer(frame, data))
        elif kind == api.RESPONSE:
            oracle.answer(frame)


# ------------------------------------------------------------------ every other RPC


def _all_rpcs() -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    services = {rpc.service.full_name for rpc in api.TYPED_RPCS} | {"car.v1.SessionService"}
    methods = [m for name in sorted(services) for m in pool.FindServiceByName(name).methods]
    voice = pool.FindServiceByName("car.v1.VoiceService")
    methods += [m for m in voice.methods if m not in methods]
    streams = {"car.v1.SessionService.Connect", "car.v1.SessionService.ConnectBatched"}
    return [m for m in methods if m.full_name not in streams]


RPCS = _all_rpcs()
CREDENTIALS = st.sampled_from(
    ["daemon", "host", "agent", "bound", "daemon", "host", "wrong", "none"]
)


async def metadata(
    fuzzed: Rig, how: str, data: st.DataObject
) -> tuple[tuple[tuple[str, str], ...], SessionClient | None]:
    """Call metadata for a kind of credential; "bound" opens a Connect session to bind to."""
    if how == "daemon":
        return (("authorization", f"Bearer {fuzzed.daemon_token}"),), None
    if how == "host":
        return (("authorization", f"Bearer {fuzzed.host_token}"),), None
    if how == "agent":
        return (
            ("authorization", f"Bearer {fuzzed.agent_token}"),
            (AGENT_ID_KEY, FUZZ_AGENT),
        ), None
    if how == "bound":
        client = SessionClient(fuzzed.channel)
        reply = await client.request(
            "session_auth", session_pb2.AuthenticateRequest(token=fuzzed.daemon_token)
        )
        bearer = ("authorization", f"Bearer {fuzzed.daemon_token}")
        return (bearer, (SESSION_ID_KEY, reply.session_id)), client
    if how == "wrong":
        token = data.draw(strings.filter(lambda s: s.isprintable() and s.isascii()), label="token")
        return (("authorization", f"Bearer {token}"),), None
    return (), None


def check_failure(e: grpc.aio.AioRpcError, decodable: bool, credentials: str) -> None:
    """A typed RPC's failure: the exact car.v1.Error in its trailer, and the standard
    google.rpc.Status whose ErrorInfo names the status (the code's twin, or a finer one
    that the reason names) and the JSON-RPC code."""
    assert e.code() != grpc.StatusCode.OK
    if not decodable:
        return  # the request is no message of its type: any status will do
    trailer = dict(e.trailing_metadata() or ()).get(ERROR_TRAILER)
    if trailer is None:
        # The voice engine stream's own refusals (docs/protocol.md §7): a status and a reason.
        assert e.details(), e
        return
    assert isinstance(trailer, bytes)
    error = errors_pb2.Error.FromString(trailer)
    assert error.code in DOCUMENTED or error.code == -32601, error
    assert e.details() == error.message and error.message
    assert_rich_status(e, error)
    if credentials in ("wrong", "none"):
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e


def _cls(desc: Any) -> Any:
    return message_factory.GetMessageClass(desc)


@pytest.mark.parametrize("method", RPCS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
@settings(FUZZ, max_examples=8)
@given(data=st.data())
async def test_every_rpc_with_random_requests(
    fuzzed: Rig, method: MethodDescriptor, data: st.DataObject
) -> None:
    how = data.draw(CREDENTIALS, label="credentials")
    request = data.draw(messages(method.input_type), label="request")
    payload = data.draw(st.sampled_from(["message", "message", "mutated"]), label="payload")
    raw = request.SerializeToString()
    if payload == "mutated":
        raw = data.draw(mutate_bytes(raw), label="bytes")
    try:
        _cls(method.input_type).FromString(raw)
        decodable = True
    except DecodeError:
        decodable = False
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = _cls(method.output_type).FromString
    # Opened last: a draw may end the example (Hypothesis' size limit) before `finally`.
    meta, bound = await metadata(fuzzed, how, data)
    try:
        if method.client_streaming:
            await engine_stream(fuzzed, path, response, meta, data)
        elif method.server_streaming:
            stream: Any = fuzzed.channel.unary_stream(
                path, request_serializer=None, response_deserializer=response
            )
            call: Any = stream(raw, metadata=meta, timeout=EXAMPLE_TIMEOUT)
            try:
                # A stream may wait for events: its first message, its end, or a pause.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await call.read()
            finally:
                call.cancel()
        else:
            unary: Any = fuzzed.channel.unary_unary(
                path, request_serializer=None, response_deserializer=response
            )
            await unary(raw, metadata=meta, timeout=EXAMPLE_TIMEOUT)
    except grpc.aio.AioRpcError as e:
        check_failure(e, decodable, how)
    finally:
        if bound is not None:
            await bound.close()
    await fuzzed.settle()


async def engine_stream(
    fuzzed: Rig, path: str, response: Any, meta: Any, data: st.DataObject
) -> None:
    """A voice engine (ServeVoice) that sends random messages, then half-closes: the
    server ends the stream (OK, or a status saying why) within the bound."""
    requests = data.draw(
        st.lists(messages(voice_pb2.ServeVoiceRequest.DESCRIPTOR), max_size=3), label="messages"
    )
    bidi: Any = fuzzed.channel.stream_stream(
        path, request_serializer=None, response_deserializer=response
    )
    call = bidi(metadata=meta, timeout=EXAMPLE_TIMEOUT)
    try:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            for message in requests:
                await call.write(message.SerializeToString())
            await call.done_writing()
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            while await call.read() is not grpc.aio.EOF:
                pass
    finally:
        call.cancel()


# ------------------------------------------------------------------ what fuzzing found


async def test_numbers_json_cannot_carry_reach_json_clients_as_null(fuzzed: Rig) -> None:
    """NaN and Infinity, which a gRPC client may put in any free-form value, reach
    WebSocket clients as null: the agent registers and unregisters cleanly, and the host
    events about it are strict JSON."""
    request = host_pb2.RegisterAgentRequest(name="n", kind="k")
    for key, number in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        request.metadata.fields[key].number_value = number
    client = SessionClient(fuzzed.channel)
    await client.request("session_auth", auth_request(fuzzed, "daemon"))
    agent = await client.request("host_register_agent", request)
    await client.close()
    raw = [await fuzzed.bystander.ws.recv() for _ in range(2)]
    events = [strict_json(text)["params"] for text in raw]
    assert [e["kind"] for e in events] == ["agent.registered", "agent.unregistered"]
    for event in events:
        assert event["agent_id"] == agent.agent.id
        assert event["payload"]["metadata"] == {"nan": None, "inf": None, "-inf": None}
    await fuzzed.settle()
