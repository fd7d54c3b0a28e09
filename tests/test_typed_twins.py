"""Enums on the typed API, strings on the JSON wire (wire/twins.py, `(json_twin)` in
options.proto): the codec neither writes nor reads a twin, so the JSON wire is unchanged;
the core derives every twin it sends and fills the wire's field from a twin a typed client
set alone. End to end on a real core, and through the real gateway for the JSON side."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

from car_grpc.core.proposals import ToolInvocation
from car_grpc.core.server import Core
from car_grpc.core.tools import SessionTools
from car_grpc.v1 import (
    chats_pb2,
    errors_pb2,
    host_pb2,
    host_pb2_grpc,
    options_pb2,
    runs_pb2,
    runs_pb2_grpc,
    session_pb2,
    tools_pb2,
    voice_pb2,
)
from car_grpc.wire import codec
from car_grpc.wire.errors import ERROR_TRAILER
from car_grpc.wire.twins import fill_in, fill_out, twin_of
from tests.conftest import make_config
from tests.session_client import SessionClient
from tests.ws_helpers import rpc, running

# ------------------------------------------------------------------ the declarations


def every_twin() -> list[FieldDescriptor]:
    pool = descriptor_pool.Default()
    twins: list[FieldDescriptor] = []
    for name in ("chats", "errors", "host", "runs", "session", "state", "status", "tools"):
        file = pool.FindFileByName(f"car/v1/{name}.proto")
        stack = list(file.message_types_by_name.values())
        while stack:
            message = stack.pop()
            stack.extend(message.nested_types)
            twins.extend(fd for fd in message.fields if twin_of(fd))
    return twins


def test_every_twin_mirrors_a_field_of_its_message_with_distinct_wire_strings() -> None:
    twins = {fd.full_name: twin_of(fd) for fd in every_twin()}
    enums_and_numbers = {k: v for k, v in twins.items() if v != "session_id"}
    assert enums_and_numbers == {
        "car.v1.ChatEvent.kind_enum": "kind",
        "car.v1.ApproveChatRequest.decision_enum": "decision",
        "car.v1.HostEvent.kind_enum": "kind",
        "car.v1.RunOutcome.status_enum": "status",
        "car.v1.AuthenticateResponse.role_enum": "role",
        "car.v1.HandshakeRequest.protocol_version_number": "protocol_version",
    }
    # `session_id` means one thing, a client session: a chat's id and a proposal's label
    # have names of their own on the typed API.
    ids = {k.rsplit(".", 1)[1] for k, v in twins.items() if v == "session_id"}
    assert ids == {"chat_id", "session_label"}
    assert "car.v1.ChatInFlight.chat_id" in twins and "car.v1.ToolCall.session_label" in twins
    for fd in every_twin():
        assert fd.containing_type is not None
        assert twin_of(fd) in fd.containing_type.fields_by_name
        if fd.enum_type is not None:
            strings = codec.enum_names(fd.enum_type)[0].values()
            assert len(set(strings)) == len(fd.enum_type.values) - 1


def test_host_event_kinds_keep_their_dotted_strings() -> None:
    names = codec.enum_names(host_pb2.HostEventKind.DESCRIPTOR)[1]
    assert names["agent.registered"] == host_pb2.HOST_EVENT_KIND_AGENT_REGISTERED
    assert names["host.notification"] == host_pb2.HOST_EVENT_KIND_HOST_NOTIFICATION


# ------------------------------------------------------------------ the codec: wire unchanged


def test_the_json_wire_has_no_twin() -> None:
    event = chats_pb2.ChatEvent(kind="token", kind_enum=chats_pb2.CHAT_EVENT_KIND_TOKEN, delta="a")
    assert codec.message_to_json(event) == {"kind": "token", "delta": "a"}
    # A twin set without its field (a daemon session's role) is no JSON key either.
    auth = session_pb2.AuthenticateResponse(ok=True, role_enum=options_pb2.CALLER_ROLE_DAEMON)
    assert codec.message_to_json(auth) == {"ok": True, "auth_enabled": False}
    outcome = runs_pb2.RunOutcome(status="give_up", status_enum=runs_pb2.RUN_OUTCOME_STATUS_GIVE_UP)
    assert codec.message_to_json(outcome) == {"status": "give_up"}


def test_a_twins_name_on_the_json_wire_is_an_ordinary_key() -> None:
    """An open ChatEvent keeps every key it does not name: `kind_enum` too, unread."""
    sent = {"kind": "token", "kind_enum": "done", "delta": "x"}
    event = chats_pb2.ChatEvent()
    codec.json_to_message(sent, event)
    assert event.kind_enum == chats_pb2.CHAT_EVENT_KIND_UNSPECIFIED
    assert codec.message_to_json(fill_in(event)) == sent
    assert event.kind_enum == chats_pb2.CHAT_EVENT_KIND_TOKEN


# ------------------------------------------------------------------ filling


def test_a_twin_set_alone_fills_the_wire_field() -> None:
    event = fill_in(chats_pb2.ChatEvent(kind_enum=chats_pb2.CHAT_EVENT_KIND_AUTH_REQUIRED))
    assert event.kind == "auth_required"
    handshake = fill_in(session_pb2.HandshakeRequest(protocol_version_number=3))
    assert codec.value_to_json(handshake.protocol_version) == 3
    approve = fill_in(chats_pb2.ApproveChatRequest(decision_enum=chats_pb2.APPROVAL_DECISION_DENY))
    assert codec.value_to_json(approve.decision) == "deny"


def test_the_wire_field_wins_and_unknown_strings_stay_open() -> None:
    both = chats_pb2.ChatEvent(kind="token", kind_enum=chats_pb2.CHAT_EVENT_KIND_DONE)
    assert fill_in(both).kind_enum == chats_pb2.CHAT_EVENT_KIND_TOKEN
    odd = fill_out(runs_pb2.RunOutcome(status="shrug"))
    assert (odd.status, odd.status_enum) == ("shrug", runs_pb2.RUN_OUTCOME_STATUS_UNSPECIFIED)
    words = session_pb2.HandshakeRequest()
    words.protocol_version.string_value = "3"
    assert not fill_in(words).HasField("protocol_version_number")


def test_ids_with_a_name_of_their_own() -> None:
    cancel = fill_in(chats_pb2.CancelChatRequest(chat_id="chat-1"))
    assert cancel.session_id == "chat-1"
    assert codec.message_to_json(cancel) == {"session_id": "chat-1"}
    label = fill_out(tools_pb2.ToolCall(session_id="nightly"))
    assert label.session_label == "nightly"
    stop = fill_in(voice_pb2.StopTranscribeStreamRequest(voice_session_id="voice-1"))
    assert codec.message_to_json(stop) == {"session_id": "voice-1"}
    meeting = fill_out(voice_pb2.Meeting(session_id="voice-2"))
    assert meeting.voice_session_id == "voice-2"


def test_twins_are_derived_deep_in_a_frame() -> None:
    frame = session_pb2.ServerFrame()
    frame.runs_get_trace.records.add().ended.outcome.status = "success"
    fill_out(frame)
    outcome = frame.runs_get_trace.records[0].ended.outcome
    assert outcome.status_enum == runs_pb2.RUN_OUTCOME_STATUS_SUCCESS


@pytest.mark.parametrize("label", [None, "", "nightly"])
@pytest.mark.parametrize("bridged", [False, True])
async def test_a_tool_calls_frame_has_its_twins_written_in_place(
    core: Core, label: str | None, bridged: bool
) -> None:
    # SessionTools writes tools.execute's twin itself (no fill_out walk when it is sent):
    # the frame is what fill_out would make of it, and a bridged session's has no twin.
    assert core.parts is not None
    session = core.parts.registry.open(streaming=True)
    session.bridged = bridged
    try:
        inv = ToolInvocation("a", "t", {"q": 1}, None, 1)
        frame = SessionTools(session, label, 1.0, 1.0).request_frame(inv, "cb-1")
        derived = session_pb2.ServerFrame()
        derived.CopyFrom(frame)
        derived.tools_execute.ClearField("session_label")
        if not bridged:
            fill_out(derived)
        assert frame == derived
        assert frame.tools_execute.session_label == ("" if bridged else label or "")
    finally:
        await core.parts.registry.close(session)


# ------------------------------------------------------------------ end to end


async def authenticated(
    channel: grpc.aio.Channel, request: session_pb2.AuthenticateRequest
) -> tuple[SessionClient, session_pb2.AuthenticateResponse]:
    """A session, its session.auth answer, and a handshake that sets only
    protocol_version_number (the typed API's number)."""
    client = SessionClient(channel)
    answer = await client.request("session_auth", request)
    hs = session_pb2.HandshakeRequest(protocol_version_number=3, client_version="typed")
    assert (await client.request("server_handshake", hs)).protocol_version == 3
    return client, answer


async def test_typed_clients_see_enums(core: Core, channel: grpc.aio.Channel) -> None:
    assert core.parts is not None and core.parts.tokens is not None
    token, host_token = core.parts.tokens.daemon, core.parts.tokens.host
    agent_token = await core.parts.agent_tokens.add("twin-agent")
    as_daemon = (("authorization", f"Bearer {token}"),)
    as_agent = (("authorization", f"Bearer {agent_token}"), ("car-agent-id", "twin-agent"))
    client, auth = await authenticated(channel, session_pb2.AuthenticateRequest(token=token))
    agent, agent_auth = await authenticated(
        channel, session_pb2.AuthenticateRequest(token=agent_token, agent_id="twin-agent")
    )
    host, host_auth = await authenticated(
        channel, session_pb2.AuthenticateRequest(host_token=host_token)
    )
    try:
        # Roles: always on the typed API; `role` is only "host" on the wire.
        assert (auth.role, auth.role_enum) == ("", options_pb2.CALLER_ROLE_DAEMON)
        assert (agent_auth.role, agent_auth.role_enum) == ("", options_pb2.CALLER_ROLE_AGENT)
        assert (host_auth.role, host_auth.role_enum) == ("host", options_pb2.CALLER_ROLE_HOST)

        # Host events: WatchHostEvents items carry kind_enum.
        register = host_pb2.RegisterAgentRequest(id="registered", name="R", kind="bot")
        await client.request("host_register_agent", register)
        call = host_pb2_grpc.HostServiceStub(channel).WatchHostEvents(
            host_pb2.WatchHostEventsRequest(), metadata=as_daemon, timeout=10
        )
        first = await anext(aiter(call))
        call.cancel()
        assert (first.event.kind, first.event.kind_enum) == (
            "agent.registered",
            host_pb2.HOST_EVENT_KIND_AGENT_REGISTERED,
        )

        # Run outcomes: the agent sends only status_enum; the store and readers get both.
        run = await agent.request("runs_start", runs_pb2.StartRunRequest(intent="typed"))
        outcome = runs_pb2.RunOutcome(status_enum=runs_pb2.RUN_OUTCOME_STATUS_PARTIAL_SUCCESS)
        complete = runs_pb2.CompleteRunRequest(run_id=run.run_id, outcome=outcome)
        await agent.request("runs_complete", complete)
        runs = runs_pb2_grpc.RunServiceStub(channel)
        trace = await runs.GetTrace(
            runs_pb2.GetTraceRequest(run_id=run.run_id), metadata=as_agent, timeout=10
        )
        ended = trace.records[-1].ended.outcome
        assert (ended.status, ended.status_enum) == (
            "partial_success",
            runs_pb2.RUN_OUTCOME_STATUS_PARTIAL_SUCCESS,
        )

        # Errors: the ErrorCode beside the JSON-RPC code, in car-error-bin.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await runs.GetTrace(
                runs_pb2.GetTraceRequest(run_id="no-such-run"), metadata=as_daemon, timeout=10
            )
        trailer = dict(refused.value.trailing_metadata() or ())[ERROR_TRAILER]
        assert isinstance(trailer, bytes)
        error = errors_pb2.Error.FromString(trailer)
        assert (error.code, error.error_code) == (-32602, errors_pb2.ERROR_CODE_INVALID_PARAMS)
    finally:
        for session in (client, agent, host):
            await session.close()


async def test_the_json_wire_is_unchanged_through_the_gateway(tmp_path: Path) -> None:
    """A WebSocket client sees strings only: a host event's kind, a run outcome's status,
    no role for a daemon session, and sends strings that typed readers see as enums."""
    config = make_config(tmp_path, auth=False)
    async with running(config) as (core, gateway), rpc(gateway.url) as client:
        auth = await client.result("session.auth", {})
        await client.result("server.handshake", {"protocol_version": 3, "client_version": "t"})
        assert (await client.result("host.subscribe"))["subscribed"] is True
        await client.result("host.register_agent", {"id": "a", "name": "A", "kind": "bot"})
        event = await client.next_notification("host.event")
        run = await client.result("runs.start", {"intent": "wire", "agent_id": "a"})
        outcome = {"status": "give_up", "summary": "s"}
        await client.result("runs.complete", {"run_id": run["run_id"], "outcome": outcome})
        trace = await client.result("runs.get_trace", {"run_id": run["run_id"]})
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            typed = await runs_pb2_grpc.RunServiceStub(channel).GetTrace(
                runs_pb2.GetTraceRequest(run_id=run["run_id"]), timeout=10
            )
    assert auth == {"ok": True, "auth_enabled": False, "session_id": auth["session_id"]}
    assert event["kind"] == "agent.registered" and "kind_enum" not in event
    assert trace["records"][-1]["outcome"] == {
        "status": "give_up",
        "summary": "s",
        "timestamp": trace["records"][-1]["outcome"]["timestamp"],
    }
    assert typed.records[-1].ended.outcome.status_enum == runs_pb2.RUN_OUTCOME_STATUS_GIVE_UP
