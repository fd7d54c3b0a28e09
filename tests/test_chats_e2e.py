"""End-to-end chats over gRPC: hosts on the session stream and on ChatService.Chat,
agents attached on the session stream, all on a real core over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2
from car_grpc.wire.errors import INTERNAL, INVALID_PARAMS, CarError
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
from tests.roles import agent, chat_host, host_role, ordinary
from tests.session_client import SessionClient


@pytest.fixture
def config(tmp_path: Path, request: pytest.FixtureRequest) -> Config:
    """An ack bound of 10 s (an agent's ack may come late on a loaded machine); a test of
    the bound gives its own (indirect parametrize)."""
    return make_config(tmp_path, chat_ack_timeout=getattr(request, "param", 10.0))


def start_chat(h: SessionClient, **fields: object) -> asyncio.Task[chats_pb2.ChatAccepted]:
    """agents.chat from `h`, as a task (the agent must ack before it returns)."""
    request = chats_pb2.ChatRequest(agent_id="agent-1", prompt="hi")
    for name, value in fields.items():
        if name == "goal":
            assert isinstance(value, chats_pb2.ChatGoal)
            request.goal.CopyFrom(value)
        elif name == "attachments":
            assert isinstance(value, list)
            request.attachments.extend(value)
        else:
            setattr(request, name, value)
    return asyncio.create_task(h.request("agents_chat", request))


async def open_chat(
    h: SessionClient, a: SessionClient, **fields: object
) -> tuple[str, chats_pb2.AgentChatRequest]:
    """A chat from `h` to agent `a`, accepted; (session_id, what the agent was asked)."""
    pending = start_chat(h, **fields)
    asked = await accept_chat(a)
    accepted = await pending
    assert accepted.accepted and accepted.session_id == asked.session_id
    return accepted.session_id, asked


async def call_error(task: asyncio.Task[chats_pb2.ChatAccepted]) -> CarError:
    with pytest.raises(CarError) as err:
        await task
    return err.value


@pytest.fixture
async def agent1(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    a = await agent(core, channel, "agent-1")
    yield a
    await a.close()


@pytest.fixture
async def host1(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    h = await chat_host(core, channel)
    yield h
    await h.close()


# ------------------------------------------------------------------ a whole chat


async def test_streamed_chat_reaches_the_host_in_order(
    core: Core, host1: SessionClient, agent1: SessionClient
) -> None:
    assert core.parts is not None
    pending = start_chat(host1, prompt="hello", model="m1")
    asked = await accept_chat(agent1)
    assert asked.prompt == "hello" and asked.model == "m1" and asked.stream
    assert asked.session_id.startswith("chat-")
    host_session = next(s for s in core.parts.registry.sessions.values() if s.agent_id is None)
    assert asked.context.host_client_id == host_session.id
    assert not asked.HasField("goal")
    accepted = await pending
    assert accepted.accepted and accepted.session_id == asked.session_id
    sid = asked.session_id
    for delta in ("Hel", "lo", "!"):
        await emit(agent1, sid, "token", delta=delta)
    await emit(agent1, sid, "tool_call")
    await emit(agent1, sid, "done")
    seen = [await next_chat_event(host1) for _ in range(5)]
    assert {(n.session_id, n.agent_id) for n in seen} == {(sid, "agent-1")}
    assert [n.event.kind for n in seen] == ["token", "token", "token", "tool_call", "done"]
    assert "".join(n.event.delta for n in seen) == "Hello!"
    # Routing ended with `done`: a late event is dropped, the next chat's events come next.
    await emit(agent1, sid, "token", delta="late")
    sid2, _ = await open_chat(host1, agent1, session_id="chat-second")
    await emit(agent1, sid2, "done")
    assert (await next_chat_event(host1)).session_id == "chat-second"


async def test_chat_rpc_streams_accepted_then_events_to_the_terminal_one(
    core: Core, channel: grpc.aio.Channel, agent1: SessionClient
) -> None:
    call = chat_stub(channel).Chat(
        chats_pb2.ChatRequest(agent_id="agent-1", prompt="hi", session_id="rpc-1"),
        metadata=bearer(tokens(core)[0]),
    )
    asked = await accept_chat(agent1)
    assert asked.session_id == "rpc-1"
    await emit(agent1, "rpc-1", "token", delta="a")
    await emit(agent1, "rpc-1", "token", delta="b")
    await emit(agent1, "rpc-1", "error", message="boom")
    items = [item async for item in call]
    assert items[0].WhichOneof("item") == "accepted"
    assert items[0].accepted.session_id == "rpc-1"
    events = [i.event for i in items[1:]]
    assert [(e.event.kind, e.event.delta) for e in events] == [
        ("token", "a"),
        ("token", "b"),
        ("error", ""),
    ]
    assert events[-1].event.message == "boom" and events[-1].agent_id == "agent-1"
    assert await call.code() == grpc.StatusCode.OK


async def test_chat_with_an_agent_that_is_not_attached(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient
) -> None:
    err = await call_error(start_chat(host1, agent_id="nobody"))
    assert (err.code, err.message) == (INTERNAL, "agent 'nobody' is not attached")
    call = chat_stub(channel).Chat(
        chats_pb2.ChatRequest(agent_id="nobody", prompt="hi"), metadata=bearer(tokens(core)[0])
    )
    with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
        async for _ in call:
            pass
    # The session stream (the JSON wire's frames) keeps -32603; a typed client gets the
    # status of a state it can wait out, with the same JSON-RPC code in its details.
    assert rpc_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_err.value.details() == "agent 'nobody' is not attached"
    assert car_error(rpc_err.value).code == INTERNAL
    assert error_info(rpc_err.value).reason == "FAILED_PRECONDITION"


@pytest.mark.parametrize("config", [2.0], indirect=True)  # the ack bound
async def test_agent_that_never_acks_fails_the_chat_within_the_bound(
    host1: SessionClient, agent1: SessionClient
) -> None:
    pending = start_chat(host1, session_id="silent")
    request = await agent1.next_server_request()
    assert request.agent_chat.session_id == "silent"
    err = await call_error(pending)
    assert err.code == INTERNAL
    assert err.message == "agent 'agent-1' did not acknowledge the chat within 2s"
    cancel = await next_agent_notice(agent1)
    assert cancel.agent_chat_cancel.session_id == "silent"
    # The session_id is free again.
    sid, _ = await open_chat(host1, agent1, session_id="silent")
    assert sid == "silent"


async def test_agent_that_refuses_the_chat(host1: SessionClient, agent1: SessionClient) -> None:
    pending = start_chat(host1)
    request = await agent1.next_server_request()
    await agent1.answer_error(request.id, CarError(-32000, "no agent.chat handler registered"))
    err = await call_error(pending)
    assert err.code == INTERNAL
    assert err.message == "agent 'agent-1' refused the chat: no agent.chat handler registered"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("attachment", "field"),
    [
        (chats_pb2.ChatAttachment(), "attachments[0].type"),
        (
            chats_pb2.ChatAttachment(
                type=chats_pb2.ATTACHMENT_TYPE_IMAGE_BASE64, media_type="image/png"
            ),
            "attachments[0].data",
        ),
        (
            chats_pb2.ChatAttachment(
                type=chats_pb2.ATTACHMENT_TYPE_IMAGE_BASE64, data="AAAA", media_type="image/bmp"
            ),
            "attachments[0].media_type",
        ),
        (
            chats_pb2.ChatAttachment(
                type=chats_pb2.ATTACHMENT_TYPE_IMAGE_URL, url="file:///etc/passwd"
            ),
            "attachments[0].url",
        ),
    ],
)
async def test_bad_attachments_are_refused_naming_the_field(
    host1: SessionClient, attachment: chats_pb2.ChatAttachment, field: str
) -> None:
    err = await call_error(start_chat(host1, attachments=[attachment]))
    assert err.code == INVALID_PARAMS
    assert err.message.endswith(f": {field}")


async def test_goal_and_attachments_are_mutually_exclusive(host1: SessionClient) -> None:
    image = chats_pb2.ChatAttachment(
        type=chats_pb2.ATTACHMENT_TYPE_IMAGE_URL, url="https://example.com/a.png"
    )
    err = await call_error(
        start_chat(host1, attachments=[image], goal=chats_pb2.ChatGoal(check="x"))
    )
    assert err.code == INVALID_PARAMS and err.message.endswith(": goal")


async def test_good_attachments_and_clamped_goals_reach_the_agent(
    host1: SessionClient, agent1: SessionClient
) -> None:
    image = chats_pb2.ChatAttachment(
        type=chats_pb2.ATTACHMENT_TYPE_IMAGE_BASE64, data="iVBORw0K", media_type="image/png"
    )
    _, asked = await open_chat(host1, agent1, attachments=[image], stream=False)
    assert list(asked.attachments) == [image] and not asked.stream
    for given, sent in ((None, 8), (0, 1), (99, 50), (12, 12)):
        goal = chats_pb2.ChatGoal(check="tests pass")
        if given is not None:
            goal.max_iterations = given
        _, asked = await open_chat(host1, agent1, goal=goal)
        assert (asked.goal.check, asked.goal.max_iterations) == ("tests pass", sent)


# ------------------------------------------------------------------ cancel and approve


async def test_cancel_by_the_originating_host(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient, agent1: SessionClient
) -> None:
    sid, _ = await open_chat(host1, agent1)
    await emit(agent1, sid, "token", delta="x")
    assert (await next_chat_event(host1)).event.delta == "x"
    # Neither another ordinary session nor the agent itself may cancel it.
    other = await ordinary(core, channel)
    refused = await other.request("agents_chat_cancel", chats_pb2.CancelChatRequest(session_id=sid))
    assert not refused.cancelled
    by_agent = await agent1.request(
        "agents_chat_cancel", chats_pb2.CancelChatRequest(session_id=sid)
    )
    assert not by_agent.cancelled
    reply = await host1.request("agents_chat_cancel", chats_pb2.CancelChatRequest(session_id=sid))
    assert reply.cancelled and reply.session_id == sid
    assert (await next_agent_notice(agent1)).agent_chat_cancel.session_id == sid
    last = await next_chat_event(host1)
    assert (last.event.kind, last.event.message) == ("error", "chat cancelled")
    # Over: a second cancel finds nothing, late agent events are dropped.
    again = await host1.request("agents_chat_cancel", chats_pb2.CancelChatRequest(session_id=sid))
    assert not again.cancelled
    await emit(agent1, sid, "token", delta="late")
    sid2, _ = await open_chat(host1, agent1)
    await emit(agent1, sid2, "done")
    assert (await next_chat_event(host1)).session_id == sid2
    await other.close()


async def test_cancel_by_a_host_role_session(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient, agent1: SessionClient
) -> None:
    sid, _ = await open_chat(host1, agent1)
    operator = await host_role(core, channel)
    reply = await operator.request(
        "agents_chat_cancel", chats_pb2.CancelChatRequest(session_id=sid)
    )
    assert reply.cancelled
    assert (await next_agent_notice(agent1)).agent_chat_cancel.session_id == sid
    assert (await next_chat_event(host1)).event.kind == "error"
    await operator.close()


async def test_cancelling_the_chat_rpc_cancels_the_chat_at_the_agent(
    core: Core, channel: grpc.aio.Channel, agent1: SessionClient
) -> None:
    call = chat_stub(channel).Chat(
        chats_pb2.ChatRequest(agent_id="agent-1", prompt="hi", session_id="rpc-cancel"),
        metadata=bearer(tokens(core)[0]),
    )
    await accept_chat(agent1)
    first = await call.read()
    assert isinstance(first, chats_pb2.ChatResponse) and first.accepted.accepted
    call.cancel()
    notice = await next_agent_notice(agent1)
    assert notice.agent_chat_cancel.session_id == "rpc-cancel"


async def approve(h: SessionClient, sid: str, decision: object) -> chats_pb2.ApproveChatResponse:
    request = chats_pb2.ApproveChatRequest(session_id=sid, approval_id="ap-1")
    if isinstance(decision, bool):
        request.decision.bool_value = decision
    elif isinstance(decision, str):
        request.decision.string_value = decision
    result: chats_pb2.ApproveChatResponse = await h.request("agents_chat_approve", request)
    return result


@pytest.mark.parametrize(
    ("decision", "approved"),
    [(True, True), ("approve", True), ("approved", True), ("yes", True), (False, False),
     ("no", False), ("deny", False), (None, False)],
)  # fmt: skip
async def test_approve_and_deny_are_relayed_to_the_agent(
    host1: SessionClient, agent1: SessionClient, decision: object, approved: bool
) -> None:
    sid, _ = await open_chat(host1, agent1)
    await emit(agent1, sid, "approval_pending", approval_id="ap-1")
    assert (await next_chat_event(host1)).event.approval_id == "ap-1"
    pending = asyncio.create_task(approve(host1, sid, decision))
    request = await agent1.next_server_request()
    asked = request.agent_chat_approve
    assert (asked.session_id, asked.approval_id, asked.approved) == (sid, "ap-1", approved)
    await agent1.answer(
        request.id, "agent_chat_approve", chats_pb2.AgentChatApproveResponse(resolved=True)
    )
    reply = await pending
    assert reply.resolved and reply.session_id == sid
    # The chat goes on.
    await emit(agent1, sid, "approval_resolved", approval_id="ap-1")
    assert (await next_chat_event(host1)).event.kind == "approval_resolved"


async def test_only_the_host_or_host_role_may_approve_never_the_agent(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient, agent1: SessionClient
) -> None:
    sid, _ = await open_chat(host1, agent1)
    other = await ordinary(core, channel)
    for session in (agent1, other):
        with pytest.raises(CarError) as err:
            await approve(session, sid, True)
        assert err.value.code == INTERNAL
    operator = await host_role(core, channel)
    pending = asyncio.create_task(approve(operator, sid, "yes"))
    request = await agent1.next_server_request()
    assert request.agent_chat_approve.approved
    await agent1.answer(
        request.id, "agent_chat_approve", chats_pb2.AgentChatApproveResponse(resolved=False)
    )
    assert not (await pending).resolved
    await other.close()
    await operator.close()


# ------------------------------------------------------------------ disconnects


async def test_agent_dropping_mid_chat_ends_each_chat_with_an_error(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient
) -> None:
    a = await agent(core, channel, "agent-1")
    h2 = await chat_host(core, channel)
    sid1, _ = await open_chat(host1, a)
    sid2, _ = await open_chat(h2, a)
    await emit(a, sid1, "token", delta="partial")
    assert (await next_chat_event(host1)).event.delta == "partial"
    await a.close()
    for h, sid in ((host1, sid1), (h2, sid2)):
        last = await next_chat_event(h)
        assert last.session_id == sid
        assert (last.event.kind, last.event.message) == ("error", "agent 'agent-1' disconnected")
    err = await call_error(start_chat(host1))
    assert err.message == "agent 'agent-1' is not attached"
    await h2.close()


async def test_host_dropping_mid_chat_cancels_it_at_the_agent(
    core: Core, channel: grpc.aio.Channel, agent1: SessionClient
) -> None:
    h = await chat_host(core, channel)
    sid, _ = await open_chat(h, agent1, session_id="orphan")
    await emit(agent1, sid, "token", delta="x")
    await h.close()
    assert (await next_agent_notice(agent1)).agent_chat_cancel.session_id == "orphan"
    # Routing is gone: the same session_id opens again for a new host.
    h2 = await chat_host(core, channel)
    again, _ = await open_chat(h2, agent1, session_id="orphan")
    await emit(agent1, again, "done")
    assert (await next_chat_event(h2)).event.kind == "done"
    await h2.close()


async def test_reattach_ends_chats_of_the_old_connection(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient
) -> None:
    old = await agent(core, channel, "agent-1")
    sid, _ = await open_chat(host1, old)
    assert core.parts is not None
    token = await core.parts.agent_tokens.add("agent-1")
    from tests.session_client import connect

    new = await connect(channel, token=token, agent_id="agent-1")
    last = await next_chat_event(host1)
    assert last.session_id == sid
    assert last.event.message == "agent 'agent-1' re-attached on another connection"
    # The old connection's events for its chat are dropped; chats now go to the new one.
    await emit(old, sid, "token", delta="stale")
    sid2, _ = await open_chat(host1, new)
    await emit(new, sid2, "done")
    assert (await next_chat_event(host1)).session_id == sid2
    await old.close()
    await new.close()


async def test_only_the_routed_agent_may_emit_events(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient, agent1: SessionClient
) -> None:
    intruder = await agent(core, channel, "agent-2")
    sid, _ = await open_chat(host1, agent1)
    await emit(intruder, sid, "token", delta="forged")
    await emit(intruder, sid, "done")
    await emit(agent1, sid, "token", delta="real")
    assert (await next_chat_event(host1)).event.delta == "real"
    await intruder.close()


async def test_two_hosts_chatting_with_one_agent_never_cross(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient, agent1: SessionClient
) -> None:
    h2 = await chat_host(core, channel)
    sid1, _ = await open_chat(host1, agent1, session_id="one")
    sid2, _ = await open_chat(h2, agent1, session_id="two")
    for i in range(50):
        await emit(agent1, sid1, "token", delta=f"1.{i} ")
        await emit(agent1, sid2, "token", delta=f"2.{i} ")
    await emit(agent1, sid1, "done")
    await emit(agent1, sid2, "done")
    for h, sid, tag in ((host1, sid1, "1"), (h2, sid2, "2")):
        got = [await next_chat_event(h) for _ in range(51)]
        assert {n.session_id for n in got} == {sid}
        assert [n.event.delta for n in got[:-1]] == [f"{tag}.{i} " for i in range(50)]
        assert got[-1].event.kind == "done"
        assert h.notifications.empty()
    await h2.close()


async def test_session_id_of_an_open_chat_is_refused(
    host1: SessionClient, agent1: SessionClient
) -> None:
    await open_chat(host1, agent1, session_id="busy")
    err = await call_error(start_chat(host1, session_id="busy"))
    assert err.code == INVALID_PARAMS and err.message.endswith(": session_id")


async def test_typed_chat_rpcs_cancel_and_goals(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient, agent1: SessionClient
) -> None:
    stub, operator = chat_stub(channel), bearer(tokens(core)[1])
    goal = chats_pb2.ChatGoal(check="ship it", max_iterations=3)
    stored = await stub.SetGoal(
        chats_pb2.SetGoalRequest(session_id="typed", goal=goal), metadata=operator
    )
    assert stored.set and stored.goal.status == chats_pb2.GOAL_STATUS_ACTIVE
    sid, asked = await open_chat(host1, agent1, session_id="typed")
    assert asked.goal == goal
    status = await stub.GetGoalStatus(
        chats_pb2.GetGoalStatusRequest(session_id=sid), metadata=operator
    )
    assert status.goal.status == chats_pb2.GOAL_STATUS_RUNNING
    # A one-call session with the daemon token is neither the host nor host role.
    ordinary = await stub.CancelChat(
        chats_pb2.CancelChatRequest(session_id=sid), metadata=bearer(tokens(core)[0])
    )
    assert not ordinary.cancelled
    cancelled = await stub.CancelChat(
        chats_pb2.CancelChatRequest(session_id=sid), metadata=operator
    )
    assert cancelled.cancelled and cancelled.session_id == sid
    assert (await next_agent_notice(agent1)).agent_chat_cancel.session_id == sid
    assert (await next_chat_event(host1)).event.message == "chat cancelled"
    after = await stub.GetGoalStatus(chats_pb2.GetGoalStatusRequest(), metadata=operator)
    assert [(g.session_id, g.status) for g in after.goals] == [
        ("typed", chats_pb2.GOAL_STATUS_ACTIVE)
    ]
    cleared = await stub.ClearGoal(chats_pb2.ClearGoalRequest(session_id=sid), metadata=operator)
    assert cleared.cleared.bool_value
