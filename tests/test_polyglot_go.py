"""The Go client in clients/go, built with Debian's Go toolchain from the code that
`buf generate` made from proto/ (clients/go/gen), run against a real `car-grpc serve`:
an agent records a run while a host watches it live, a host chats with agents in
Python and Node.js, and a tool host on the typed ServeTools stream serves proposals
submitted over the WebSocket and over typed gRPC from Python.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.v1 import runs_pb2, runs_pb2_grpc, session_pb2, tools_pb2, tools_pb2_grpc
from car_grpc.wire.codec import json_to_message, value_to_json
from tests.bounded import bounded
from tests.client_programs import (  # noqa: F401 (fixtures)
    Program,
    channel_to_served,
    ensure_installed,
    recorded_turn,
    run_node,
    served_per_module,
    step,
)
from tests.go_programs import build_go_programs, run_go
from tests.processes import Served
from tests.session_client import connect
from tests.test_polyglot_node import assert_chat_reply, node_reply, serve_chats_in_python
from tests.ws_helpers import rpc

# The suite's 60 s bound is for each test's own run, not the module's setup: compiling
# clients/go from a cold Go build cache (gRPC, protobuf) takes longer than that on a
# loaded 2-core machine. The build and the server start have their own bounds
# (build_go_programs, serving).
pytestmark = pytest.mark.timeout(func_only=True)


@pytest.fixture(scope="module")
def go_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/go/cmd/*, compiled once for this module (setting up Debian's Go first)."""
    return build_go_programs(tmp_path_factory.mktemp("go-bin"))


def go(
    go_bin: Path, served: Served, program: str, *args: str, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    return run_go(
        go_bin, program, *args, address=served.grpc_address, car_home=served.car_home, **env
    )


# ------------------------------------------------------------------ runs


async def test_go_agent_records_a_run_that_a_go_host_watches_live(
    go_bin: Path, served: Served, channel: grpc.aio.Channel
) -> None:
    prompts = ["one", "two", "three"]
    agent_env = {"CAR_AGENT_ID": "go-agent", "CAR_AGENT_TOKEN": served.add_agent("go-agent")}
    async with go(go_bin, served, "record-run", "-step", "fix it", *prompts, **agent_env) as agent:
        started = await agent.expect("started")
        run_id = started["run_id"]
        assert started["agent_id"] == "go-agent"
        # The host role (the host-token file) watches from the start of the run.
        async with go(go_bin, served, "watch-run", run_id) as watcher:
            first = await watcher.expect("record")
            assert first == {
                "event": "record",
                "cursor": 1,
                "kind": "started",
                "agent_id": "go-agent",
                "intent": "fix it",
                "status": "RUN_STATUS_IN_PROGRESS",
            }
            # Each turn is recorded only after the watcher has shown everything before it,
            # so every later record reaches the watcher live.
            for index, prompt in enumerate(prompts):
                step(agent)
                recorded = await agent.expect("recorded")
                assert recorded == {
                    "event": "recorded",
                    "ok": True,
                    "base_index": index,
                    "count": 1,
                }
                assert await watcher.expect("record") == recorded_turn(index, prompt)
            step(agent)
            assert (await agent.expect("completed"))["run_id"] == run_id
            ended = await watcher.expect("record")
            assert (ended["cursor"], ended["kind"]) == (5, "ended")
            assert ended["ended_status"] == ended["status"] == "RUN_STATUS_COMPLETED"
            # record-run set only StatusEnum; the server filled the string from it.
            assert ended["outcome"] == "success"
            assert ended["outcome_enum"] == "RUN_OUTCOME_STATUS_SUCCESS"
            assert (await watcher.finish())[-1] == {"event": "end", "cursor": 5}
        await agent.finish()

    # What the Go agent recorded is what the store holds, read back from Python.
    host = (("authorization", f"Bearer {served.token('host-token')}"),)
    trace = await runs_pb2_grpc.RunServiceStub(channel).GetTrace(
        runs_pb2.GetTraceRequest(run_id=run_id), metadata=host
    )
    assert trace.agent_id == "go-agent"
    turns = [r.turn for r in trace.records if r.WhichOneof("detail") == "turn"]
    assert [t.prompt for t in turns] == prompts
    assert [t.output.string_value for t in turns] == [p.upper() for p in prompts]
    assert trace.records[-1].ended.outcome.summary == "recorded from Go"

    # A watcher that resumes from cursor 3 gets exactly the records after it.
    async with go(go_bin, served, "watch-run", run_id, "3") as resumed:
        events = await resumed.finish()
    assert [(e["event"], e.get("cursor"), e.get("kind")) for e in events] == [
        ("record", 4, "turn"),
        ("record", 5, "ended"),
        ("end", 5, None),
    ]


async def test_go_watcher_of_another_agents_run_gets_the_servers_error(
    go_bin: Path, served: Served, channel: grpc.aio.Channel
) -> None:
    """The error is the server's answer, decoded from its car-error-bin trailer with the
    generated carv1.Error, and final: the watcher does not retry it."""
    owner = await connect(channel, token=served.add_agent("py-agent"), agent_id="py-agent")
    try:
        run = await owner.request("runs_start", runs_pb2.StartRunRequest(intent="mine"))
    finally:
        await owner.close()
    other = {"CAR_AGENT_ID": "go-agent", "CAR_AGENT_TOKEN": served.add_agent("go-agent")}
    async with go(go_bin, served, "watch-run", run.run_id, **other) as watcher:
        error = await watcher.next_event()
        assert await bounded(watcher.proc.wait()) == 1
    assert error["event"] == "error"
    assert error["grpc_code"] == "NotFound"
    assert error["code"] == -32602
    assert error["error_code"] == "ERROR_CODE_INVALID_PARAMS"  # from the google.rpc.Status
    assert run.run_id in error["message"]


# ------------------------------------------------------------------ chats


async def test_go_host_chats_with_a_python_grpc_agent(
    go_bin: Path, served: Served, channel: grpc.aio.Channel
) -> None:
    agent = await connect(channel, token=served.add_agent("py-agent"), agent_id="py-agent")
    serve_chats_in_python(agent, "Python says hi to Go")
    try:
        async with go(go_bin, served, "chat", "py-agent", "hello from Go") as host:
            events = await host.finish()
    finally:
        await agent.close()
    assert_chat_reply(events, "Python says hi to Go")


async def test_go_host_chats_with_the_node_agent(go_bin: Path, served: Served) -> None:
    ensure_installed()
    token = served.add_agent("node-agent")
    env = {"CAR_AGENT_ID": "node-agent", "CAR_AGENT_TOKEN": token}
    node = run_node("agent.ts", address=served.grpc_address, car_home=served.car_home, **env)
    async with node as agent:
        await agent.expect("ready")
        async with go(go_bin, served, "chat", "node-agent", "hello from Go") as host:
            events = await host.finish()
        chat = await agent.expect("chat")
    assert chat["prompt"] == "hello from Go"
    assert events[0]["session_id"] == chat["session_id"]
    assert_chat_reply(events, node_reply("node-agent", "hello from Go"))


async def test_go_host_chat_with_an_agent_that_is_not_attached(
    go_bin: Path, served: Served
) -> None:
    async with go(go_bin, served, "chat", "nobody", "hello?") as host:
        error = await host.next_event()
        assert await bounded(host.proc.wait()) == 1
    # The server's own answer: its JSON-RPC code and message come from car-error-bin.
    assert error["event"] == "error"
    assert error["message"] == "agent 'nobody' is not attached"
    assert error["code"] < 0 and error["grpc_code"] not in ("OK", "Unknown")


# ------------------------------------------------------------------ tool hosting


def proposal(proposal_id: str, *actions: dict[str, Any]) -> tools_pb2.SubmitProposalRequest:
    req = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": {"id": proposal_id, "actions": list(actions)}}, req)
    return req


def tool_call(id: str, tool: str, **extra: Any) -> dict[str, Any]:
    return {"id": id, "type": "tool_call", "tool": tool, **extra}


async def test_a_go_tool_host_serves_a_websocket_and_a_python_grpc_proposal(
    go_bin: Path, served: Served, channel: grpc.aio.Channel
) -> None:
    async with go(go_bin, served, "tool-host", "-name", "go-tools") as host:
        assert await host.expect("registered") == {
            "event": "registered",
            "host": "go-tools",
            "scope": "TOOL_SCOPE_SHARED",
            "tools": ["add", "divide", "wait"],
        }
        # A WebSocket JSON-RPC client, attached as an agent, calls the Go host's tools.
        token = served.add_agent("ws-agent")
        async with rpc(served.ws_url) as ws:
            await ws.result("session.auth", {"token": token, "agent_id": "ws-agent"})
            await ws.result("server.handshake", {"protocol_version": 3, "client_version": "t"})
            result = await ws.result(
                "proposal.submit",
                {
                    "proposal": {
                        "id": "from-ws",
                        "actions": [
                            tool_call("sum", "add", parameters={"a": 2, "b": 3}),
                            tool_call("half", "divide", parameters={"a": "$sum.output", "b": 2}),
                            tool_call(
                                "oops",
                                "divide",
                                parameters={"a": 1, "b": 0},
                                failure_behavior="skip",
                            ),
                        ],
                    }
                },
            )
            assert ws.other == []  # no tools.execute reached the WebSocket client
        assert [(r["action_id"], r["status"]) for r in result["results"]] == [
            ("sum", "succeeded"),
            ("half", "succeeded"),
            ("oops", "failed"),
        ]
        assert [r["output"] for r in result["results"][:2]] == [5, 2.5]
        assert result["results"][2]["error"] == "division by zero"
        calls = [await host.expect("call") for _ in range(3)]
        assert {c["action_id"] for c in calls} == {"sum", "half", "oops"}
        half = next(c for c in calls if c["action_id"] == "half")
        assert half["parameters"] == {"a": 5, "b": 2}
        assert {(c["caller_role"], c["agent_id"]) for c in calls} == {
            ("CALLER_ROLE_AGENT", "ws-agent")
        }

        # A typed gRPC proposal from Python, bound to no session: an action timeout
        # cancels the Go host's call.
        daemon = (("authorization", f"Bearer {served.token('auth-token')}"),)
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        reply = await stub.SubmitProposal(
            proposal(
                "from-python",
                tool_call("n", "add", parameters={"a": 40, "b": 2}),
                tool_call("w", "wait", timeout_ms=300, failure_behavior="skip"),
            ),
            metadata=daemon,
            timeout=10,
        )
        by_action = {r.action_id: r for r in reply.result.results}
        assert value_to_json(by_action["n"].output) == 42
        assert by_action["w"].error == "tool 'wait' callback timed out (0.3s)"
        cancel = await host.expect("cancel")
        waited = next(c for c in host.events if c.get("action_id") == "w" and c["event"] == "call")
        assert cancel == {
            "event": "cancel",
            "request_id": waited["request_id"],
            "action_id": "w",
            "reason": "timeout",
        }
        assert waited["caller_role"] == "CALLER_ROLE_DAEMON"

        # Closing its stdin ends its stream cleanly; its tools go with it.
        assert host.proc.stdin is not None
        host.proc.stdin.close()
        assert (await host.finish())[-1] == {"event": "end"}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitProposal(
            proposal("after", tool_call("n", "add")), metadata=daemon, timeout=10
        )
    assert "no tool host serves 'add'" in (refused.value.details() or "")


async def test_a_go_tool_host_serves_one_python_sessions_own_tools(
    go_bin: Path, served: Served, channel: grpc.aio.Channel
) -> None:
    session = await connect(channel, token=served.token("auth-token"))
    reply = await session.request("session_init", session_pb2.InitSessionRequest())
    async with go(go_bin, served, "tool-host", "-session", reply.session_id) as host:
        registered = await host.expect("registered")
        assert registered["scope"] == "TOOL_SCOPE_SESSION"
        listed = await session.request("tools_list", tools_pb2.ListToolsRequest())
        assert [t.name for t in listed.tools] == ["add", "divide", "wait"]
        answer = await session.request(
            "proposal_submit", proposal("own", tool_call("sum", "add", parameters={"a": 3, "b": 4}))
        )
        assert value_to_json(answer.result.results[0].output) == 7
        assert session.server_requests.empty()  # served by the Go host, not the session
        # When the session ends, so does the host's stream (FAILED_PRECONDITION).
        await session.close()
        error = await host.next_event()
        while error["event"] != "error":
            error = await host.next_event()
        assert await bounded(host.proc.wait()) == 1
    assert error["grpc_code"] == "FailedPrecondition"
    assert "has ended" in error["message"]
