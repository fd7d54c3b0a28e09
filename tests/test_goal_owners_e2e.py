"""End to end, a standing goal belongs to the token that set it: host A (the host token)
and host B (an agent token hosting its own chats) neither see nor change each other's
goals, clearing all clears only one's own, and a chat forwards (and moves) only a goal its
host may see. Over the WebSocket gateway and on the gRPC session stream alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2
from tests.chat_helpers import accept_chat, emit, next_chat_event, tokens
from tests.roles import agent, host_role
from tests.session_client import SessionClient
from tests.ws_helpers import rpc, running

S = chats_pb2


@pytest.fixture
async def host_a(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    h = await host_role(core, channel)
    yield h
    await h.close()


@pytest.fixture
async def host_b(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    h = await agent(core, channel, "planner")
    yield h
    await h.close()


@pytest.fixture
async def worker(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    a = await agent(core, channel, "worker")
    yield a
    await a.close()


async def goal_of(h: SessionClient, sid: str) -> S.StoredGoal | None:
    reply = await h.request("goal_status", S.GetGoalStatusRequest(session_id=sid))
    return reply.goal if reply.HasField("goal") else None


async def test_host_a_neither_sees_nor_clears_host_bs_goal(
    host_a: SessionClient, host_b: SessionClient
) -> None:
    await host_a.request("goal_set", S.SetGoalRequest(session_id="a-1", check="a's"))
    b_goal = await host_b.request("goal_set", S.SetGoalRequest(session_id="b-1", check="b's"))
    assert await goal_of(host_a, "b-1") is None
    listed = await host_a.request("goal_status", S.GetGoalStatusRequest())
    assert [g.session_id for g in listed.goals] == ["a-1"]
    one = await host_a.request("goal_clear", S.ClearGoalRequest(session_id="b-1"))
    assert one.cleared.WhichOneof("kind") == "bool_value" and not one.cleared.bool_value
    everything = await host_a.request("goal_clear", S.ClearGoalRequest())
    assert everything.cleared.number_value == 1
    assert await goal_of(host_b, "b-1") == b_goal.goal  # clear-all left B's as it was
    assert await goal_of(host_a, "a-1") is None


async def test_a_chat_carries_only_a_goal_its_host_may_see(
    host_a: SessionClient, host_b: SessionClient, worker: SessionClient
) -> None:
    await host_b.request("goal_set", S.SetGoalRequest(session_id="g", check="b's check"))
    pending = asyncio.create_task(
        host_a.request("agents_chat", S.ChatRequest(agent_id="worker", prompt="go", session_id="g"))
    )
    asked = await accept_chat(worker)
    await pending
    assert not asked.HasField("goal")
    await emit(worker, "g", "done")
    assert (await next_chat_event(host_a)).event.kind == "done"
    # B's goal neither ran nor recorded A's chat.
    untouched = await goal_of(host_b, "g")
    assert untouched is not None
    assert (untouched.status, untouched.HasField("terminal_kind")) == (S.GOAL_STATUS_ACTIVE, False)
    # B's own chat on it carries it.
    pending = asyncio.create_task(
        host_b.request("agents_chat", S.ChatRequest(agent_id="worker", prompt="go", session_id="g"))
    )
    asked = await accept_chat(worker)
    await pending
    assert asked.goal.check == "b's check"
    running = await goal_of(host_b, "g")
    assert running is not None and running.status == S.GOAL_STATUS_RUNNING


async def test_over_the_websocket_another_tokens_goal_is_absent(config: Config) -> None:
    async with running(config) as (core, gateway):
        daemon_token, host_token = tokens(core)
        async with rpc(gateway.url) as daemon, rpc(gateway.url) as host:
            await daemon.login(daemon_token)
            await host.login(host_token=host_token)
            await daemon.result("goal.set", {"session_id": "d", "check": "the daemon's"})
            # The same answer as for a session_id with no goal at all.
            absent = await host.result("goal.status", {"session_id": "none"})
            absent["session_id"] = "d"
            assert await host.result("goal.status", {"session_id": "d"}) == absent
            assert "goal" not in absent
            refused = await host.error("goal.set", {"session_id": "d", "check": "mine now"})
            assert refused["code"] == -32602 and refused["message"].endswith(": session_id")
            assert await host.result("goal.clear", {}) == {"cleared": 0}
            seen = await daemon.result("goal.status", {"session_id": "d"})
            assert seen["goal"]["check"] == "the daemon's"
