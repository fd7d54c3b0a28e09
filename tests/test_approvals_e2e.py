"""End-to-end: the approval ledger and the approval gate on a real core (gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.store import open_store
from car_grpc.v1 import errors_pb2, host_pb2, host_pb2_grpc, session_pb2, tools_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import APPROVAL_DENIED, ERROR_TRAILER, INTERNAL, INVALID_PARAMS, CarError
from tests.bounded import stopped
from tests.conftest import make_config
from tests.error_details import error_info
from tests.session_client import SessionClient, connect
from tests.ws_helpers import running_core

HostApproval = host_pb2.HostApproval


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Any]:
    """`await started(**config)`: a core with that configuration, stopped afterwards."""
    cores: list[Core] = []

    async def start(**overrides: Any) -> Core:
        core = Core(make_config(tmp_path, **overrides).core)
        await core.start()
        cores.append(core)
        return core

    yield start
    for core in cores:
        await stopped(core.stop(grace=0))


def token(core: Core) -> str:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon


async def session(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    return await connect(channel, token=token(core))


async def approver(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    client = await session(core, channel)
    await client.request("host_subscribe", host_pb2.SubscribeHostRequest())
    return client


async def next_requested(client: SessionClient) -> HostApproval:
    """The approval of the next `approval.requested` host event."""
    while True:
        frame = await client.next_notification()
        event = frame.host_event
        if event.kind == "approval.requested":
            approval = HostApproval()
            codec.json_to_message(codec.value_to_json(event.payload), approval)
            return approval


async def resolve(
    client: SessionClient, approval_id: str, approved: bool, notes: str | None = None
) -> HostApproval:
    req = host_pb2.ResolveApprovalRequest(approval_id=approval_id, approved=approved)
    if notes is not None:
        req.notes = notes
    reply: host_pb2.ResolveApprovalResponse = await client.request("host_resolve_approval", req)
    return reply.approval


async def listing(client: SessionClient) -> list[HostApproval]:
    reply = await client.request("host_approvals", host_pb2.ListApprovalsRequest())
    return list(reply.approvals)


def agent(agent_id: str) -> host_pb2.RegisterAgentRequest:
    return host_pb2.RegisterAgentRequest(id=agent_id, name="Agent", kind="assistant")


# ---------------------------------------------------------------- the ledger


async def test_a_session_raised_approval_is_resolved_only_by_its_session(
    core: Core, channel: grpc.aio.Channel
) -> None:
    raiser, other = await session(core, channel), await approver(core, channel)
    req = host_pb2.RequestApprovalRequest(agent_id="a1", title="Deploy?", description="to prod")
    req.context.update({"env": "prod"})
    asked = (await raiser.request("host_request_approval", req)).approval
    assert codec.message_to_json(asked) == {
        "id": asked.id,
        "agent_id": "a1",
        "action": "Deploy?",
        "details": {"description": "to prod", "context": {"env": "prod"}},
        "options": ["approve", "deny"],
        "status": "pending",
        "created_at": asked.created_at,
        "client_id": asked.client_id,
    }
    assert (await next_requested(other)).id == asked.id

    with pytest.raises(CarError) as err:
        await resolve(other, asked.id, approved=True)
    assert err.value.message == f"approval '{asked.id}' may not be resolved by this session"
    done = await resolve(raiser, asked.id, approved=False, notes="not today")
    assert (status_of(done), done.notes) == ("denied", "not today")
    resolved = (await other.next_notification()).host_event
    assert (resolved.kind, codec.value_to_json(resolved.payload)["status"]) == (
        "approval.resolved",
        "denied",
    )
    with pytest.raises(CarError) as err:
        await resolve(raiser, asked.id, approved=True)
    assert err.value.message == f"approval '{asked.id}' is already denied"
    with pytest.raises(CarError) as err:
        await resolve(raiser, "nope", approved=True)
    assert (err.value.code, err.value.message) == (
        INVALID_PARAMS,
        "invalid params: unknown approval: nope",
    )
    with pytest.raises(CarError) as err:
        await raiser.request("host_request_approval", host_pb2.RequestApprovalRequest())
    assert err.value.message == "invalid params: missing field: title"
    await raiser.close()
    await other.close()


async def test_a_session_raised_approval_expires_with_its_session(
    core: Core, channel: grpc.aio.Channel
) -> None:
    raiser, watcher = await session(core, channel), await approver(core, channel)
    req = host_pb2.RequestApprovalRequest(title="Deploy?")
    asked = (await raiser.request("host_request_approval", req)).approval
    await raiser.close()
    await next_requested(watcher)
    resolved = (await watcher.next_notification()).host_event
    assert resolved.kind == "approval.resolved"
    (row,) = await listing(watcher)
    assert (row.id, status_of(row), row.notes) == (
        asked.id,
        "expired",
        "the session that raised it closed",
    )
    await watcher.close()


def status_of(approval: HostApproval) -> str:
    return str(codec.message_to_json(approval)["status"])


# ---------------------------------------------------------------- the gate


async def test_a_gated_call_runs_once_a_second_session_approves(started: Any) -> None:
    core = await started(gated_methods=frozenset({"host.register_agent"}))
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        caller, person = await session(core, channel), await approver(core, channel)
        parked = asyncio.create_task(caller.request("host_register_agent", agent("a1")))
        approval = await next_requested(person)
        assert approval.action == "ws.method:host.register_agent"
        assert not approval.HasField("client_id")  # a system approval
        details = codec.struct_to_json(approval.details)
        assert details["method"] == "host.register_agent"
        assert '"id":"a1"' in details["params_preview"]

        # The parked call delays nothing else, on its own session or another.
        listed = await caller.request("host_agents", host_pb2.ListAgentsRequest())
        assert not listed.agents
        assert [a.id for a in await listing(person)] == [approval.id]
        assert not parked.done()

        done = await resolve(person, approval.id, approved=True)
        assert status_of(done) == "approved"
        assert (await parked).agent.id == "a1"
        await caller.close()
        await person.close()


async def test_a_denied_gated_call_fails_and_the_connection_stays_open(started: Any) -> None:
    core = await started(gated_methods=frozenset({"host.register_agent"}))
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        caller, person = await session(core, channel), await approver(core, channel)
        parked = asyncio.create_task(caller.request("host_register_agent", agent("a1")))
        approval = await next_requested(person)
        await resolve(person, approval.id, approved=False, notes="no")
        with pytest.raises(CarError) as err:
            await parked
        assert (err.value.code, err.value.message) == (
            APPROVAL_DENIED,
            "approval denied: host.register_agent: no",
        )
        assert not (await caller.request("host_agents", host_pb2.ListAgentsRequest())).agents
        await caller.close()
        await person.close()


async def test_a_gated_call_nobody_answers_times_out(started: Any) -> None:
    core = await started(gated_methods=frozenset({"host.register_agent"}), approval_timeout=0.2)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        caller, person = await session(core, channel), await approver(core, channel)
        with pytest.raises(CarError) as err:
            await caller.request("host_register_agent", agent("a1"))
        assert err.value.code == APPROVAL_DENIED
        assert err.value.message == (
            "approval timed out: host.register_agent was not approved within 0.2s"
        )
        approval = await next_requested(person)
        (row,) = await listing(person)
        assert (row.id, status_of(row), row.notes) == (approval.id, "expired", "no answer in 0.2s")
        with pytest.raises(CarError) as late:
            await resolve(person, approval.id, approved=True)
        assert late.value.message == f"approval '{approval.id}' is already expired"
        # The connection stays open.
        assert not (await caller.request("host_agents", host_pb2.ListAgentsRequest())).agents
        await caller.close()
        await person.close()


async def test_the_gate_wraps_typed_rpcs_too(started: Any) -> None:
    core = await started(gated_methods=frozenset({"host.agents"}))
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        person = await approver(core, channel)
        stub = host_pb2_grpc.HostServiceStub(channel)
        metadata = (("authorization", f"Bearer {token(core)}"),)

        async def list_agents() -> host_pb2.ListAgentsResponse:
            reply: host_pb2.ListAgentsResponse = await stub.ListAgents(
                host_pb2.ListAgentsRequest(), metadata=metadata
            )
            return reply

        parked = asyncio.create_task(list_agents())
        approval = await next_requested(person)
        # The typed ApprovalService lists and resolves a system approval (one-call session).
        approvals = host_pb2_grpc.ApprovalServiceStub(channel)
        listed = await approvals.ListApprovals(host_pb2.ListApprovalsRequest(), metadata=metadata)
        assert [a.id for a in listed.approvals] == [approval.id]
        resolved = await approvals.ResolveApproval(
            host_pb2.ResolveApprovalRequest(approval_id=approval.id, approved=True),
            metadata=metadata,
        )
        assert resolved.approval.status == host_pb2.APPROVAL_STATUS_APPROVED
        assert not (await parked).agents

        denied = asyncio.create_task(list_agents())
        await resolve(person, (await next_requested(person)).id, approved=False)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await denied
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        trailer = dict(err.value.trailing_metadata() or ())[ERROR_TRAILER]
        assert isinstance(trailer, bytes)
        assert errors_pb2.Error.FromString(trailer).code == APPROVAL_DENIED
        await person.close()


async def test_no_approvals_turns_the_gate_off(started: Any) -> None:
    core = await started(gated_methods=frozenset({"host.register_agent"}), approvals=False)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        caller = await session(core, channel)
        assert (await caller.request("host_register_agent", agent("a1"))).agent.id == "a1"
        assert not await listing(caller)
        await caller.close()


async def test_methods_that_cannot_be_gated_are_refused_at_start(tmp_path: Path) -> None:
    core = Core(make_config(tmp_path, gated_methods=frozenset({"host.resolve_approval"})).core)
    with pytest.raises(ValueError, match=r"cannot be gated: host\.resolve_approval"):
        await core.start()
    await stopped(core.stop())


async def test_a_gated_proposal_calls_its_tools_only_after_approval(started: Any) -> None:
    core = await started(gated_methods=frozenset({"proposal.submit"}))
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        caller, person = await session(core, channel), await approver(core, channel)
        proposal = tools_pb2.SubmitProposalRequest()
        codec.json_to_message(
            {
                "proposal": {
                    "id": "p1",
                    "actions": [
                        {"id": "a1", "type": "tool_call", "tool": "add", "parameters": {"a": 1}}
                    ],
                }
            },
            proposal,
        )
        parked = asyncio.create_task(caller.request("proposal_submit", proposal, timeout=10))
        approval = await next_requested(person)
        assert approval.action == "ws.method:proposal.submit"
        # A round trip on the caller's stream: no tool callback has been sent.
        await caller.request("host_agents", host_pb2.ListAgentsRequest())
        assert caller.server_requests.empty()

        await resolve(person, approval.id, approved=True)
        call = await caller.next_server_request()
        assert call.tools_execute.tool == "add"
        # When the tool is called, the ledger already has the approval approved.
        assert [status_of(a) for a in await listing(caller)] == ["approved"]
        output = tools_pb2.ExecuteToolResponse(output=codec.to_value({"sum": 1}))
        await caller.answer(call.id, "tools_execute", output)
        (result,) = (await parked).result.results
        assert (result.action_id, codec.value_to_json(result.output)) == ("a1", {"sum": 1})

        # Denied: the proposal never reaches its tools.
        parked = asyncio.create_task(caller.request("proposal_submit", proposal, timeout=10))
        await resolve(person, (await next_requested(person)).id, approved=False)
        with pytest.raises(CarError) as err:
            await parked
        assert err.value.code == APPROVAL_DENIED
        await caller.request("host_agents", host_pb2.ListAgentsRequest())
        assert caller.server_requests.empty()
        await caller.close()
        await person.close()


# ---------------------------------------------------------------- durability


async def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    config: Config = make_config(tmp_path, gated_methods=frozenset({"host.register_agent"}))
    first = Core(config.core)
    await first.start()
    async with grpc.aio.insecure_channel(first.grpc_address) as channel:
        raiser, person = await session(first, channel), await approver(first, channel)
        kept = (
            await raiser.request(
                "host_request_approval", host_pb2.RequestApprovalRequest(title="Ship it?")
            )
        ).approval
        await resolve(raiser, kept.id, approved=True, notes="ok")
        assert (await next_requested(person)).id == kept.id
        # Still pending when the server stops: the gate's call, and a session's request.
        parked = asyncio.create_task(raiser.request("host_register_agent", agent("a1")))
        gated = await next_requested(person)
        open_one = (
            await person.request(
                "host_request_approval", host_pb2.RequestApprovalRequest(title="Later?")
            )
        ).approval
        await stopped(first.stop(grace=0))
        with pytest.raises(ConnectionError):
            await parked
        await raiser.close()
        await person.close()

    async with (
        running_core(config.core) as second,
        grpc.aio.insecure_channel(second.grpc_address) as channel,
    ):
        reader = await session(second, channel)
        rows = {a.id: a for a in await listing(reader)}
        assert (status_of(rows[kept.id]), rows[kept.id].notes) == ("approved", "ok")
        assert rows[kept.id].action == "Ship it?"
        for pending in (gated, open_one):
            assert status_of(rows[pending.id]) == "expired"
        snapshot = await reader.request("host_subscribe", host_pb2.SubscribeHostRequest())
        assert not snapshot.approvals  # nothing is pending any more
        await reader.close()


async def test_pending_approvals_of_a_dead_server_expire_at_start(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    # What a server that died (no graceful stop) leaves behind: a pending row.
    store = await open_store(config.core.state_root, config.core.store)
    orphan = HostApproval(
        id="orphan",
        action="ws.method:mail.send",
        status=host_pb2.APPROVAL_STATUS_PENDING,
        created_at=1,
    )
    orphan.options.extend(["approve", "deny"])
    await store.approvals.insert(orphan)
    await store.close()

    async with (
        running_core(config.core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        reader = await session(core, channel)
        (row,) = await listing(reader)
        assert (row.id, status_of(row), row.notes) == (
            "orphan",
            "expired",
            "the server stopped",
        )
        await reader.close()


# ---------------------------------------------------------------- who may resolve and read


async def attached(core: Core, channel: grpc.aio.Channel, agent_id: str) -> SessionClient:
    assert core.parts is not None
    return await connect(
        channel, token=await core.parts.agent_tokens.add(agent_id), agent_id=agent_id
    )


def host_token(core: Core) -> str:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.host


async def refused_resolution(client: SessionClient, approval_id: str) -> None:
    with pytest.raises(CarError) as err:
        await resolve(client, approval_id, approved=True)
    assert err.value.code == INTERNAL
    assert err.value.message == f"approval '{approval_id}' may not be resolved by this session"


async def test_an_agent_cannot_approve_its_own_parked_call(started: Any) -> None:
    core = await started(gated_methods=frozenset({"tools.register"}))
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        alice = await attached(core, channel, "alice")
        bob = await attached(core, channel, "bob")
        boss = await connect(channel, host_token=host_token(core))
        await boss.request("host_subscribe", host_pb2.SubscribeHostRequest())
        register = tools_pb2.RegisterToolsRequest(tools=[tools_pb2.ToolDefinition(name="rm")])
        parked = asyncio.create_task(alice.request("tools_register", register))
        approval = await next_requested(boss)
        assert approval.agent_id == "alice"

        # Neither the parked agent nor another agent may approve it.
        await refused_resolution(alice, approval.id)
        await refused_resolution(bob, approval.id)
        assert not parked.done() and not (await alice.request("tools_list", _list())).tools

        # The agent reads its own parked approval; another agent does not see it.
        assert [a.id for a in await listing(alice)] == [approval.id]
        assert await listing(bob) == []

        assert status_of(await resolve(boss, approval.id, approved=True)) == "approved"
        assert (await parked).count == 1
        for client in (alice, bob, boss):
            await client.close()


async def test_a_daemon_session_cannot_approve_its_own_parked_call(started: Any) -> None:
    core = await started(gated_methods=frozenset({"host.register_agent"}))
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        caller, other = await approver(core, channel), await session(core, channel)
        parked = asyncio.create_task(caller.request("host_register_agent", agent("a1")))
        approval = await next_requested(caller)
        await refused_resolution(caller, approval.id)
        # Nor through a typed RPC bound to the parked session.
        stub = host_pb2_grpc.ApprovalServiceStub(channel)
        bound = (
            ("authorization", f"Bearer {token(core)}"),
            ("car-session-id", await session_id_of(caller)),
        )
        with pytest.raises(grpc.aio.AioRpcError) as typed:
            await stub.ResolveApproval(
                host_pb2.ResolveApprovalRequest(approval_id=approval.id, approved=True),
                metadata=bound,
            )
        assert typed.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(typed.value).reason == "PERMISSION_DENIED"
        assert not parked.done()
        # Another unattached session may.
        assert status_of(await resolve(other, approval.id, approved=True)) == "approved"
        assert (await parked).agent.id == "a1"
        await caller.close()
        await other.close()


async def session_id_of(client: SessionClient) -> str:
    reply = await client.request("session_init", session_pb2.InitSessionRequest())
    return str(reply.session_id)


def _list() -> tools_pb2.ListToolsRequest:
    return tools_pb2.ListToolsRequest()


async def test_an_agent_hears_only_host_events_and_approvals_about_itself(started: Any) -> None:
    core = await started()
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        alice = await attached(core, channel, "alice")
        bob = await attached(core, channel, "bob")
        plain = await session(core, channel)
        # Raised before alice subscribes: her snapshot shows only hers.
        raised_by_bob = await bob.request(
            "host_request_approval", host_pb2.RequestApprovalRequest(title="bob's")
        )
        about_alice = await plain.request(
            "host_request_approval",
            host_pb2.RequestApprovalRequest(title="plain's", agent_id="alice"),
        )
        snapshot = await alice.request("host_subscribe", host_pb2.SubscribeHostRequest())
        assert list(snapshot.approvals) == []  # neither raised by her nor parking her calls
        assert {e.agent_id for e in snapshot.events} <= {"alice"}
        assert any(e.agent_id == "alice" for e in snapshot.events)

        await bob.request("host_register_agent", agent("bob-helper"))
        mine = await alice.request(
            "host_request_approval", host_pb2.RequestApprovalRequest(title="alice's")
        )
        event = (await alice.next_notification()).host_event
        assert (event.kind, event.agent_id) == ("approval.requested", "alice")
        assert alice.notifications.empty()  # bob's registration never reached her
        assert [a.id for a in await listing(alice)] == [mine.approval.id]
        assert {a.id for a in await listing(plain)} >= {
            raised_by_bob.approval.id,
            about_alice.approval.id,
            mine.approval.id,
        }

        # An agent raises approvals only as itself.
        with pytest.raises(CarError) as err:
            await alice.request(
                "host_request_approval",
                host_pb2.RequestApprovalRequest(title="as bob", agent_id="bob"),
            )
        assert err.value.code == INVALID_PARAMS

        # WatchHostEvents filters the same way.
        stub = host_pb2_grpc.HostServiceStub(channel)
        assert core.parts is not None
        watch: Any = stub.WatchHostEvents(
            host_pb2.WatchHostEventsRequest(),
            metadata=(
                ("authorization", f"Bearer {await core.parts.agent_tokens.add('alice')}"),
                ("car-agent-id", "alice"),
            ),
        )
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.event.agent_id == "alice"
        watch.cancel()
        for client in (alice, bob, plain):
            await client.close()
