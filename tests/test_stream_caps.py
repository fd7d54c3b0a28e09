"""The core's long-lived typed streams (ChatService.Chat, RunService.WatchRun,
HostService.WatchHostEvents, ToolService.ServeTools, VoiceService.ServeVoice and
ServeVoiceBatched, A2A's SendStreamingMessage and SubscribeToTask) count with the session
streams under max_sessions, on a real core over real gRPC with a small cap: the stream past
it is refused RESOURCE_EXHAUSTED with the rich details naming the limit, the held ones go
on, and a slot frees however one ends. A caller refused for its credentials never holds a
slot."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.types import a2a_pb2, a2a_pb2_grpc
from google.protobuf import struct_pb2

from car_grpc.core.server import Core
from car_grpc.v1 import (
    chats_pb2,
    host_pb2,
    host_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    session_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
    voice_pb2,
    voice_pb2_grpc,
)
from car_grpc.wire.codec import json_to_message
from tests.bounded import until
from tests.chat_helpers import accept_chat, bearer, chat_stub, emit, tokens
from tests.conftest import make_config
from tests.error_details import assert_rich_status, car_error
from tests.roles import agent, ordinary
from tests.runs_helpers import complete, record, start, turns
from tests.session_client import SessionClient
from tests.test_connection_caps import MAX_SESSIONS_REFUSAL
from tests.ws_helpers import running_core

_names = itertools.count()


def streams_refusal(most: int) -> str:
    return f"too many streams: the core holds at most {most} sessions and streams (max_sessions)"


def held(core: Core) -> int:
    assert core.parts is not None
    return core.parts.registry.streamed


async def read_until(call: Any, found: Callable[[Any], bool]) -> None:
    """Read `call` (bounded) until a message `found` holds for."""
    async with asyncio.timeout(5):
        while not found(await call.read()):
            pass


@dataclass
class Held:
    """A stream the core holds, and the name it serves under (a chat's session id, a
    tool, a voice provider)."""

    call: Any
    name: str = ""

    def cancel(self) -> None:
        self.call.cancel()


@dataclass
class Kind:
    """One kind of stream: `setup` gives what its streams need (a live session holding
    one slot, or nothing) and `open` a stream the core holds (shown by its first answer);
    `works` shows that held streams are still served."""

    name: str
    setup: Callable[[Core, grpc.aio.Channel], Awaitable[SessionClient | None]]
    open: Callable[[Core, grpc.aio.Channel, SessionClient | None], Awaitable[Held]]
    works: Callable[[Core, grpc.aio.Channel, SessionClient | None, list[Held]], Awaitable[None]]
    #: What a refused stream is opened with (a bidi one writes nothing before it).
    refused: Callable[[Core, grpc.aio.Channel, SessionClient | None], Any]


def _daemon(core: Core) -> tuple[tuple[str, str], ...]:
    return bearer(tokens(core)[0])


# ------------------------------------------------------------------ Chat


async def _chat_setup(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    return await agent(core, channel, "capped-agent")


def _chat_call(core: Core, channel: grpc.aio.Channel, *_: Any, session_id: str = "refused") -> Any:
    request = chats_pb2.ChatRequest(agent_id="capped-agent", prompt="hi", session_id=session_id)
    return chat_stub(channel).Chat(request, metadata=_daemon(core))


async def _chat_open(core: Core, channel: grpc.aio.Channel, agent: SessionClient | None) -> Held:
    assert agent is not None
    held = Held(_chat_call(core, channel, session_id=f"chat-{next(_names)}"))
    held.name = (await accept_chat(agent)).session_id
    first = await held.call.read()
    assert first.accepted.accepted
    return held


async def _chat_works(
    core: Core, channel: grpc.aio.Channel, agent: SessionClient | None, calls: list[Held]
) -> None:
    assert agent is not None
    for held in calls:
        await emit(agent, held.name, "token", delta="x")
        assert (await held.call.read()).event.event.delta == "x"


# ------------------------------------------------------------------ WatchRun


async def _run_setup(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    session = await agent(core, channel, "running-agent")
    session.run_id = await start(session)  # type: ignore[attr-defined]
    return session


def _run_call(core: Core, channel: grpc.aio.Channel, owner: SessionClient | None) -> Any:
    run_id = owner.run_id  # type: ignore[union-attr]
    stub = runs_pb2_grpc.RunServiceStub(channel)
    request = runs_pb2.WatchRunRequest(run_id=run_id)
    return stub.WatchRun(request, metadata=bearer(tokens(core)[1]))  # a host reads every run


async def _run_open(core: Core, channel: grpc.aio.Channel, owner: SessionClient | None) -> Held:
    call = _run_call(core, channel, owner)
    assert (await call.read()).cursor == 1  # the run's start
    return Held(call)


async def _run_works(
    core: Core, channel: grpc.aio.Channel, owner: SessionClient | None, calls: list[Held]
) -> None:
    assert owner is not None
    await record(owner, owner.run_id, turns(1))  # type: ignore[attr-defined]
    for held in calls:
        await read_until(held.call, lambda r: r.record.HasField("turn"))


# ------------------------------------------------------------------ WatchHostEvents


async def _nothing(core: Core, channel: grpc.aio.Channel) -> None:
    return None


def _host_call(core: Core, channel: grpc.aio.Channel, *_: Any) -> Any:
    stub = host_pb2_grpc.HostServiceStub(channel)
    return stub.WatchHostEvents(host_pb2.WatchHostEventsRequest(), metadata=_daemon(core))


async def _register_agent(core: Core, channel: grpc.aio.Channel) -> str:
    name = f"registered-{next(_names)}"
    stub = host_pb2_grpc.HostServiceStub(channel)
    request = host_pb2.RegisterAgentRequest(id=name, name=name, kind="test")
    await stub.RegisterAgent(request, metadata=_daemon(core))
    return name


async def _host_open(core: Core, channel: grpc.aio.Channel, _: SessionClient | None) -> Held:
    held = Held(_host_call(core, channel))
    await _host_works(core, channel, None, [held])
    return held


async def _host_works(
    core: Core, channel: grpc.aio.Channel, _: SessionClient | None, calls: list[Held]
) -> None:
    name = await _register_agent(core, channel)
    for held in calls:
        await read_until(held.call, lambda r: name in str(r.event))


# ------------------------------------------------------------------ ServeTools


def _tools_call(core: Core, channel: grpc.aio.Channel, *_: Any) -> Any:
    return tools_pb2_grpc.ToolServiceStub(channel).ServeTools(metadata=_daemon(core))


async def _tools_open(core: Core, channel: grpc.aio.Channel, _: SessionClient | None) -> Held:
    held = Held(_tools_call(core, channel), f"tool-{next(_names)}")
    register = tools_pb2.RegisterToolHost(tools=[tools_pb2.ToolDefinition(name=held.name)])
    await held.call.write(tools_pb2.ServeToolsRequest(register=register))
    assert (await held.call.read()).WhichOneof("body") == "registered"
    return held


async def _tools_works(
    core: Core, channel: grpc.aio.Channel, _: SessionClient | None, calls: list[Held]
) -> None:
    """Each host is called: a proposal calling its tool gets the host's result."""
    stub = tools_pb2_grpc.ToolServiceStub(channel)
    for held in calls:
        request = tools_pb2.SubmitProposalRequest()
        action = {"id": "a1", "type": "tool_call", "tool": held.name}
        json_to_message({"proposal": {"id": "p1", "actions": [action]}}, request)
        submitted = asyncio.ensure_future(
            stub.SubmitProposal(request, metadata=_daemon(core), timeout=10)
        )
        asked = (await asyncio.wait_for(held.call.read(), 5)).call
        assert asked.tool == held.name
        output = struct_pb2.Value(string_value=f"{held.name} done")
        result = tools_pb2.ToolResult(request_id=asked.request_id, output=output)
        await held.call.write(tools_pb2.ServeToolsRequest(result=result))
        answer = await submitted
        assert [r.output.string_value for r in answer.result.results] == [f"{held.name} done"]


# ------------------------------------------------------------------ ServeVoice(Batched)


def _voice(batched: bool) -> tuple[Callable[..., Any], Callable[..., Awaitable[Any]]]:
    def call_of(core: Core, channel: grpc.aio.Channel, *_: Any) -> Any:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        serve = stub.ServeVoiceBatched if batched else stub.ServeVoice
        return serve(metadata=_daemon(core))

    async def open_one(core: Core, channel: grpc.aio.Channel, _: SessionClient | None) -> Held:
        call = call_of(core, channel)
        name = f"provider-{next(_names)}"
        register = voice_pb2.ServeVoiceRequest(
            register=voice_pb2.RegisterVoiceEngine(engine=name, providers=[name])
        )
        if batched:
            await call.write(voice_pb2.ServeVoiceBatchedRequest(messages=[register]))
            first = (await call.read()).messages[0]
        else:
            await call.write(register)
            first = await call.read()
        assert first.WhichOneof("body") == "registered"
        return Held(call, name)

    return call_of, open_one


async def _voice_works(
    core: Core, channel: grpc.aio.Channel, _: SessionClient | None, calls: list[Held]
) -> None:
    """Each engine's provider is still served (the core drops it when its engine goes)."""
    listed = await voice_pb2_grpc.VoiceServiceStub(channel).ListVoiceProviders(
        voice_pb2.ListVoiceProvidersRequest(), metadata=_daemon(core)
    )
    assert {held.name for held in calls} <= {p.name for p in listed.providers}
    assert not any(held.call.done() for held in calls)


# ------------------------------------------------------------------ A2A SendStreamingMessage


async def _a2a_setup(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    """The agent the A2A caller's messages go to (its session holds one slot), and the
    caller's token."""
    session = await agent(core, channel, "a2a-agent")
    assert core.parts is not None and core.parts.a2a is not None
    session.caller_token = await core.parts.a2a.callers.add("capped")  # type: ignore[attr-defined]
    return session


def _a2a_call(core: Core, channel: grpc.aio.Channel, agent: SessionClient | None) -> Any:
    token = agent.caller_token  # type: ignore[union-attr]
    message = a2a_pb2.Message(
        role=a2a_pb2.Role.ROLE_USER, message_id=f"m-{next(_names)}", parts=[a2a_pb2.Part(text="hi")]
    )
    request = a2a_pb2.SendMessageRequest(tenant="a2a-agent", message=message)
    stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.SendStreamingMessage(request, metadata=bearer(token))


async def _a2a_open(core: Core, channel: grpc.aio.Channel, agent: SessionClient | None) -> Held:
    assert agent is not None
    held = Held(_a2a_call(core, channel, agent))
    held.name = (await accept_chat(agent)).session_id
    assert (await held.call.read()).HasField("task")
    return held


async def _a2a_works(
    core: Core, channel: grpc.aio.Channel, agent: SessionClient | None, calls: list[Held]
) -> None:
    assert agent is not None
    for held in calls:
        await emit(agent, held.name, "token", delta="x")
        await read_until(held.call, lambda r: r.HasField("artifact_update"))


# ------------------------------------------------------------------ A2A SubscribeToTask


async def _task_setup(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    """A running A2A task (sent with SendMessage, returning at once: no stream held) of the
    caller's, its chat taken by the agent."""
    session = await _a2a_setup(core, channel)
    message = a2a_pb2.Message(
        role=a2a_pb2.Role.ROLE_USER, message_id="m-task", parts=[a2a_pb2.Part(text="go")]
    )
    request = a2a_pb2.SendMessageRequest(
        tenant="a2a-agent",
        message=message,
        configuration=a2a_pb2.SendMessageConfiguration(return_immediately=True),
    )
    stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
    token = session.caller_token  # type: ignore[attr-defined]
    sending = asyncio.ensure_future(stub.SendMessage(request, metadata=bearer(token)))
    session.chat_id = (await accept_chat(session)).session_id  # type: ignore[attr-defined]
    session.task_id = (await sending).task.id  # type: ignore[attr-defined]
    return session


def _task_call(core: Core, channel: grpc.aio.Channel, agent: SessionClient | None) -> Any:
    token, task_id = agent.caller_token, agent.task_id  # type: ignore[union-attr]
    request = a2a_pb2.SubscribeToTaskRequest(tenant="a2a-agent", id=task_id)
    stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.SubscribeToTask(request, metadata=bearer(token))


async def _task_open(core: Core, channel: grpc.aio.Channel, agent: SessionClient | None) -> Held:
    held = Held(_task_call(core, channel, agent))
    assert (await held.call.read()).task.id == agent.task_id  # type: ignore[union-attr]
    return held


async def _task_works(
    core: Core, channel: grpc.aio.Channel, agent: SessionClient | None, calls: list[Held]
) -> None:
    assert agent is not None
    await emit(agent, agent.chat_id, "token", delta="x")  # type: ignore[attr-defined]
    for held in calls:
        await read_until(held.call, lambda r: r.HasField("artifact_update"))


_voice_call, _voice_open = _voice(batched=False)
_voice_batched_call, _voice_batched_open = _voice(batched=True)

KINDS = [
    Kind("Chat", _chat_setup, _chat_open, _chat_works, _chat_call),
    Kind("WatchRun", _run_setup, _run_open, _run_works, _run_call),
    Kind("WatchHostEvents", _nothing, _host_open, _host_works, _host_call),
    Kind("ServeTools", _nothing, _tools_open, _tools_works, _tools_call),
    Kind("ServeVoice", _nothing, _voice_open, _voice_works, _voice_call),
    Kind("ServeVoiceBatched", _nothing, _voice_batched_open, _voice_works, _voice_batched_call),
    Kind("A2A-SendStreamingMessage", _a2a_setup, _a2a_open, _a2a_works, _a2a_call),
    Kind("A2A-SubscribeToTask", _task_setup, _task_open, _task_works, _task_call),
]


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[tuple[Core, grpc.aio.Channel]]:
    """A core holding at most 3 sessions and streams, and a channel to it."""
    async with (
        running_core(make_config(tmp_path, max_sessions=3).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        yield core, channel


async def assert_refused(call: Any, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    e = error.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.details() == message
    assert car_error(e).message == message
    assert_rich_status(e, car_error(e))


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_a_stream_past_max_sessions_is_refused_and_the_others_go_on(
    capped: tuple[Core, grpc.aio.Channel], kind: Kind
) -> None:
    core, channel = capped
    session = await kind.setup(core, channel)  # a live session holds one slot, if any
    calls = [await kind.open(core, channel, session) for _ in range(3 - held(core))]
    assert held(core) == 3
    await assert_refused(kind.refused(core, channel, session), streams_refusal(3))
    await kind.works(core, channel, session, calls)  # the held streams are served
    # A stream that ends (here cancelled by its client) frees its slot.
    calls.pop(0).cancel()
    await until(lambda: held(core) == 2, "the core holds 2 sessions and streams")
    calls.append(await kind.open(core, channel, session))
    await kind.works(core, channel, session, calls)
    assert held(core) == 3
    for held_call in calls:
        held_call.cancel()
    await until(
        lambda: held(core) == (0 if session is None else 1),
        "the core holds only the session, if any",
    )
    if session is not None:
        await session.close()


async def test_session_streams_and_typed_streams_share_the_cap_and_strangers_hold_none(
    capped: tuple[Core, grpc.aio.Channel],
) -> None:
    core, channel = capped
    # Callers refused for their credentials (none, or a wrong token) never hold a slot.
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        stub = host_pb2_grpc.HostServiceStub(channel)
        stranger = stub.WatchHostEvents(host_pb2.WatchHostEventsRequest(), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stranger.read()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert held(core) == 0
    sessions = [await ordinary(core, channel) for _ in "ab"]
    watch = await _host_open(core, channel, None)
    assert held(core) == 3
    # Full: a session stream is refused as a session, a typed stream as a stream.
    await assert_refused(_host_call(core, channel), streams_refusal(3))
    connect = await _connect_refused(core, channel)
    assert connect == MAX_SESSIONS_REFUSAL.replace("at most 2", "at most 3")
    # A session ends: a typed stream takes its slot; the typed stream ends: a session.
    await sessions.pop().close()
    await until(lambda: held(core) == 2, "the core holds 2 sessions and streams")
    other = await _host_open(core, channel, None)
    watch.cancel()
    await until(lambda: held(core) == 2, "the core holds 2 sessions and streams")
    sessions.append(await ordinary(core, channel))
    await _host_works(core, channel, None, [other])
    assert held(core) == 3
    other.cancel()
    for session in sessions:
        await session.close()
    await until(lambda: held(core) == 0, "the core holds none")


async def _connect_refused(core: Core, channel: grpc.aio.Channel) -> str:
    call = session_pb2_grpc.SessionServiceStub(channel).Connect()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_rich_status(error.value, car_error(error.value))
    return error.value.details() or ""


async def test_a_slot_frees_however_the_stream_ends(capped: tuple[Core, grpc.aio.Channel]) -> None:
    """Besides a cancel: the server ends the stream (its run completes), the stream fails
    (a tool host's first message is not `register`), the client goes (its connection
    closes)."""
    core, channel = capped
    owner = await _run_setup(core, channel)
    watch = await _run_open(core, channel, owner)
    assert held(core) == 2
    await complete(owner, owner.run_id)  # type: ignore[attr-defined]
    await read_until(watch.call, lambda r: r.status != runs_pb2.RUN_STATUS_IN_PROGRESS)
    assert await watch.call.read() is grpc.aio.EOF
    assert await watch.call.code() == grpc.StatusCode.OK
    await until(lambda: held(core) == 1, "the core holds 1 session or stream")

    failing = _tools_call(core, channel)
    await failing.write(tools_pb2.ServeToolsRequest(result=tools_pb2.ToolResult()))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await failing.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await until(lambda: held(core) == 1, "the core holds 1 session or stream")

    async with grpc.aio.insecure_channel(core.grpc_address) as other:
        await _host_open(core, other, None)
        assert held(core) == 2
    # the connection closed with the stream open
    await until(lambda: held(core) == 1, "the core holds 1 session or stream")
    await owner.close()
    await until(lambda: held(core) == 0, "the core holds none")
