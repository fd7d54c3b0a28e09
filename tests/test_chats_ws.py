"""End-to-end chats through the WebSocket gateway: WebSocket hosts and agents speaking
JSON-RPC (docs/protocol.md §5), mixed with gRPC ones, and the official `car-runtime` client as
the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.store.repositories import GoalStore
from car_grpc.v1 import chats_pb2
from tests.chat_helpers import accept_chat, bearer, chat_stub, emit, tokens
from tests.conftest import make_config
from tests.processes import Process, cli_env, launch
from tests.roles import agent, chat_host
from tests.ws_helpers import RawWebSocket, Rpc, rpc, running

CAR_RUNTIME_AGENT = Path(__file__).with_name("car_runtime_chat_agent.py")


@contextlib.asynccontextmanager
async def ws_peer(gateway: Gateway, auth: dict[str, str]) -> AsyncIterator[Rpc]:
    async with rpc(gateway.url) as peer:
        await peer.login(**auth)
        yield peer


@pytest.fixture
def config(tmp_path: Path, request: pytest.FixtureRequest) -> Config:
    """An ack bound of 10 s (an agent's ack may come late on a loaded machine); a test of
    the bound gives its own (indirect parametrize)."""
    return make_config(tmp_path, chat_ack_timeout=getattr(request, "param", 10.0))


def daemon(core: Core) -> dict[str, str]:
    return {"token": tokens(core)[0]}


async def as_agent(core: Core, agent_id: str = "agent-1") -> dict[str, str]:
    assert core.parts is not None
    return {"agent_id": agent_id, "token": await core.parts.agent_tokens.add(agent_id)}


async def ws_chat(h: Rpc, a: Rpc, **params: Any) -> tuple[str, dict[str, Any]]:
    """agents.chat from WebSocket host `h`, acked by WebSocket agent `a`."""
    pending = asyncio.create_task(h.call("agents.chat", {"agent_id": "agent-1", **params}))
    request = await a.expect_request("agent.chat")
    assert request["id"].startswith("cb-")
    await a.answer(request, {"accepted": True})
    answer = await pending
    assert answer["result"] == {"accepted": True, "session_id": request["params"]["session_id"]}
    return answer["result"]["session_id"], request["params"]


# ------------------------------------------------------------------ WebSocket host and agent


async def test_ws_host_and_ws_agent_stream_a_chat(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with ws_peer(gateway, daemon(core)) as h, ws_peer(gateway, await as_agent(core)) as a:
        sid, asked = await ws_chat(h, a, prompt="hi", model="m", goal={"check": "c"})
        assert asked["prompt"] == "hi" and asked["model"] == "m" and asked["stream"] is True
        assert asked["goal"] == {"check": "c", "max_iterations": 8}
        assert asked["context"]["host_client_id"]
        for delta in ("Hel", "lo"):
            await a.notify("agent.chat.event", {"session_id": sid, "kind": "token", "delta": delta})
        await a.notify("agent.chat.event", {"session_id": sid, "kind": "tool_call", "delta": None})
        await a.notify(
            "agent.chat.event",
            {"session_id": sid, "kind": "tool_result", "tool": "grep", "output": {"hits": 2}},
        )
        await a.notify("agent.chat.event", {"session_id": sid, "kind": "done"})
        events = [await h.expect_notification("agents.chat.event") for _ in range(5)]
        assert events[:2] == [
            {"session_id": sid, "agent_id": "agent-1", "kind": "token", "delta": "Hel"},
            {"session_id": sid, "agent_id": "agent-1", "kind": "token", "delta": "lo"},
        ]
        assert events[2] == {"session_id": sid, "agent_id": "agent-1", "kind": "tool_call"}
        # Keys the proto does not name travel unchanged.
        assert events[3]["tool"] == "grep" and events[3]["output"] == {"hits": 2}
        assert events[4]["kind"] == "done"


async def test_ws_agent_events_sent_with_its_ack_go_to_the_host_as_text(
    served: tuple[Core, Gateway],
) -> None:
    """The events an agent sends right behind its ack (before the host has its answer and
    the chat's pump starts) are written for a WebSocket host as text like every later one:
    the chat has its text head from the moment the agent is asked."""
    core, gateway = served
    assert core.parts is not None
    async with ws_peer(gateway, daemon(core)) as h, ws_peer(gateway, await as_agent(core)) as a:
        pending = asyncio.create_task(h.call("agents.chat", {"agent_id": "agent-1", "prompt": "p"}))
        request = await a.expect_request("agent.chat")
        sid = request["params"]["session_id"]
        assert core.parts.chats.open[sid].text_head is not None
        await a.answer(request, {"accepted": True})
        for n in range(3):
            token = {"session_id": sid, "kind": "token", "delta": f"{n}"}
            await a.notify("agent.chat.event", token)
        await a.notify("agent.chat.event", {"session_id": sid, "kind": "done"})
        assert (await pending)["result"] == {"accepted": True, "session_id": sid}
        events = [await h.expect_notification("agents.chat.event") for _ in range(4)]
        assert events == [
            *({"session_id": sid, "agent_id": "agent-1", "kind": "token", "delta": f"{n}"}
              for n in range(3)),
            {"session_id": sid, "agent_id": "agent-1", "kind": "done"},
        ]  # fmt: skip


async def test_ws_chat_without_a_session_id_asks_the_store_for_no_goal(
    served: tuple[Core, Gateway],
) -> None:
    """A session_id the core draws for a chat is new to every store: no goal can be stored
    for it, so the chat reads none; a chat that names its session_id reads its goal."""
    core, gateway = served
    assert core.parts is not None
    chats = core.parts.chats
    store, reads = chats.goals, []

    class CountingGoals:  # the real store, its reads counted
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def get(self, session_id: str, owner: str | None = None) -> Any:
            reads.append(session_id)
            return await store.get(session_id, owner)

    chats.goals = cast(GoalStore, CountingGoals())
    try:
        async with (
            ws_peer(gateway, daemon(core)) as h,
            ws_peer(gateway, await as_agent(core)) as a,
        ):
            for named in ({}, {"session_id": "named-1"}):
                sid, _ = await ws_chat(h, a, prompt="p", **named)
                await a.notify("agent.chat.event", {"session_id": sid, "kind": "done"})
                assert (await h.expect_notification("agents.chat.event"))["kind"] == "done"
    finally:
        chats.goals = store
    assert reads == ["named-1"]


async def test_ws_errors_for_unattached_agents_and_bad_params(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with ws_peer(gateway, daemon(core)) as h:
        missing = await h.call("agents.chat", {"agent_id": "nobody", "prompt": "hi"})
        assert missing["error"] == {"code": -32603, "message": "agent 'nobody' is not attached"}
        bad = await h.call(
            "agents.chat",
            {
                "agent_id": "nobody",
                "prompt": "hi",
                "attachments": [{"type": "image_url", "url": "ftp://x"}],
            },
        )
        assert bad["error"]["code"] == -32602
        assert "attachments[0].url" in bad["error"]["message"]
        both = await h.call(
            "agents.chat",
            {
                "agent_id": "nobody",
                "prompt": "hi",
                "goal": {"check": "x"},
                "attachments": [{"type": "image_url", "url": "https://x.test/a.png"}],
            },
        )
        assert both["error"]["code"] == -32602 and "goal" in both["error"]["message"]


@pytest.mark.parametrize("config", [2.0], indirect=True)  # the ack bound
async def test_ws_agent_that_never_acks(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with ws_peer(gateway, daemon(core)) as h, ws_peer(gateway, await as_agent(core)) as a:
        pending = asyncio.create_task(h.call("agents.chat", {"agent_id": "agent-1", "prompt": "x"}))
        request = await a.expect_request("agent.chat")
        answer = await pending
        assert answer["error"]["code"] == -32603
        assert "did not acknowledge" in answer["error"]["message"]
        cancel = await a.expect_notification("agent.chat.cancel")
        assert cancel == {"session_id": request["params"]["session_id"]}


async def test_ws_cancel_and_approve(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with ws_peer(gateway, daemon(core)) as h, ws_peer(gateway, await as_agent(core)) as a:
        sid, _ = await ws_chat(h, a, prompt="hi")
        await a.notify(
            "agent.chat.event", {"session_id": sid, "kind": "approval_pending", "approval_id": "p"}
        )
        assert (await h.expect_notification("agents.chat.event"))["approval_id"] == "p"
        for decision, approved in (("approve", True), ("no", False), (True, True)):
            pending = asyncio.create_task(
                h.call(
                    "agents.chat.approve",
                    {"session_id": sid, "approval_id": "p", "decision": decision},
                )
            )
            request = await a.expect_request("agent.chat.approve")
            assert request["params"]["approved"] is approved
            assert request["params"]["decision"] == decision
            await a.answer(request, {"resolved": True})
            assert (await pending)["result"] == {"resolved": True, "session_id": sid}
        # The agent itself may not approve its own approval.
        refused = await a.call(
            "agents.chat.approve", {"session_id": sid, "approval_id": "p", "decision": True}
        )
        assert refused["error"]["code"] == -32603
        cancelled = await h.result("agents.chat.cancel", {"session_id": sid})
        assert cancelled == {"cancelled": True, "session_id": sid}
        assert await a.expect_notification("agent.chat.cancel") == {"session_id": sid}
        last = await h.expect_notification("agents.chat.event")
        assert (last["kind"], last["message"]) == ("error", "chat cancelled")


async def test_ws_goal_status_over_a_chat(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with ws_peer(gateway, daemon(core)) as h, ws_peer(gateway, await as_agent(core)) as a:
        stored = await h.result("goal.set", {"session_id": "g", "check": "green"})
        assert stored["set"] is True and stored["goal"]["status"] == "active"
        _, asked = await ws_chat(h, a, prompt="go", session_id="g")
        assert asked["goal"] == {"check": "green", "max_iterations": 8}
        running = await h.result("goal.status", {"session_id": "g"})
        assert running["goal"]["status"] == "running"
        await a.notify(
            "agent.chat.event",
            {
                "session_id": "g",
                "kind": "goal_evaluated",
                "iteration": 1,
                "met": True,
                "grounded": False,
                "reason": "all green",
            },
        )
        await a.notify("agent.chat.event", {"session_id": "g", "kind": "done", "delta": None})
        await h.expect_notification("agents.chat.event")
        await h.expect_notification("agents.chat.event")
        goal = (await h.result("goal.status", {"session_id": "g"}))["goal"]
        assert {k: goal[k] for k in ("status", "last_iteration", "last_met", "terminal_kind")} == {
            "status": "met",
            "last_iteration": 1,
            "last_met": True,
            "terminal_kind": "done",
        }
        assert goal["last_grounded"] is False and goal["last_reason"] == "all green"
        assert (await h.result("goal.status", {}))["goals"][0]["session_id"] == "g"
        assert await h.result("goal.clear", {}) == {"cleared": 1}


async def test_ws_agent_drop_and_host_drop(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with ws_peer(gateway, await as_agent(core)) as a:
        async with ws_peer(gateway, daemon(core)) as h:
            sid, _ = await ws_chat(h, a, prompt="x", session_id="dropped-host")
        # The host's WebSocket closed: the agent is told to stop.
        assert await a.expect_notification("agent.chat.cancel") == {"session_id": sid}
    async with ws_peer(gateway, daemon(core)) as h:
        async with ws_peer(gateway, await as_agent(core)) as a:
            sid, _ = await ws_chat(h, a, prompt="x")
        last = await h.expect_notification("agents.chat.event")
        assert last == {
            "session_id": sid,
            "agent_id": "agent-1",
            "kind": "error",
            "message": "agent 'agent-1' disconnected",
        }


async def test_ws_agent_that_sends_its_last_tokens_and_leaves_loses_none(
    tmp_path: Path,
) -> None:
    """The gateway half-closes the core stream when a client leaves, so the frames it
    forwarded last are still read: none of an agent's final tokens is lost, even while
    tiny buffers keep the core behind the agent."""
    config = make_config(
        tmp_path, chat_buffer=4, session_outbound_queue=4, max_inflight_per_session=8
    )
    async with running(config) as (core, gateway), ws_peer(gateway, daemon(core)) as h:
        async with ws_peer(gateway, await as_agent(core)) as a:
            sid, _ = await ws_chat(h, a, prompt="bye")
            n = 2000
            for i in range(n):
                await a.notify(
                    "agent.chat.event", {"session_id": sid, "kind": "token", "delta": f"{i},"}
                )
            await a.notify("agent.chat.event", {"session_id": sid, "kind": "done"})
        # The agent's WebSocket closed right after its last frame.
        got = [await h.expect_notification("agents.chat.event") for _ in range(n + 1)]
        assert "".join(e["delta"] for e in got[:-1]) == "".join(f"{i}," for i in range(n))
        assert got[-1]["kind"] == "done"


async def test_two_ws_hosts_with_one_agent_never_cross(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with (
        ws_peer(gateway, daemon(core)) as h1,
        ws_peer(gateway, daemon(core)) as h2,
        ws_peer(gateway, await as_agent(core)) as a,
    ):
        sid1, _ = await ws_chat(h1, a, prompt="one")
        sid2, _ = await ws_chat(h2, a, prompt="two")
        for i in range(30):
            for sid in (sid1, sid2):
                await a.notify(
                    "agent.chat.event", {"session_id": sid, "kind": "token", "delta": f"{sid}:{i}"}
                )
        for sid in (sid1, sid2):
            await a.notify("agent.chat.event", {"session_id": sid, "kind": "done"})
        for h, sid in ((h1, sid1), (h2, sid2)):
            got = [await h.expect_notification("agents.chat.event") for _ in range(31)]
            assert {e["session_id"] for e in got} == {sid}
            assert [e.get("delta") for e in got[:-1]] == [f"{sid}:{i}" for i in range(30)]
            assert await h.queued() == []


# ------------------------------------------------------------------ mixed transports


async def test_ws_host_with_a_grpc_agent(served: tuple[Core, Gateway], tmp_path: Path) -> None:
    core, gateway = served
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        a = await agent(core, channel, "agent-1")
        async with ws_peer(gateway, daemon(core)) as h:
            pending = asyncio.create_task(
                h.call("agents.chat", {"agent_id": "agent-1", "prompt": "hi"})
            )
            sid = (await accept_chat(a)).session_id
            assert (await pending)["result"]["session_id"] == sid
            await emit(a, sid, "token", delta="from gRPC")
            await emit(a, sid, "done")
            assert (await h.expect_notification("agents.chat.event"))["delta"] == "from gRPC"
            assert (await h.expect_notification("agents.chat.event"))["kind"] == "done"
        await a.close()


async def test_grpc_hosts_with_a_ws_agent(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with (
        grpc.aio.insecure_channel(core.grpc_address) as channel,
        ws_peer(gateway, await as_agent(core)) as a,
    ):
        h = await chat_host(core, channel)
        pending = asyncio.create_task(
            h.request("agents_chat", chats_pb2.ChatRequest(agent_id="agent-1", prompt="hi"))
        )
        request = await a.expect_request("agent.chat")
        await a.answer(request, {"accepted": True})
        sid = (await pending).session_id
        await a.notify("agent.chat.event", {"session_id": sid, "kind": "token", "delta": "ws"})
        await a.notify("agent.chat.event", {"session_id": sid, "kind": "done", "delta": None})
        first = await h.next_notification()
        assert first.agents_chat_event.event.delta == "ws"
        assert (await h.next_notification()).agents_chat_event.event.kind == "done"
        await h.close()
        # The same over ChatService.Chat.
        call = chat_stub(channel).Chat(
            chats_pb2.ChatRequest(agent_id="agent-1", prompt="hi", session_id="rpc"),
            metadata=bearer(tokens(core)[0]),
        )
        request = await a.expect_request("agent.chat")
        await a.answer(request, {"accepted": True})
        await a.notify("agent.chat.event", {"session_id": "rpc", "kind": "done"})
        kinds = [i.WhichOneof("item") async for i in call]
        assert kinds == ["accepted", "event"]


# ------------------------------------------------------------------ car-runtime as the agent


@contextlib.asynccontextmanager
async def car_runtime_agent(
    core: Core, gateway: Gateway, home: Path, agent_id: str
) -> AsyncIterator[Process]:
    """tests/car_runtime_chat_agent.py attached as `agent_id`; yields once it is attached."""
    assert core.parts is not None
    env = cli_env(
        home,
        CAR_DAEMON_URL=gateway.url,
        CAR_AGENT_ID=agent_id,
        CAR_AGENT_TOKEN=await core.parts.agent_tokens.add(agent_id),
        CAR_NO_VERSION_WARNING="1",
    )
    argv = [sys.executable, str(CAR_RUNTIME_AGENT)]
    async with launch(argv, env=env, stdin=True, stdout=True, grace=5) as agent:
        assert agent.proc.stdout is not None
        line = await asyncio.wait_for(agent.proc.stdout.readline(), 20)
        assert json.loads(line) == {"event": "ready"}, agent.log
        yield agent


async def test_car_runtime_agent_serves_ws_and_grpc_hosts(
    served: tuple[Core, Gateway], tmp_path: Path
) -> None:
    core, gateway = served
    async with car_runtime_agent(core, gateway, tmp_path / "agent-home", "rt-agent"):
        async with ws_peer(gateway, daemon(core)) as h:
            answer = await h.result(
                "agents.chat",
                {"agent_id": "rt-agent", "prompt": "hello there", "goal": {"check": "c"}},
            )
            sid = answer["session_id"]
            events: list[dict[str, Any]] = []
            while not events or events[-1]["kind"] not in ("done", "error"):
                events.append(await h.expect_notification("agents.chat.event"))
        # The handler echoes what it was asked, word by word, then reports done.
        assert {e["session_id"] for e in events} == {sid}
        assert {e["agent_id"] for e in events} == {"rt-agent"}
        assert [e["kind"] for e in events] == ["token"] * 4 + ["done"]
        asked = json.loads("".join(e["delta"] for e in events[:-1]))
        assert asked["prompt"] == "hello there" and asked["session_id"] == sid
        assert asked["goal"] == {"check": "c", "max_iterations": 8}
        assert asked["context"]["host_client_id"]
        # A gRPC host over ChatService.Chat, served by the same car-runtime agent.
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            call = chat_stub(channel).Chat(
                chats_pb2.ChatRequest(agent_id="rt-agent", prompt="from gRPC", session_id="g"),
                metadata=bearer(tokens(core)[0]),
            )
            items = [i async for i in call]
        assert items[0].accepted.session_id == "g"
        assert [i.event.event.kind for i in items[1:]] == ["token"] * 4 + ["done"]
        text = "".join(i.event.event.delta for i in items[1:-1])
        assert json.loads(text)["prompt"] == "from gRPC"


def _small_buffers(tmp_path: Path, **overrides: Any) -> Config:
    return make_config(
        tmp_path,
        ws_outbound_queue=8,
        ws_write_limit=16 * 1024,
        session_outbound_queue=8,
        chat_buffer=8,
        **overrides,
    )


async def _deaf_host_chat(core: Core, gateway: Gateway, a: Rpc) -> RawWebSocket:
    """A raw WebSocket host (small receive buffer) whose chat "deaf" agent `a` accepted;
    from here on the host reads nothing."""
    raw = await RawWebSocket.open("127.0.0.1", gateway.ws_port, rcvbuf=4096)
    await raw.send_text(
        {"jsonrpc": "2.0", "id": 1, "method": "session.auth", "params": daemon(core)}
    )
    await raw.read_frame()
    chat = {"agent_id": "agent-1", "prompt": "flood", "session_id": "deaf"}
    await raw.send_text({"jsonrpc": "2.0", "id": 2, "method": "agents.chat", "params": chat})
    await a.answer(await a.expect_request("agent.chat"), {"accepted": True})
    return raw


async def _flood_until_cancelled(a: Rpc) -> int:
    """Stream numbered 16 KiB tokens until the agent is told to stop; how many were sent."""
    pad = "x" * 16384
    sent = 0
    while not await a.queued():
        assert sent < 5000, "the chat was never cancelled"
        delta = f"{sent}:{pad}"
        await a.notify("agent.chat.event", {"session_id": "deaf", "kind": "token", "delta": delta})
        sent += 1
        await asyncio.sleep(0)
    assert await a.expect_notification("agent.chat.cancel") == {"session_id": "deaf"}
    return sent


async def test_ws_host_that_stops_reading_loses_its_chat_not_its_connection(
    tmp_path: Path,
) -> None:
    """Backpressure reaches the chat's buffer in the core: after chat_stall_timeout the
    chat ends (cancelled at the agent), while the connection waits for the host. When it
    reads again it finds a gap-free prefix of the tokens, then the error."""
    config = _small_buffers(tmp_path, chat_stall_timeout=0.3, ws_stall_timeout=30)
    async with running(config) as (core, gateway), ws_peer(gateway, await as_agent(core)) as a:
        raw = await _deaf_host_chat(core, gateway, a)
        sent = await _flood_until_cancelled(a)
        assert core.parts is not None and "deaf" not in core.parts.chats.open
        # The host reads again: the chat's answer, then tokens in order, then the error.
        assert json.loads((await raw.read_frame())[1])["result"]["session_id"] == "deaf"
        seen: list[int] = []
        while True:
            event = json.loads((await raw.read_frame())[1])["params"]
            if event["kind"] != "token":
                break
            seen.append(int(event["delta"].split(":")[0]))
        assert seen == list(range(len(seen))) and 0 < len(seen) < sent
        assert event["message"] == "chat ended: the host read nothing for 0.3s"
        # Its connection is still there.
        await raw.send_text({"jsonrpc": "2.0", "id": 3, "method": "tools.list"})
        assert json.loads((await raw.read_frame())[1])["id"] == 3
        raw.close()


async def test_ws_host_that_reads_nothing_for_the_stall_bound_is_dropped(
    tmp_path: Path,
) -> None:
    """The gateway gives up on a host that took nothing for ws_stall_timeout: its session
    ends, and with it the chat, cancelled at the agent."""
    config = _small_buffers(
        tmp_path, chat_stall_timeout=30, ws_stall_timeout=0.3, ws_close_timeout=0.5
    )
    async with running(config) as (core, gateway), ws_peer(gateway, await as_agent(core)) as a:
        raw = await _deaf_host_chat(core, gateway, a)
        await _flood_until_cancelled(a)
        assert core.parts is not None and "deaf" not in core.parts.chats.open
        raw.close()
