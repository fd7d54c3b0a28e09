"""A cluster in one process: two real cores (`Core`, each its own gRPC server on loopback)
on one real PostgreSQL database, clients on real Connect streams to either. What crosses
cores: a chat from a host on one to an agent on the other (events, cancel, approve, the
disconnect rules), host events, a gated call parked on one and approved from the other,
a run recorded through one and followed live from the other (runs.subscribe, WatchRun),
agent attachment; a core that stops renewing its lease is released by the other (its
run ends `incomplete`, its agent is no longer found). Core-to-core calls need the
cluster secret. The two `car-grpc serve` processes of "Done when": test_cluster_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.core.peers import CHAT, SECRET_KEY
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2, host_pb2, runs_pb2, runs_pb2_grpc, session_pb2, status_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import INTERNAL, CarError
from car_grpc.wire.metadata import SESSION_ID_KEY
from tests.bounded import stopped
from tests.chat_helpers import (
    accept_chat,
    bearer,
    chat_stub,
    emit,
    next_agent_notice,
    next_chat_event,
    tokens,
)
from tests.conftest import make_config
from tests.error_details import car_error, error_info
from tests.postgres_server import PostgresServer
from tests.roles import agent, chat_host, host_role
from tests.runs_helpers import complete, record, start, turns
from tests.session_client import SessionClient, connect

#: A short lease keeps the release of a dead core quick.
LEASE = 1.5
SECRET = "cluster-test-secret"

Node = tuple[Core, grpc.aio.Channel]


@pytest.fixture
async def nodes(
    tmp_path: Path, postgres_server: PostgresServer
) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """`await nodes(name, **config)`: a core named `name` on the test's database."""
    url = postgres_server.create_database("cluster")
    started: list[Node] = []

    async def node(name: str, **overrides: Any) -> Node:
        given: dict[str, Any] = {
            "store": url,
            "core_id": name,
            "cluster_secret": SECRET,
            "cluster_lease": LEASE,
            "chat_ack_timeout": 2.0,
        }
        config = make_config(tmp_path / name, **(given | overrides))
        core = Core(config.core)
        await core.start()
        channel = grpc.aio.insecure_channel(core.grpc_address)
        started.append((core, channel))
        return core, channel

    yield node
    for core, channel in reversed(started):
        await channel.close()
        await stopped(core.stop(grace=0))


async def host_of(node: Node) -> SessionClient:
    return await host_role(*node)


def chat_request(agent_id: str = "bot", **fields: Any) -> chats_pb2.ChatRequest:
    return chats_pb2.ChatRequest(agent_id=agent_id, prompt="hi", **fields)


async def open_chat(h: SessionClient, a: SessionClient) -> str:
    pending = asyncio.create_task(h.request("agents_chat", chat_request()))
    asked = await accept_chat(a)
    accepted = await pending
    assert accepted.accepted and accepted.session_id == asked.session_id
    return str(accepted.session_id)


async def host_event(client: SessionClient, kind: str) -> host_pb2.HostEvent:
    while True:
        frame = await client.next_notification()
        if frame.WhichOneof("body") == "host_event" and frame.host_event.kind == kind:
            return frame.host_event


# ---------------------------------------------------------------- chats


async def test_a_host_on_one_core_chats_with_an_agent_attached_on_the_other(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    bot = await agent(*b, "bot")
    h = await chat_host(*a)

    session_id = await open_chat(h, bot)
    await emit(bot, session_id, "token", delta="hel")
    await emit(bot, session_id, "token", delta="lo")
    await emit(bot, session_id, "done")
    got = [await next_chat_event(h) for _ in range(3)]
    assert [(e.event.kind, e.event.delta) for e in got] == [
        ("token", "hel"),
        ("token", "lo"),
        ("done", ""),
    ]
    assert {(e.session_id, e.agent_id) for e in got} == {(session_id, "bot")}

    # approve reaches the agent on its core, and its answer comes back
    session_id = await open_chat(h, bot)
    approve = chats_pb2.ApproveChatRequest(session_id=session_id, approval_id="ap1")
    approve.decision.string_value = "yes"
    answer = asyncio.create_task(h.request("agents_chat_approve", approve))
    asked = await bot.next_server_request()
    assert asked.WhichOneof("body") == "agent_chat_approve"
    assert (asked.agent_chat_approve.approval_id, asked.agent_chat_approve.approved) == (
        "ap1",
        True,
    )
    await bot.answer(
        asked.id, "agent_chat_approve", chats_pb2.AgentChatApproveResponse(resolved=True)
    )
    assert (await answer).resolved

    # cancel: the agent is told, the host gets the terminal error
    cancelled = await h.request(
        "agents_chat_cancel", chats_pb2.CancelChatRequest(session_id=session_id)
    )
    assert cancelled.cancelled
    notice = await next_agent_notice(bot)
    assert notice.agent_chat_cancel.session_id == session_id
    end = await next_chat_event(h)
    assert (end.event.kind, end.event.message) == ("error", "chat cancelled")

    # an agent attached nowhere: the same answer as on one core
    with pytest.raises(CarError) as err:
        await h.request("agents_chat", chat_request("nobody"))
    assert (err.value.code, err.value.message) == (INTERNAL, "agent 'nobody' is not attached")
    await h.close()
    await bot.close()


async def test_the_disconnect_rules_hold_across_cores(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    bot = await agent(*b, "bot")
    h = await chat_host(*a)

    # the host goes away: the agent on the other core gets agent.chat.cancel
    session_id = await open_chat(h, bot)
    await h.close()
    notice = await next_agent_notice(bot)
    assert notice.agent_chat_cancel.session_id == session_id

    # the agent goes away: the host on the other core gets a terminal error event
    h = await chat_host(*a)
    session_id = await open_chat(h, bot)
    await bot.close()
    end = await next_chat_event(h)
    assert (end.session_id, end.event.kind) == (session_id, "error")
    assert "bot" in end.event.message
    await h.close()


async def test_attaching_an_agent_on_one_core_replaces_its_attachment_on_the_other(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    old = await agent(*a, "bot")
    h = await chat_host(*a)
    session_id = await open_chat(h, old)

    new = await agent(*b, "bot")
    # the chat routed to the replaced attachment ends at its host
    end = await next_chat_event(h)
    assert (end.session_id, end.event.kind) == (session_id, "error")
    assert a[0].parts is not None
    for _ in range(100):  # the release reaches core a through the store's notifications
        if "bot" not in a[0].parts.registry.attached:
            break
        await asyncio.sleep(0.02)
    assert "bot" not in a[0].parts.registry.attached
    # a new chat from core a goes to the attachment on core b
    await open_chat(h, new)
    await h.close()
    await old.close()
    await new.close()


async def test_an_agent_gone_from_the_core_the_store_names_is_not_attached_failed_precondition(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    """The race of an agent leaving core b as a host on core a looks it up, held still:
    the store still names b, which no longer has it. The host gets what it gets for an
    agent attached nowhere (FAILED_PRECONDITION on the typed RPC), not INTERNAL."""
    a, b = await nodes("a"), await nodes("b")
    assert b[0].parts is not None and b[0].parts.cluster is not None
    await b[0].parts.cluster.store.attach("gone", "0" * 32)
    h = await chat_host(*a)
    with pytest.raises(CarError) as err:
        await h.request("agents_chat", chat_request("gone"))
    assert (err.value.code, err.value.message) == (INTERNAL, "agent 'gone' is not attached")
    call = chat_stub(a[1]).Chat(chat_request("gone"), metadata=bearer(tokens(a[0])[0]))
    with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
        async for _ in call:
            pass
    assert rpc_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_err.value.details() == "agent 'gone' is not attached"
    assert car_error(rpc_err.value).code == INTERNAL
    assert error_info(rpc_err.value).reason == "FAILED_PRECONDITION"
    await h.close()


async def test_core_to_core_calls_need_the_cluster_secret(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a = await nodes("a")
    bot = await agent(*a, "bot")
    host_token = a[0].parts.tokens.host if a[0].parts and a[0].parts.tokens else ""
    for metadata in (
        (),
        ((SECRET_KEY, "wrong"),),
        (("authorization", f"Bearer {host_token}"),),  # a client credential is no secret
    ):
        call = a[1].unary_stream(
            CHAT,
            request_serializer=chats_pb2.ChatRequest.SerializeToString,
            response_deserializer=chats_pb2.ChatResponse.FromString,
        )(chat_request(), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(asyncio.TimeoutError):  # the agent was never asked
        await bot.next_server_request(timeout=0.2)
    await bot.close()


# ---------------------------------------------------------------- approvals and host events


async def test_a_call_parked_on_one_core_is_approved_from_the_other(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    gated = frozenset({"host.register_agent"})
    a, b = await nodes("a", gated_methods=gated), await nodes("b", gated_methods=gated)
    caller = await chat_host(*a)
    person = await host_of(b)
    await person.request("host_subscribe", host_pb2.SubscribeHostRequest())

    register = host_pb2.RegisterAgentRequest(name="a1", kind="test")
    parked = asyncio.create_task(caller.request("host_register_agent", register))
    # core a's host event reaches the host subscribed on core b
    requested = await host_event(person, "approval.requested")
    approval = host_pb2.HostApproval()
    codec.json_to_message(codec.value_to_json(requested.payload), approval)
    listed = await person.request("host_approvals", host_pb2.ListApprovalsRequest())
    assert approval.id in [x.id for x in listed.approvals]
    late = await host_of(b)  # a host subscribing now finds it in its snapshot
    snapshot = await late.request("host_subscribe", host_pb2.SubscribeHostRequest())
    assert [x.id for x in snapshot.approvals] == [approval.id]

    resolve = host_pb2.ResolveApprovalRequest(approval_id=approval.id, approved=True)
    done = await person.request("host_resolve_approval", resolve)
    assert codec.message_to_json(done.approval)["status"] == "approved"
    registered = await asyncio.wait_for(parked, 5)
    assert registered.agent.name == "a1"
    # resolving again, from either core: already approved
    for client in (person, await host_of(a)):
        with pytest.raises(CarError) as err:
            await client.request("host_resolve_approval", resolve)
        assert err.value.message == f"approval '{approval.id}' is already approved"
    snapshot = await late.request("host_subscribe", host_pb2.SubscribeHostRequest())
    assert not snapshot.approvals  # resolved: heard of on core b too
    await caller.close()
    await person.close()
    await late.close()


# ---------------------------------------------------------------- runs


async def test_a_run_recorded_through_one_core_is_followed_live_from_the_other(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    bot = await agent(*a, "bot")
    watcher = await host_of(b)
    run_id = await start(bot, "cross")
    await record(bot, run_id, turns(2, prompt="early"))

    snapshot = await watcher.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    assert (snapshot.cursor, [t.prompt for t in snapshot.turns_so_far]) == (2, ["early0", "early1"])
    stub = runs_pb2_grpc.RunServiceStub(b[1])
    assert b[0].parts is not None and b[0].parts.tokens is not None
    host_token = b[0].parts.tokens.host
    watch = stub.WatchRun(
        runs_pb2.WatchRunRequest(run_id=run_id, cursor=0),
        metadata=(("authorization", f"Bearer {host_token}"),),
    )

    for i in range(3):
        await record(bot, run_id, turns(1, prompt=f"live{i}"))
    events = [(await watcher.next_notification()).runs_trace_event for _ in range(3)]
    assert [(e.cursor, e.record.turn.prompt) for e in events] == [
        (3, "live00"),
        (4, "live10"),
        (5, "live20"),
    ]
    await complete(bot, run_id)
    ended = (await watcher.next_notification()).runs_trace_event
    assert ended.record.record == runs_pb2.RUN_RECORD_KIND_ENDED
    assert ended.status == runs_pb2.RUN_STATUS_COMPLETED

    records = [r async for r in watch]
    assert [r.cursor for r in records] == list(range(1, 8))  # started, 5 turns, ended
    assert records[-1].status == runs_pb2.RUN_STATUS_COMPLETED
    await bot.close()
    await watcher.close()


async def test_a_core_that_stops_renewing_its_lease_is_released_by_the_other(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    bot = await agent(*a, "bot")
    run_id = await start(bot, "left open")
    await record(bot, run_id, turns(3))
    watcher = await host_of(b)
    await watcher.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    h = await chat_host(*b)

    # core a goes silent (as if frozen): no renewal, no messages
    assert a[0].parts is not None and a[0].parts.cluster is not None
    for task in a[0].parts.cluster._tasks:
        task.cancel()
    loop = asyncio.get_running_loop()
    began = loop.time()
    ended = (await watcher.next_notification(timeout=LEASE * 3)).runs_trace_event
    assert ended.status == runs_pb2.RUN_STATUS_INCOMPLETE
    assert loop.time() - began < LEASE + LEASE / 3 + 0.5
    # its agent is no longer found
    with pytest.raises(CarError) as err:
        await h.request("agents_chat", chat_request())
    assert err.value.message == "agent 'bot' is not attached"
    with contextlib.suppress(Exception):
        await bot.close()
    await watcher.close()
    await h.close()


async def test_a_core_restarted_on_the_same_id_rejoins(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    first = await nodes("a")
    bot = await agent(*first, "bot")
    run_id = await start(bot, "left open")
    await record(bot, run_id, turns(2))
    assert first[0].parts is not None and first[0].parts.cluster is not None
    for task in first[0].parts.cluster._tasks:  # it hangs: its lease runs out
        task.cancel()

    # The same id again (another process in life): it waits for the old lease, releases
    # what the earlier life held, and serves.
    again = await nodes("a")
    assert again[0].parts is not None and again[0].parts.cluster is not None
    members = await again[0].parts.cluster.members()
    assert [(m.core_id, m.alive) for m in members] == [("a", True)]
    watcher = await host_of(again)
    snapshot = await watcher.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    assert (snapshot.cursor, snapshot.status) == (2, runs_pb2.RUN_STATUS_INCOMPLETE)
    newbot = await agent(*again, "bot")
    h = await chat_host(*again)
    await open_chat(h, newbot)
    for client in (watcher, newbot, h):
        await client.close()
    with contextlib.suppress(Exception):
        await bot.close()


async def test_the_status_of_either_core_shows_the_whole_cluster(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    gated = frozenset({"host.register_agent"})
    a, b = await nodes("a", gated_methods=gated), await nodes("b")
    bot = await agent(*a, "bot")
    caller = await chat_host(*a)
    parked = asyncio.create_task(
        caller.request("host_register_agent", host_pb2.RegisterAgentRequest(name="x", kind="t"))
    )
    run_id = await start(bot, "open")
    await record(bot, run_id, turns(1))
    watcher = await host_of(b)
    for _ in range(100):  # the approval is parked once the ledger has it
        status = await watcher.request("server_status", status_pb2.GetStatusRequest())
        if status.pending_approvals:
            break
        await asyncio.sleep(0.02)
    assert status.core_id == "b"
    assert status.pending_approvals == 1  # parked on core a
    assert [r.in_progress for r in status.run_agents if r.agent_id == "bot"] == [1]
    cores = {c.core_id: c for c in status.cluster}
    assert sorted(cores) == ["a", "b"]
    assert cores["b"].this_core and not cores["a"].this_core
    assert all(c.alive for c in cores.values())
    assert cores["b"].sessions == 1  # the watcher, counted now
    # core a's figures are those of its last renewal (every third of the lease)
    for _ in range(200):
        status = await watcher.request("server_status", status_pb2.GetStatusRequest())
        cores = {c.core_id: c for c in status.cluster}
        if cores["a"].runs:
            break
        await asyncio.sleep(0.02)
    assert (cores["a"].sessions, cores["a"].agents, cores["a"].runs) == (2, 1, 1)
    assert cores["a"].approvals == 1
    parked.cancel()
    for client in (bot, caller, watcher):
        await client.close()


async def test_a_typed_call_bound_to_a_session_on_another_core_names_that_core(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    assert b[0].parts is not None and b[0].parts.tokens is not None
    daemon = b[0].parts.tokens.daemon
    client = SessionClient(b[1])
    reply = await client.request("session_auth", session_pb2.AuthenticateRequest(token=daemon))
    metadata = (("authorization", f"Bearer {daemon}"), (SESSION_ID_KEY, reply.session_id))
    stub = runs_pb2_grpc.RunServiceStub(a[1])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListRuns(runs_pb2.ListRunsRequest(agent_id="bot"), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == (
        f"session {reply.session_id} lives on core b ({b[0].grpc_address}):"
        " send the calls bound to it there"
    )
    # on its own core it works; a session id no core has is refused as before
    listed = await runs_pb2_grpc.RunServiceStub(b[1]).ListRuns(
        runs_pb2.ListRunsRequest(agent_id="bot"), metadata=metadata
    )
    assert not listed.runs
    unknown = (metadata[0], (SESSION_ID_KEY, "0" * 32))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListRuns(runs_pb2.ListRunsRequest(agent_id="bot"), metadata=unknown)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await client.close()


async def test_after_a_postgresql_restart_the_cores_reconnect_and_cross_again(
    nodes: Callable[..., Awaitable[Node]], postgres_server: PostgresServer
) -> None:
    # A lease longer than the outage: nobody is released for a restart.
    a = await nodes("a", store_timeout=1.0, cluster_lease=6.0)
    b = await nodes("b", store_timeout=1.0, cluster_lease=6.0)
    bot = await agent(*a, "bot")
    run_id = await start(bot, "through the restart")
    watcher = await host_of(b)
    await watcher.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))

    await asyncio.to_thread(postgres_server.stop, "fast")
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(CarError) as err:  # fails clearly, and soon
            await record(bot, run_id, turns(1))
        assert err.value.code == INTERNAL
        assert err.value.message.endswith("the store is unavailable, try again later")
        assert loop.time() - began < 1.0 + 2.0
    finally:
        await asyncio.to_thread(postgres_server.start)

    async with asyncio.timeout(15):  # the pools and the listening connections come back
        while True:
            try:
                await record(bot, run_id, turns(1, prompt="after"))
                break
            except CarError:
                await asyncio.sleep(0.1)
    event = (await watcher.next_notification(timeout=10)).runs_trace_event
    assert (event.cursor, event.record.turn.prompt) == (1, "after0")
    h = await chat_host(*b)
    await open_chat(h, bot)  # core b to the agent on core a
    for client in (bot, watcher, h):
        await client.close()


async def test_every_core_accepts_the_daemon_and_host_tokens_of_the_others(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    a, b = await nodes("a"), await nodes("b")
    assert b[0].parts is not None and b[0].parts.tokens is not None
    daemon_b, host_b = b[0].parts.tokens.daemon, b[0].parts.tokens.host
    # core b joined after core a: a refused token makes core a read the members again
    host = await connect(a[1], host_token=host_b)
    status = await host.request("server_status", status_pb2.GetStatusRequest())
    assert status.core_id == "a"
    daemon = await connect(a[1], token=daemon_b)
    with pytest.raises(CarError) as err:  # a daemon session is no host
        await daemon.request("server_status", status_pb2.GetStatusRequest())
    assert "needs the host role" in err.value.message
    listed = await runs_pb2_grpc.RunServiceStub(a[1]).ListRuns(
        runs_pb2.ListRunsRequest(agent_id="bot"),
        metadata=(("authorization", f"Bearer {host_b}"),),
    )
    assert not listed.runs
    with pytest.raises(CarError) as err:
        await connect(a[1], host_token=daemon_b)  # each token keeps its role
    assert err.value.message == "auth failed: token mismatch"
    await host.close()
    await daemon.close()


async def test_a_chat_to_another_core_carries_only_a_goal_its_host_may_see(
    nodes: Callable[..., Awaitable[Node]],
) -> None:
    """The stored goal of a chat's session_id is looked up on the agent's core, within the
    scope of the host on the calling core (GoalScope, sent with the core-to-core call)."""
    a, b = await nodes("a"), await nodes("b")
    bot = await agent(*b, "bot")
    h = await host_of(a)
    planner = await agent(*a, "planner")  # an agent token hosting its own chats
    for sid in ("g1", "g2"):
        await h.request("goal_set", chats_pb2.SetGoalRequest(session_id=sid, check=f"{sid} ok"))
    for client, sid, carried in ((h, "g1", True), (planner, "g2", False)):
        pending = asyncio.create_task(client.request("agents_chat", chat_request(session_id=sid)))
        asked = await accept_chat(bot)
        await pending
        assert asked.HasField("goal") == carried, sid
        if carried:
            assert asked.goal.check == "g1 ok"
    # The chat's goal becomes running in the background (the chat does not wait for that
    # write), so its status is read until it shows, within a bound.
    expected = [("g1", chats_pb2.GOAL_STATUS_RUNNING), ("g2", chats_pb2.GOAL_STATUS_ACTIVE)]
    seen: list[tuple[str, int]] = []
    for _ in range(500):  # 10 s
        status = await h.request("goal_status", chats_pb2.GetGoalStatusRequest())
        if (seen := [(g.session_id, g.status) for g in status.goals]) == expected:
            break
        await asyncio.sleep(0.02)
    assert seen == expected
    for client in (h, planner, bot):
        await client.close()
