"""A chat moves only the goal it was opened with, by that goal's owner: when its host clears
the goal while the chat runs and another caller sets a goal of its own on the same
session_id, the chat's evaluations and its end leave the other caller's goal as it was."""

from __future__ import annotations

import asyncio

import grpc

from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2
from tests.chat_helpers import accept_chat, emit, next_chat_event
from tests.roles import agent, host_role
from tests.test_goal_owners_e2e import goal_of

S = chats_pb2


async def test_a_chat_leaves_alone_a_goal_set_by_another_while_it_ran(
    core: Core, channel: grpc.aio.Channel
) -> None:
    host_a = await host_role(core, channel)
    host_b = await agent(core, channel, "planner")  # an agent token hosting its own chats
    worker = await agent(core, channel, "worker")
    try:
        await host_a.request("goal_set", S.SetGoalRequest(session_id="g", check="a's check"))
        pending = asyncio.create_task(
            host_a.request(
                "agents_chat", S.ChatRequest(agent_id="worker", prompt="go", session_id="g")
            )
        )
        asked = await accept_chat(worker)
        await pending
        assert asked.goal.check == "a's check"
        cleared = await host_a.request("goal_clear", S.ClearGoalRequest(session_id="g"))
        assert cleared.cleared.bool_value
        b_goal = await host_b.request("goal_set", S.SetGoalRequest(session_id="g", check="b's"))

        await emit(worker, "g", "goal_evaluated", iteration=1, met=True, reason="a's is met")
        await emit(worker, "g", "done")
        kinds = [(await next_chat_event(host_a)).event.kind for _ in range(2)]
        assert kinds == ["goal_evaluated", "done"]

        assert await goal_of(host_b, "g") == b_goal.goal  # neither evaluated nor settled
        assert await goal_of(host_a, "g") is None  # and A's stays cleared
    finally:
        for session in (host_a, host_b, worker):
            await session.close()
