"""End-to-end: the typed per-domain RPCs (ToolService, StateService, PolicyService,
SessionService.InitSession/ClearHalt) and how their metadata binds them to a session."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.v1 import (
    errors_pb2,
    session_pb2,
    session_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from car_grpc.wire.codec import json_to_message, to_value, value_to_json
from car_grpc.wire.errors import ERROR_TRAILER, INTERNAL, INVALID_PARAMS
from tests.session_client import SessionClient
from tests.tool_host import ToolHost

Metadata = tuple[tuple[str, str], ...]


def tokens(core: Core) -> tuple[str, str]:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon, core.parts.tokens.host


async def open_session(channel: grpc.aio.Channel, **auth: str) -> tuple[SessionClient, str]:
    """A Connect session, authenticated; returns it and its session id."""
    client = SessionClient(channel)
    reply = await client.request("session_auth", session_pb2.AuthenticateRequest(**auth))
    assert reply.session_id
    return client, reply.session_id


def bearer(token: str, session_id: str | None = None, agent_id: str | None = None) -> Metadata:
    meta = [("authorization", f"Bearer {token}")]
    if session_id is not None:
        meta.append(("car-session-id", session_id))
    if agent_id is not None:
        meta.append(("car-agent-id", agent_id))
    return tuple(meta)


def car_error(err: grpc.aio.AioRpcError) -> errors_pb2.Error:
    """The exact Error from the `car-error-bin` trailer."""
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_TRAILER:
            assert isinstance(value, bytes)
            return errors_pb2.Error.FromString(value)
    raise AssertionError(f"no {ERROR_TRAILER} trailer on {err!r}")


async def test_state_rpcs_bound_to_a_live_session(core: Core, channel: grpc.aio.Channel) -> None:
    daemon, _ = tokens(core)
    client, sid = await open_session(channel, token=daemon)
    state = state_pb2_grpc.StateServiceStub(channel)
    meta = bearer(daemon, sid)
    await state.SetState(state_pb2.SetStateRequest(key="k", value=to_value([1, 2])), metadata=meta)
    # Visible on the stream: the same session.
    got = await client.request("state_get", state_pb2.GetStateRequest(key="k"))
    assert value_to_json(got.value) == [1, 2]
    await client.request("state_set", state_pb2.SetStateRequest(key="s", value=to_value("x")))
    keys = await state.ListStateKeys(state_pb2.ListStateKeysRequest(), metadata=meta)
    assert list(keys.keys) == ["k", "s"]
    exists = await state.StateExists(state_pb2.StateExistsRequest(key="s"), metadata=meta)
    assert exists.exists
    snap = await state.SnapshotState(state_pb2.SnapshotStateRequest(), metadata=meta)
    assert set(snap.state.fields) == {"k", "s"}
    await client.close()


async def test_unbound_calls_run_in_a_fresh_session(core: Core, channel: grpc.aio.Channel) -> None:
    daemon, _ = tokens(core)
    state = state_pb2_grpc.StateServiceStub(channel)
    await state.SetState(
        state_pb2.SetStateRequest(key="k", value=to_value(1)), metadata=bearer(daemon)
    )
    exists = await state.StateExists(state_pb2.StateExistsRequest(key="k"), metadata=bearer(daemon))
    assert not exists.exists
    assert core.parts is not None and core.parts.registry.sessions == {}  # nothing left behind


async def test_tool_and_policy_rpcs_and_session_rpcs(core: Core, channel: grpc.aio.Channel) -> None:
    daemon, _ = tokens(core)
    client, sid = await open_session(channel, token=daemon)
    meta = bearer(daemon, sid)
    sessions = session_pb2_grpc.SessionServiceStub(channel)
    init = await sessions.InitSession(
        session_pb2.InitSessionRequest(tools=[tools_pb2.ToolDefinition(name="t")]), metadata=meta
    )
    assert (init.session_id, init.tools_registered) == (sid, 1)
    tools = tools_pb2_grpc.ToolServiceStub(channel)
    reg = tools_pb2.RegisterToolsRequest(tools=[tools_pb2.ToolDefinition(name="u")])
    assert (await tools.RegisterTools(reg, metadata=meta)).count == 1
    listed = await client.request("tools_list", tools_pb2.ListToolsRequest())
    assert [t.name for t in listed.tools] == ["t", "u"]
    gone = await tools.UnregisterTool(tools_pb2.UnregisterToolRequest(name="t"), metadata=meta)
    assert gone.removed == 1

    policies = state_pb2_grpc.PolicyServiceStub(channel)
    policy = state_pb2.PolicyDefinition(name="p", rule=state_pb2.POLICY_KIND_DENY_TOOL, target="rm")
    await policies.RegisterPolicy(state_pb2.RegisterPolicyRequest(policy=policy), metadata=meta)
    listed_p = await client.request("policy_list", state_pb2.ListPoliciesRequest())
    assert [(p.name, p.kind) for p in listed_p.policies] == [("p", state_pb2.POLICY_KIND_DENY_TOOL)]
    removed = await policies.UnregisterPolicy(
        state_pb2.UnregisterPolicyRequest(name="p"), metadata=meta
    )
    assert removed.removed == 1

    cleared = await sessions.ClearHalt(session_pb2.ClearHaltRequest(), metadata=meta)
    assert not cleared.cleared
    await client.close()


async def test_submit_proposal_calls_back_over_the_bound_stream(
    core: Core, channel: grpc.aio.Channel
) -> None:
    daemon, _ = tokens(core)
    client, sid = await open_session(channel, token=daemon)
    host = ToolHost(client, lambda req: asyncio.sleep(0, {"tool": req.tool}))
    req = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}}, req)
    reply = await tools_pb2_grpc.ToolServiceStub(channel).SubmitProposal(
        req, metadata=bearer(daemon, sid)
    )
    assert reply.result.results[0].status == tools_pb2.ACTION_STATUS_SUCCEEDED
    assert value_to_json(reply.result.results[0].output) == {"tool": "t"}
    assert host.action_ids() == ["a"]
    await host.close()
    await client.close()


async def test_submit_proposal_without_a_session_stream(
    core: Core, channel: grpc.aio.Channel
) -> None:
    daemon, _ = tokens(core)
    req = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}}, req)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tools_pb2_grpc.ToolServiceStub(channel).SubmitProposal(req, metadata=bearer(daemon))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert car_error(err.value).code == INTERNAL
    assert "car-session-id" in (err.value.details() or "")


async def test_client_disconnect_mid_callback_fails_at_once(
    core: Core, channel: grpc.aio.Channel
) -> None:
    # The tool wait is the 300 s default: only the disconnect can end this proposal.
    daemon, _ = tokens(core)
    client, sid = await open_session(channel, token=daemon)
    req = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}}, req)
    call = tools_pb2_grpc.ToolServiceStub(channel).SubmitProposal(req, metadata=bearer(daemon, sid))
    frame = await client.next_server_request()
    assert frame.tools_execute.action_id == "a"
    await client.close()  # drop the stream with the callback pending
    reply = await asyncio.wait_for(call, 10)
    result = reply.result.results[0]
    assert result.status == tools_pb2.ACTION_STATUS_FAILED
    assert result.error == "tool 't' callback failed: session closed"


async def test_mismatched_credentials_are_unauthenticated(
    core: Core, channel: grpc.aio.Channel
) -> None:
    daemon, host = tokens(core)
    client, sid = await open_session(channel, token=daemon)
    state = state_pb2_grpc.StateServiceStub(channel)
    keys = state_pb2.ListStateKeysRequest()
    for meta in [
        bearer("wrong", sid),
        bearer(host, sid),  # a valid token, but not the one the session used
        bearer(daemon, "no-such-session"),
        bearer(daemon, sid, agent_id="someone"),
        (("car-session-id", sid),),  # no authorization at all
        (),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await state.ListStateKeys(keys, metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, meta
        assert car_error(err.value).code == -32001
    await client.close()


async def test_agent_credentials_bind_to_the_attached_session(
    core: Core, channel: grpc.aio.Channel
) -> None:
    assert core.parts is not None
    token = await core.parts.agent_tokens.add("agent-7")
    client, sid = await open_session(channel, token=token, agent_id="agent-7")
    state = state_pb2_grpc.StateServiceStub(channel)
    await state.SetState(
        state_pb2.SetStateRequest(key="who", value=to_value("agent")),
        metadata=bearer(token, sid, agent_id="agent-7"),
    )
    got = await client.request("state_get", state_pb2.GetStateRequest(key="who"))
    assert value_to_json(got.value) == "agent"
    # Another agent's name or token does not bind to this agent's session.
    other = await core.parts.agent_tokens.add("agent-8")
    for meta in [bearer(token, sid, agent_id="agent-8"), bearer(other, sid, agent_id="agent-8")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await state.ListStateKeys(state_pb2.ListStateKeysRequest(), metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await client.close()


async def test_errors_carry_the_status_twin_and_the_exact_error(
    core: Core, channel: grpc.aio.Channel
) -> None:
    daemon, _ = tokens(core)
    state = state_pb2_grpc.StateServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await state.GetState(state_pb2.GetStateRequest(), metadata=bearer(daemon))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = car_error(err.value)
    assert (error.code, error.message) == (INVALID_PARAMS, "invalid params: missing field: key")
    assert err.value.details() == error.message

    bad: Any = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": {"actions": [{"id": "a", "type": "tool_call"}]}}, bad)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tools_pb2_grpc.ToolServiceStub(channel).SubmitProposal(bad, metadata=bearer(daemon))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert car_error(err.value).message.endswith("proposal.actions[0].tool")
