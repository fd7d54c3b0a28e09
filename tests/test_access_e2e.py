"""Declared access (options.proto `Access`): for every operation and every role, the answer
of a real core matches the rule declared in the proto, on the session stream and on the
typed RPCs alike; and no rule refuses what car-runtime 0.58 legitimately sends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from car_runtime import _daemon_wrappers
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from car_grpc.core.server import Core
from car_grpc.v1 import (
    chats_pb2,
    chats_pb2_grpc,
    options_pb2,
    session_pb2,
    tools_pb2,
    tools_pb2_grpc,
)
from car_grpc.wire import api
from car_grpc.wire.errors import AUTH_REQUIRED, INTERNAL, INVALID_PARAMS, CarError
from tests.error_details import error_info
from tests.runs_helpers import state_of
from tests.session_client import SessionClient, connect

DAEMON, HOST, AGENT = (
    options_pb2.CALLER_ROLE_DAEMON,
    options_pb2.CALLER_ROLE_HOST,
    options_pb2.CALLER_ROLE_AGENT,
)
UNAUTHENTICATED = options_pb2.CALLER_ROLE_UNAUTHENTICATED
ROLES = (DAEMON, HOST, AGENT)
REQUESTS = sorted(m for m in api.CLIENT_REQUESTS if m != "session.auth")
#: Every RPC but the session streams themselves (whose requests are the members above).
SESSION_STREAMS = {"car.v1.SessionService.Connect", "car.v1.SessionService.ConnectBatched"}
RPCS = [m for m in api.all_rpcs() if m.full_name not in SESSION_STREAMS]
#: How long an admitted streaming RPC is read before it counts as running.
STREAM_PROBE = 0.5
#: RPCs whose handler narrows the declared rule (its `scope`) for a call not bound to a
#: session (as every call of the matrix below is): the roles it then refuses. Each is
#: also tested bound, where the declared roles hold.
NARROWED_UNBOUND = {"car.v1.ToolService.ServeTools": {AGENT}}


def test_every_operation_declares_who_may_call_it() -> None:
    for method, member in api.CLIENT_REQUESTS.items():
        assert member.access.roles, f"{method} declares no roles"
        assert UNAUTHENTICATED not in member.access.roles or method == "session.auth", method
    for rpc in api.all_rpcs():
        assert api.rpc_access(rpc).roles, f"{rpc.full_name} declares no roles"


def test_car_runtime_roles_are_admitted() -> None:
    """car-runtime's own table says which role calls each daemon method (operator: the
    daemon token; agent: an attached agent; owner: either, on its own things; host: the
    host role). Every method we serve admits the role car-runtime calls it with."""
    car_runtime_roles = {
        "operator": {DAEMON},
        "agent": {AGENT},
        "owner": {DAEMON, AGENT},
        "host": {HOST},
    }
    checked = 0
    rows: list[dict[str, Any]] = _daemon_wrappers.DAEMON_WRAPPER_ROWS
    for row in rows:
        member = api.CLIENT_REQUESTS.get(row["method"])
        if member is None:
            continue
        needed = car_runtime_roles[row["role"]]
        assert needed <= set(member.access.roles), (row["method"], row["role"])
        checked += 1
    assert checked >= 40  # the table covers what we serve


@pytest.fixture
async def sessions(
    core: Core, channel: grpc.aio.Channel
) -> AsyncIterator[dict[int, SessionClient]]:
    state = state_of(core)
    clients: dict[int, SessionClient] = {
        DAEMON: await connect(channel, token=state.tokens.daemon),
        HOST: await connect(channel, host_token=state.tokens.host),
        AGENT: await connect(channel, token=await state.agent_tokens.add("a1"), agent_id="a1"),
    }
    yield clients
    for client in clients.values():
        await client.close()


def _empty(member: api.Member) -> Any:
    return message_factory.GetMessageClass(member.message)()


def _refused_by_role(error: CarError, method: str) -> bool:
    return error.code == INTERNAL and error.message.startswith(f"permission denied: {method} ")


async def test_session_stream_follows_the_declared_roles(
    channel: grpc.aio.Channel, sessions: dict[int, SessionClient]
) -> None:
    for method in REQUESTS:
        member = api.CLIENT_REQUESTS[method]
        for role in ROLES:
            try:
                await sessions[role].request(member.field, _empty(member), timeout=5)
                refused = False
            except CarError as e:
                refused = _refused_by_role(e, method)
            assert refused == (role not in member.access.roles), (method, role)
        # Before session.auth every request but session.auth is -32001 (and the stream ends).
        stranger = SessionClient(channel)
        with pytest.raises(CarError) as before_auth:
            await stranger.request(member.field, _empty(member), timeout=5)
        assert before_auth.value.code == AUTH_REQUIRED, method
        await stranger.close()


async def _metadata(core: Core, role: int) -> tuple[tuple[str, str], ...]:
    state = state_of(core)
    if role == DAEMON:
        return (("authorization", f"Bearer {state.tokens.daemon}"),)
    if role == HOST:
        return (("authorization", f"Bearer {state.tokens.host}"),)
    if role == AGENT:
        token = await state.agent_tokens.add("typed-agent")
        return (("authorization", f"Bearer {token}"), ("car-agent-id", "typed-agent"))
    return ()


async def _call(
    channel: grpc.aio.Channel, rpc: MethodDescriptor, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    """The status an empty call ends with; OK for one still running after STREAM_PROBE."""
    path = f"/{rpc.containing_service.full_name}/{rpc.name}"
    request = message_factory.GetMessageClass(rpc.input_type)()
    response = message_factory.GetMessageClass(rpc.output_type).FromString
    serialize = type(request).SerializeToString
    call: Any
    if rpc.client_streaming:
        call = channel.stream_stream(path, serialize, response)(metadata=metadata)
    elif rpc.server_streaming:
        call = channel.unary_stream(path, serialize, response)(request, metadata=metadata)
    else:
        call = channel.unary_unary(path, serialize, response)(request, metadata=metadata)
    try:
        async with asyncio.timeout(STREAM_PROBE if rpc.server_streaming else 10):
            if rpc.server_streaming:
                async for _ in call:
                    pass
            else:
                await call
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.PERMISSION_DENIED:
            assert error_info(e).reason == "PERMISSION_DENIED"
        return e.code()
    except TimeoutError:
        return grpc.StatusCode.OK  # admitted: the stream is running
    finally:
        with contextlib.suppress(Exception):
            call.cancel()


@pytest.mark.parametrize("role", [UNAUTHENTICATED, *ROLES], ids=options_pb2.CallerRole.Name)
async def test_typed_rpcs_follow_the_declared_roles(
    core: Core, channel: grpc.aio.Channel, role: int
) -> None:
    metadata = await _metadata(core, role)
    for rpc in RPCS:
        access = api.rpc_access(rpc)
        code = await _call(channel, rpc, metadata)
        if role == UNAUTHENTICATED:
            assert code == grpc.StatusCode.UNAUTHENTICATED, rpc.full_name
        elif role in access.roles and role not in NARROWED_UNBOUND.get(rpc.full_name, ()):
            assert code != grpc.StatusCode.PERMISSION_DENIED, rpc.full_name
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, rpc.full_name


def test_a_narrowed_rule_says_so_in_its_scope() -> None:
    by_name = {rpc.full_name: rpc for rpc in RPCS}
    for name, refused in NARROWED_UNBOUND.items():
        access = api.rpc_access(by_name[name])
        assert access.scope, name
        assert refused <= set(access.roles), name


async def _serve_tools(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], tool: str = "t"
) -> tools_pb2.ServeToolsResponse:
    """Register `tool` on ServeTools; the server's first answer (or its AioRpcError).
    The stream is dropped afterwards (its tool goes soon after, not at once)."""
    call: Any = tools_pb2_grpc.ToolServiceStub(channel).ServeTools(metadata=metadata)
    try:
        register = tools_pb2.RegisterToolHost(tools=[tools_pb2.ToolDefinition(name=tool)])
        await call.write(tools_pb2.ServeToolsRequest(register=register))
        answer: tools_pb2.ServeToolsResponse = await asyncio.wait_for(call.read(), 5)
        return answer
    finally:
        call.cancel()


async def test_serve_tools_shared_needs_daemon_or_host_and_bound_needs_the_sessions_own_credentials(
    core: Core, channel: grpc.aio.Channel, sessions: dict[int, SessionClient]
) -> None:
    """An attached agent may not serve tools to every session (it would read every
    session's parameters and feed their state); it may serve its own session's tools,
    bound with car-session-id and its own credentials, like any role."""
    state = state_of(core)
    agent_token = await state.agent_tokens.add("tool-agent")
    unbound = {
        DAEMON: (("authorization", f"Bearer {state.tokens.daemon}"),),
        HOST: (("authorization", f"Bearer {state.tokens.host}"),),
        AGENT: (("authorization", f"Bearer {agent_token}"), ("car-agent-id", "tool-agent")),
    }
    for role in (DAEMON, HOST):
        answer = await _serve_tools(channel, unbound[role], tool=f"shared-{role}")
        assert answer.registered.scope == tools_pb2.TOOL_SCOPE_SHARED, role
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _serve_tools(channel, unbound[AGENT])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).reason == "PERMISSION_DENIED"
    assert "an attached agent serves only its own session's tools" in (
        refused.value.details() or ""
    )

    # Bound: each role's own session, with its own credentials.
    agent = await connect(channel, token=agent_token, agent_id="tool-agent")
    clients = {DAEMON: sessions[DAEMON], HOST: sessions[HOST], AGENT: agent}
    for role, client in clients.items():
        reply = await client.request("session_init", session_pb2.InitSessionRequest())
        bound = (*unbound[role], ("car-session-id", reply.session_id))
        answer = await _serve_tools(channel, bound)
        assert answer.registered.scope == tools_pb2.TOOL_SCOPE_SESSION, role
    # Nobody binds to a session with credentials other than the session's own: the agent
    # cannot serve the daemon session's tools.
    daemon_sid = (
        await sessions[DAEMON].request("session_init", session_pb2.InitSessionRequest())
    ).session_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _serve_tools(channel, (*unbound[AGENT], ("car-session-id", daemon_sid)))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await agent.close()


async def _goal_ids(client: SessionClient) -> list[str]:
    listed = await client.request("goal_status", chats_pb2.GetGoalStatusRequest())
    return [g.session_id for g in listed.goals]


async def test_goals_are_their_owners_for_every_role(
    core: Core, channel: grpc.aio.Channel, sessions: dict[int, SessionClient]
) -> None:
    """goal.set/status/clear (scope): the host token and each agent token see and change
    only the goals they set, another's reading as absent; the daemon token every goal."""
    names: dict[int, str] = {DAEMON: "daemon", HOST: "host", AGENT: "agent"}
    for role, client in sessions.items():
        goal = chats_pb2.SetGoalRequest(session_id=f"g-{names[role]}", check=names[role])
        assert (await client.request("goal_set", goal)).set
    for role in (HOST, AGENT):
        mine, client = f"g-{names[role]}", sessions[role]
        assert await _goal_ids(client) == [mine], role
        for other in ROLES:
            sid = f"g-{names[other]}"
            seen = await client.request(
                "goal_status", chats_pb2.GetGoalStatusRequest(session_id=sid)
            )
            assert seen.HasField("goal") == (sid == mine), (role, other)
            if sid == mine:
                continue
            cleared = await client.request("goal_clear", chats_pb2.ClearGoalRequest(session_id=sid))
            assert not cleared.cleared.bool_value, (role, other)
            # Nor is another's goal overwritten: its session_id is refused.
            with pytest.raises(CarError) as taken:
                await client.request(
                    "goal_set", chats_pb2.SetGoalRequest(session_id=sid, check="x")
                )
            assert taken.value.code == INVALID_PARAMS and taken.value.message.endswith(
                ": session_id"
            ), (role, other)
    daemon = sessions[DAEMON]
    assert await _goal_ids(daemon) == ["g-agent", "g-daemon", "g-host"]
    # Typed calls follow the same scope: the host token reads the agent's goal as absent.
    host_md = (("authorization", f"Bearer {state_of(core).tokens.host}"),)
    stub = chats_pb2_grpc.ChatServiceStub(channel)
    typed = await stub.GetGoalStatus(
        chats_pb2.GetGoalStatusRequest(session_id="g-agent"), metadata=host_md
    )
    assert not typed.HasField("goal")
    # The daemon token changes any goal; the goal stays its owner's.
    changed = await daemon.request(
        "goal_set", chats_pb2.SetGoalRequest(session_id="g-host", check="by the daemon")
    )
    assert changed.goal.check == "by the daemon"
    assert await _goal_ids(sessions[HOST]) == ["g-host"]
    # Clearing them all clears only the caller's own, except for the daemon token.
    for role in (AGENT, HOST):
        everything = await sessions[role].request("goal_clear", chats_pb2.ClearGoalRequest())
        assert everything.cleared.number_value == 1, role
    assert await _goal_ids(daemon) == ["g-daemon"]
    sessions_goal = chats_pb2.SetGoalRequest(session_id="g-agent", check="again")
    assert (await sessions[AGENT].request("goal_set", sessions_goal)).set
    everything = await daemon.request("goal_clear", chats_pb2.ClearGoalRequest())
    assert everything.cleared.number_value == 2
    assert await _goal_ids(sessions[AGENT]) == []
