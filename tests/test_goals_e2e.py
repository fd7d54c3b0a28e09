"""End-to-end standing goals: goal.set/status/clear, a goal's status over a chat, and goals
surviving a restart of the core on the same state root."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2
from car_grpc.wire.errors import INVALID_PARAMS, CarError
from tests.bounded import stopped
from tests.chat_helpers import accept_chat, emit, next_chat_event
from tests.roles import agent, chat_host
from tests.session_client import SessionClient
from tests.ws_helpers import running_core

S = chats_pb2


@pytest.fixture
async def host1(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    h = await chat_host(core, channel)
    yield h
    await h.close()


@pytest.fixture
async def agent1(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    a = await agent(core, channel, "agent-1")
    yield a
    await a.close()


async def set_goal(h: SessionClient, sid: str, check: str, **goal: int) -> S.StoredGoal:
    reply = await h.request(
        "goal_set", S.SetGoalRequest(session_id=sid, goal=S.ChatGoal(check=check, **goal))
    )
    assert reply.set
    stored: S.StoredGoal = reply.goal
    return stored


async def status(h: SessionClient, sid: str) -> S.StoredGoal | None:
    reply = await h.request("goal_status", S.GetGoalStatusRequest(session_id=sid))
    assert reply.session_id == sid
    return reply.goal if reply.HasField("goal") else None


async def chat(h: SessionClient, a: SessionClient, sid: str) -> S.AgentChatRequest:
    pending = asyncio.create_task(
        h.request("agents_chat", S.ChatRequest(agent_id="agent-1", prompt="go", session_id=sid))
    )
    asked = await accept_chat(a)
    await pending
    return asked


async def test_set_status_and_clear(host1: SessionClient) -> None:
    stored = await set_goal(host1, "s1", "tests pass", max_iterations=99)
    assert (stored.session_id, stored.check, stored.max_iterations) == ("s1", "tests pass", 50)
    assert stored.status == S.GOAL_STATUS_ACTIVE and stored.updated_at > 0
    top = await host1.request("goal_set", S.SetGoalRequest(session_id="s2", check="lint clean"))
    assert (top.goal.check, top.goal.max_iterations) == ("lint clean", 8)
    assert await status(host1, "s1") == stored
    assert await status(host1, "nope") is None
    everything = await host1.request("goal_status", S.GetGoalStatusRequest())
    assert [g.session_id for g in everything.goals] == ["s1", "s2"]
    one = await host1.request("goal_clear", S.ClearGoalRequest(session_id="s1"))
    assert one.cleared.bool_value and one.session_id == "s1"
    again = await host1.request("goal_clear", S.ClearGoalRequest(session_id="s1"))
    assert again.cleared.WhichOneof("kind") == "bool_value" and not again.cleared.bool_value
    rest = await host1.request("goal_clear", S.ClearGoalRequest())
    assert rest.cleared.number_value == 1
    assert not (await host1.request("goal_status", S.GetGoalStatusRequest())).goals


async def test_goal_set_needs_session_id_and_check(host1: SessionClient) -> None:
    for request, field in (
        (S.SetGoalRequest(check="x"), "session_id"),
        (S.SetGoalRequest(session_id="s"), "check"),
        (S.SetGoalRequest(session_id="s", goal=S.ChatGoal()), "goal.check"),
    ):
        with pytest.raises(CarError) as err:
            await host1.request("goal_set", request)
        assert err.value.code == INVALID_PARAMS and err.value.message.endswith(f": {field}")


async def test_goal_status_follows_the_chat(host1: SessionClient, agent1: SessionClient) -> None:
    await set_goal(host1, "g1", "all green", max_iterations=3)
    asked = await chat(host1, agent1, "g1")
    # The stored goal is forwarded to the agent, and the goal is now running.
    assert (asked.goal.check, asked.goal.max_iterations) == ("all green", 3)
    running = await status(host1, "g1")
    assert running is not None and running.status == S.GOAL_STATUS_RUNNING
    await emit(agent1, "g1", "goal_evaluated", iteration=1, met=False, grounded=True, reason="red")
    assert (await next_chat_event(host1)).event.reason == "red"
    first = await status(host1, "g1")
    assert first is not None and first.status == S.GOAL_STATUS_RUNNING
    assert (first.last_iteration, first.last_met, first.last_grounded, first.last_reason) == (
        1,
        False,
        True,
        "red",
    )
    await emit(agent1, "g1", "goal_evaluated", iteration=2, met=True, grounded=True, reason="ok")
    await emit(agent1, "g1", "done")
    assert (await next_chat_event(host1)).event.iteration == 2
    assert (await next_chat_event(host1)).event.kind == "done"
    met = await status(host1, "g1")
    assert met is not None
    assert (met.status, met.last_iteration, met.last_met, met.terminal_kind) == (
        S.GOAL_STATUS_MET,
        2,
        True,
        "done",
    )


async def test_inline_goal_wins_over_the_stored_one(
    host1: SessionClient, agent1: SessionClient
) -> None:
    await set_goal(host1, "g2", "stored check")
    pending = asyncio.create_task(
        host1.request(
            "agents_chat",
            S.ChatRequest(
                agent_id="agent-1", prompt="go", session_id="g2", goal=S.ChatGoal(check="inline")
            ),
        )
    )
    asked = await accept_chat(agent1)
    await pending
    assert (asked.goal.check, asked.goal.max_iterations) == ("inline", 8)


@pytest.mark.parametrize(
    ("events", "expected", "terminal"),
    [
        ([("done", {})], S.GOAL_STATUS_UNEVALUATED, "done"),
        ([("goal_evaluated", {"iteration": 1, "met": False}), ("done", {})],
         S.GOAL_STATUS_ACTIVE, "done"),
        ([("error", {"message": "x"})], S.GOAL_STATUS_ERROR, "error"),
        ([("auth_required", {})], S.GOAL_STATUS_ERROR, "auth_required"),
    ],
)  # fmt: skip
async def test_goal_status_after_the_chat_ends(
    host1: SessionClient,
    agent1: SessionClient,
    events: list[tuple[str, dict[str, object]]],
    expected: int,
    terminal: str,
) -> None:
    await set_goal(host1, "g3", "check")
    await chat(host1, agent1, "g3")
    for kind, fields in events:
        await emit(agent1, "g3", kind, **fields)
    for _ in events:
        await next_chat_event(host1)
    ended = await status(host1, "g3")
    assert ended is not None and (ended.status, ended.terminal_kind) == (expected, terminal)


async def test_agent_dropping_puts_the_goal_in_error(
    core: Core, channel: grpc.aio.Channel, host1: SessionClient
) -> None:
    a = await agent(core, channel, "agent-1")
    await set_goal(host1, "g4", "check")
    await chat(host1, a, "g4")
    await a.close()
    assert (await next_chat_event(host1)).event.kind == "error"
    ended = await status(host1, "g4")
    assert ended is not None and ended.status == S.GOAL_STATUS_ERROR


async def test_goals_survive_a_restart_and_running_becomes_active(config: Config) -> None:
    core = Core(config.core)
    await core.start()
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        h = await chat_host(core, channel)
        await set_goal(h, "kept", "stays", max_iterations=5)
        await set_goal(h, "crashed", "was running at the crash")
        # As if the server had died while a chat ran it: the stored row says running.
        assert core.parts is not None
        await core.parts.store.goals.set_status("crashed", S.GOAL_STATUS_RUNNING)
        before = await status(h, "crashed")
        assert before is not None and before.status == S.GOAL_STATUS_RUNNING
        await h.close()
    await stopped(core.stop(grace=0))
    async with (
        running_core(config.core) as again,
        grpc.aio.insecure_channel(again.grpc_address) as channel,
    ):
        h = await chat_host(again, channel)
        kept, crashed = await status(h, "kept"), await status(h, "crashed")
        assert kept is not None and crashed is not None
        assert (kept.check, kept.max_iterations, kept.status) == (
            "stays",
            5,
            S.GOAL_STATUS_ACTIVE,
        )
        assert (crashed.check, crashed.status) == (
            "was running at the crash",
            S.GOAL_STATUS_ACTIVE,
        )
        await h.close()
