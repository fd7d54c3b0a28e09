"""The polyglot proof: the TypeScript client in clients/node, on the code protoc-gen-es
generated from proto/ (clients/node/gen) and Connect over the gRPC protocol, run by Node.js
(with tsx) against a real `car-grpc serve` process, and crossing languages with Python
clients on gRPC, on raw WebSocket JSON-RPC, and on the official `car-runtime` client.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2, runs_pb2, runs_pb2_grpc, session_pb2, tools_pb2, tools_pb2_grpc
from car_grpc.wire.codec import json_to_message
from tests.bounded import bounded, stopped
from tests.client_programs import (  # noqa: F401 (fixtures)
    Program,
    channel_to_served,
    ensure_installed,
    recorded_turn,
    run_car_runtime_agent,
    run_node,
    served_per_module,
    step,
)
from tests.conftest import make_config
from tests.processes import Served
from tests.session_client import SessionClient, connect
from tests.ws_helpers import rpc


@pytest.fixture(scope="session", autouse=True)
def _node_modules() -> None:
    ensure_installed()


def node(
    served: Served, script: str, *args: str, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """A program of clients/node against `served`; it finds the token files as users' do."""
    return run_node(script, *args, address=served.grpc_address, car_home=served.car_home, **env)


def node_agent(served: Served, agent_id: str) -> contextlib.AbstractAsyncContextManager[Program]:
    """clients/node/agent.ts attached as `agent_id` with a token from `car-grpc agents add`."""
    token = served.add_agent(agent_id)
    return node(served, "agent.ts", CAR_AGENT_ID=agent_id, CAR_AGENT_TOKEN=token)


def node_reply(agent_id: str, prompt: str) -> str:
    """What clients/node/agent.ts answers to a prompt."""
    return f"Node agent {agent_id} heard: {prompt}"


def words(text: str) -> list[str]:
    """`text` as chat tokens: each word with the whitespace after it."""
    return re.findall(r"\S+\s*", text)


# ------------------------------------------------------------------ the Node agent


async def test_node_agent_attaches_and_owns_its_session(
    served: Served, channel: grpc.aio.Channel
) -> None:
    token = served.add_agent("node-agent")
    async with node_agent(served, "node-agent") as agent:
        ready = await agent.expect("ready")
        assert ready["agent_id"] == "node-agent"
        # The Node session is live and bound to the agent's credentials: a typed call
        # with them and its car-session-id runs as that session; other credentials fail.
        tools = tools_pb2_grpc.ToolServiceStub(channel)
        session = ("car-session-id", ready["session_id"])
        bound = (("authorization", f"Bearer {token}"), ("car-agent-id", "node-agent"), session)
        listed = await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=bound)
        assert listed.count == 0
        daemon = ("authorization", f"Bearer {served.token('auth-token')}")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=(daemon, session))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_node_agent_with_a_wrong_token_is_refused(served: Served) -> None:
    served.add_agent("node-agent")
    async with node(
        served, "agent.ts", CAR_AGENT_ID="node-agent", CAR_AGENT_TOKEN="not-the-token"
    ) as agent:
        error = await agent.next_event()
        assert error == {
            "event": "error",
            "code": -32603,
            "message": "auth failed: token mismatch",
        }
        assert await bounded(agent.proc.wait()) == 1


async def test_python_grpc_host_chats_with_the_node_agent(
    served: Served, channel: grpc.aio.Channel
) -> None:
    async with node_agent(served, "node-agent") as agent:
        await agent.expect("ready")
        host = await connect(channel, token=served.token("auth-token"))
        try:
            ask = chats_pb2.ChatRequest(agent_id="node-agent", prompt="hello from Python")
            accepted = await host.request("agents_chat", ask)
            assert accepted.accepted
            assert accepted.chat_id == accepted.session_id  # the chat's id, by its name
            events: list[chats_pb2.ChatEvent] = []
            while not events or events[-1].kind not in ("done", "error"):
                frame = await host.next_notification()
                # The agent set only chat_id; the server filled session_id from it.
                assert frame.agents_chat_event.session_id == accepted.session_id
                assert frame.agents_chat_event.chat_id == accepted.session_id
                assert frame.agents_chat_event.agent_id == "node-agent"
                events.append(frame.agents_chat_event.event)
        finally:
            await host.close()
        chat = await agent.expect("chat")
    assert chat == {
        "event": "chat",
        "session_id": accepted.session_id,
        "prompt": "hello from Python",
    }
    assert [e.kind for e in events] == ["token"] * (len(events) - 1) + ["done"]
    # The agent set only kind_enum; the server filled kind from it, and typed clients
    # see both.
    token, done = chats_pb2.CHAT_EVENT_KIND_TOKEN, chats_pb2.CHAT_EVENT_KIND_DONE
    assert [e.kind_enum for e in events] == [token] * (len(events) - 1) + [done]
    assert "".join(e.delta for e in events[:-1]) == node_reply("node-agent", "hello from Python")


async def test_python_websocket_host_chats_with_the_node_agent(served: Served) -> None:
    async with node_agent(served, "node-agent") as agent:
        await agent.expect("ready")
        async with rpc(served.ws_url) as host:
            await host.login(served.token("auth-token"))
            ask = {"agent_id": "node-agent", "prompt": "hello over WebSocket"}
            accepted = await host.result("agents.chat", ask)
            assert accepted["accepted"] is True
            events: list[dict[str, Any]] = []
            while not events or events[-1]["kind"] not in ("done", "error"):
                message = await host.next_frame()
                assert message["method"] == "agents.chat.event", message
                events.append(message["params"])
        chat = await agent.expect("chat")
    assert chat["session_id"] == accepted["session_id"]
    assert chat["prompt"] == "hello over WebSocket"
    assert all(e["session_id"] == accepted["session_id"] for e in events)
    assert all(e["agent_id"] == "node-agent" for e in events)
    # The JSON wire has the kind strings the agent's kind_enum stands for, and no twin.
    assert [e["kind"] for e in events] == ["token"] * (len(events) - 1) + ["done"]
    assert all("kind_enum" not in e for e in events)
    text = "".join(e["delta"] for e in events[:-1])
    assert text == node_reply("node-agent", "hello over WebSocket")


# ------------------------------------------------------------------ the Node host


def serve_chats_in_python(agent: SessionClient, reply: str) -> None:
    """A Python agent on the gRPC session stream: ack each agent.chat, stream `reply`."""

    async def on_request(frame: session_pb2.ServerFrame) -> None:
        assert frame.WhichOneof("body") == "agent_chat", frame
        session_id = frame.agent_chat.session_id
        await agent.answer(frame.id, "agent_chat", chats_pb2.AgentChatResponse(accepted=True))
        for kind, delta in [*(("token", w) for w in words(reply)), ("done", None)]:
            notice = chats_pb2.AgentChatEventNotice(
                session_id=session_id, event=chats_pb2.ChatEvent(kind=kind, delta=delta)
            )
            await agent.send(session_pb2.ClientFrame(agent_chat_event=notice))

    agent.on_server_request = on_request


def assert_chat_reply(events: list[dict[str, Any]], reply: str) -> None:
    """The events of clients/node/chat.ts for a chat answered with `reply`."""
    assert events[0]["event"] == "accepted" and events[0]["session_id"], events
    assert [e["delta"] for e in events[1:-3]] == words(reply)
    assert [e["kind"] for e in events[1:-2]] == ["token"] * len(words(reply)) + ["done"]
    assert events[-2:] == [{"event": "reply", "text": reply}, {"event": "end"}]


async def test_node_host_chats_with_a_python_grpc_agent(
    served: Served, channel: grpc.aio.Channel
) -> None:
    agent = await connect(channel, token=served.add_agent("py-agent"), agent_id="py-agent")
    serve_chats_in_python(agent, "Python says hi")
    try:
        async with node(served, "chat.ts", "py-agent", "hello from Node") as host:
            events = await host.finish()
    finally:
        await agent.close()
    assert_chat_reply(events, "Python says hi")


async def test_node_host_chats_with_a_car_runtime_agent(served: Served) -> None:
    """The official Python client, attached over WebSocket, serves the Node gRPC host."""
    token = served.add_agent("runtime-agent")
    async with run_car_runtime_agent(
        "car-runtime says hi", url=served.ws_url, agent_id="runtime-agent", token=token
    ) as agent:
        await agent.expect("ready")
        async with node(served, "chat.ts", "runtime-agent", "hello from Node") as host:
            events = await host.finish()
    assert_chat_reply(events, "car-runtime says hi")


async def test_node_tool_host_answers_the_callbacks_of_its_proposal(served: Served) -> None:
    async with node(served, "tool-host.ts") as host:
        registered, result = await host.finish(timeout=30)
    # The typed ListTools call, bound to the live session by car-session-id, saw the tools.
    assert registered == {"event": "registered", "count": 2, "tools": ["add", "divide"]}
    assert result["proposal_id"] == "node-proposal"
    assert result["results"] == [
        {"action_id": "sum", "status": "ACTION_STATUS_SUCCEEDED", "output": 5, "error": None},
        # "$sum.output" was replaced by 5, so `half` ran after `sum`.
        {"action_id": "half", "status": "ACTION_STATUS_SUCCEEDED", "output": 2.5, "error": None},
        # The tool answered ClientFrame.error; failure_behavior skip kept the others.
        {
            "action_id": "oops",
            "status": "ACTION_STATUS_FAILED",
            "output": None,
            "error": "division by zero",
        },
    ]
    assert result["tool_calls"] == 3


# ------------------------------------------------------------------ the Node run watcher


#: Free-form JSON of every kind, to travel Python -> proto -> TypeScript (lib/car.ts fromValue).
PARAMETERS: dict[str, Any] = {
    "argv": ["ls", "-l", 2, True, None],
    "env": {"A": "1", "depth": {"n": 1.5}},
}


def turns(*prompts: str) -> list[runs_pb2.RunTurn]:
    result = []
    for prompt in prompts:
        turn = runs_pb2.RunTurn(prompt=prompt, tool="shell")
        turn.parameters.struct_value.update(PARAMETERS)
        turn.output.string_value = prompt.upper()
        result.append(turn)
    return result


async def test_node_run_watcher_follows_a_python_agents_run_and_resumes(
    served: Served, channel: grpc.aio.Channel
) -> None:
    agent = await connect(channel, token=served.add_agent("py-agent"), agent_id="py-agent")
    try:
        started = await agent.request("runs_start", runs_pb2.StartRunRequest(intent="fix it"))
        run_id = started.run_id
        batch = runs_pb2.RecordTurnsRequest(run_id=run_id, turns=turns("one", "two"))
        await agent.request("runs_record_turns", batch)

        async with node(served, "watch-run.ts", run_id) as watcher:
            # The records already stored, from cursor 0 (the host token reads any run).
            seen = [await watcher.expect("record") for _ in range(3)]
            assert [(r["cursor"], r["kind"]) for r in seen] == [
                (1, "started"),
                (2, "turn"),
                (3, "turn"),
            ]
            assert seen[0]["agent_id"] == "py-agent" and seen[0]["intent"] == "fix it"
            assert [r["prompt"] for r in seen[1:]] == ["one", "two"]
            assert [r["output"] for r in seen[1:]] == ["ONE", "TWO"]
            assert all(r["parameters"] == PARAMETERS for r in seen[1:])
            assert all(r["status"] == "RUN_STATUS_IN_PROGRESS" for r in seen)
            # Then live: a turn recorded now, and the end of the run.
            batch = runs_pb2.RecordTurnsRequest(run_id=run_id, turns=turns("three"))
            await agent.request("runs_record_turns", batch)
            live = await watcher.expect("record")
            assert (live["cursor"], live["prompt"], live["index"]) == (4, "three", 2)
            outcome = runs_pb2.RunOutcome(status="success", summary="done")
            complete = runs_pb2.CompleteRunRequest(run_id=run_id, outcome=outcome)
            await agent.request("runs_complete", complete)
            ended = await watcher.expect("record")
            assert (ended["cursor"], ended["kind"]) == (5, "ended")
            assert ended["ended_status"] == ended["status"] == "RUN_STATUS_COMPLETED"
            # The Python agent sent the string; the TypeScript watcher also sees the enum.
            assert ended["outcome"] == "success"
            assert ended["outcome_enum"] == "RUN_OUTCOME_STATUS_SUCCESS"
            assert (await watcher.finish())[-1] == {"event": "end", "cursor": 5}
    finally:
        await agent.close()

    # A watcher that resumes from cursor 3 gets exactly the records after it.
    async with node(served, "watch-run.ts", run_id, "3") as resumed:
        events = await resumed.finish()
    assert [(e["event"], e.get("cursor"), e.get("kind")) for e in events] == [
        ("record", 4, "turn"),
        ("record", 5, "ended"),
        ("end", 5, None),
    ]


async def test_a_typescript_agent_records_a_run_that_a_typescript_host_watches_live(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """clients/node/record-run.ts (StartRun, RecordTurns, CompleteRun as the agent) steps
    one record at a time while clients/node/watch-run.ts (the host token) shows each live."""
    token = served.add_agent("ts-agent")
    prompts = ["one", "two"]
    async with node(
        served, "record-run.ts", "--step", "fix it", *prompts,
        CAR_AGENT_ID="ts-agent", CAR_AGENT_TOKEN=token,
    ) as agent:  # fmt: skip
        started = await agent.expect("started")
        assert started["agent_id"] == "ts-agent"
        run_id = started["run_id"]
        async with node(served, "watch-run.ts", run_id) as watcher:
            first = await watcher.expect("record")
            assert (first["cursor"], first["kind"], first["intent"]) == (1, "started", "fix it")
            for index, prompt in enumerate(prompts):
                step(agent)
                recorded = await agent.expect("recorded")
                assert (recorded["ok"], recorded["base_index"], recorded["count"]) == (
                    True,
                    index,
                    1,
                )
                assert await watcher.expect("record") == recorded_turn(index, prompt)
            step(agent)
            assert (await agent.expect("completed"))["run_id"] == run_id
            ended = await watcher.expect("record")
            assert (ended["cursor"], ended["ended_status"]) == (4, "RUN_STATUS_COMPLETED")
            assert (await watcher.finish())[-1] == {"event": "end", "cursor": 4}
        await agent.finish()
    # What the TypeScript agent recorded is what the store holds, read back from Python.
    host = (("authorization", f"Bearer {served.token('host-token')}"),)
    trace = await runs_pb2_grpc.RunServiceStub(channel).GetTrace(
        runs_pb2.GetTraceRequest(run_id=run_id), metadata=host
    )
    assert trace.agent_id == "ts-agent"
    outcome = trace.records[-1].ended.outcome
    assert outcome.summary == "recorded from TypeScript"
    # The agent set only status_enum; the server filled the wire's string from it.
    assert (outcome.status, outcome.status_enum) == ("success", runs_pb2.RUN_OUTCOME_STATUS_SUCCESS)


async def test_a_typescript_watcher_of_another_agents_run_gets_the_servers_error(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """The error is the server's answer, decoded from its car-error-bin trailer with the
    generated ErrorSchema, and final: the watcher does not retry it."""
    owner = await connect(channel, token=served.add_agent("py-agent"), agent_id="py-agent")
    try:
        run = await owner.request("runs_start", runs_pb2.StartRunRequest(intent="mine"))
    finally:
        await owner.close()
    other = {"CAR_AGENT_ID": "ts-agent", "CAR_AGENT_TOKEN": served.add_agent("ts-agent")}
    async with node(served, "watch-run.ts", run.run_id, **other) as watcher:
        error = await watcher.next_event()
        assert await bounded(watcher.proc.wait()) == 1
    assert (error["event"], error["grpc_code"], error["code"]) == ("error", "NotFound", -32602)
    assert error["error_code"] == "ERROR_CODE_INVALID_PARAMS"  # from the google.rpc.Status
    assert run.run_id in error["message"]


async def test_node_run_watcher_resumes_across_a_server_restart(tmp_path: Path) -> None:
    """The watcher reconnects with its last cursor (and the new host token) and sees the
    run that the restart left incomplete end, with nothing missed or repeated."""
    config = make_config(tmp_path)
    core = Core(config.core)
    await core.start()
    try:
        assert core.parts is not None
        token = await core.parts.agent_tokens.add("py-agent")
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            agent = await connect(channel, token=token, agent_id="py-agent")
            run = await agent.request("runs_start", runs_pb2.StartRunRequest(intent="survive"))
            batch = runs_pb2.RecordTurnsRequest(run_id=run.run_id, turns=turns("one"))
            await agent.request("runs_record_turns", batch)
            async with run_node(
                "watch-run.ts",
                run.run_id,
                address=core.grpc_address,
                car_home=config.core.token_dir.parent,
            ) as watcher:
                assert [(await watcher.expect("record"))["cursor"] for _ in range(2)] == [1, 2]
                # The agent is still connected: its run stays open.
                await stopped(core.stop(grace=0))
                assert (await watcher.next_event())["event"] == "reconnecting"
                # The same address, a new process state.
                config = config.with_overrides(grpc_port=core.grpc_port)
                core = Core(config.core)
                await core.start()
                seen = len(watcher.events)
                events = (await watcher.finish(timeout=20))[seen:]
            await agent.close()
    finally:
        await stopped(core.stop(grace=0))  # the second core, started in the test
    assert [(e["event"], e.get("cursor"), e.get("kind")) for e in events] == [
        ("record", 3, "ended"),
        ("end", 3, None),
    ]
    assert events[0]["ended_status"] == "RUN_STATUS_INCOMPLETE"


async def test_node_typed_tool_host_serves_a_websocket_and_a_python_grpc_proposal(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """clients/node/serve-tools.ts on ToolService.ServeTools (generated types, shared tools):
    a WebSocket client's proposal and an unbound typed one from Python call its tools."""
    async with node(served, "serve-tools.ts") as host:
        assert await host.expect("registered") == {
            "event": "registered",
            "host": "node-tools",
            "scope": "TOOL_SCOPE_SHARED",
            "tools": ["add", "divide", "wait"],
        }
        async with rpc(served.ws_url) as client:
            await client.login(served.token("auth-token"))
            result = await client.result(
                "proposal.submit",
                {
                    "proposal": {
                        "actions": [
                            {
                                "id": "s",
                                "type": "tool_call",
                                "tool": "add",
                                "parameters": {"a": 1, "b": 2},
                            },
                            {
                                "id": "d",
                                "type": "tool_call",
                                "tool": "divide",
                                "parameters": {"a": 1, "b": 0},
                                "failure_behavior": "skip",
                            },
                        ]
                    }
                },
            )
        assert [(r["status"], r.get("output"), r.get("error")) for r in result["results"]] == [
            ("succeeded", 3, None),
            ("failed", None, "division by zero"),
        ]
        daemon = (("authorization", f"Bearer {served.token('auth-token')}"),)
        request = tools_pb2.SubmitProposalRequest()
        wait = {"id": "w", "type": "tool_call", "tool": "wait", "timeout_ms": 300}
        json_to_message({"proposal": {"actions": [wait]}}, request)
        reply = await tools_pb2_grpc.ToolServiceStub(channel).SubmitProposal(
            request, metadata=daemon, timeout=10
        )
        assert reply.result.results[0].error == "tool 'wait' callback timed out (0.3s)"
        cancel = await host.expect("cancel")
        assert (cancel["action_id"], cancel["reason"]) == ("w", "timeout")
        assert host.proc.stdin is not None
        host.proc.stdin.close()
        assert (await host.finish())[-1] == {"event": "end"}
