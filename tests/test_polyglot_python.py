"""The Python examples in clients/python, on the generated stubs (car_grpc.v1) and
grpc.aio, each run as its own process against a real `car-grpc serve`, as a user runs
them: an agent and a host chat, an agent records a run that a host watches live (and
resumes after a restart), two tool hosts (ServeTools and the session stream) serve
proposals, and a client reaches a TLS core. They print what clients/node prints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import grpc

from car_grpc.core.server import Core
from car_grpc.v1 import runs_pb2, runs_pb2_grpc, tools_pb2, tools_pb2_grpc
from car_grpc.wire.codec import json_to_message
from tests.bounded import bounded, stopped
from tests.client_programs import (  # noqa: F401 (fixtures)
    Program,
    channel_to_served,
    recorded_turn,
    run_python,
    served_per_module,
    step,
)
from tests.conftest import make_config
from tests.processes import Served
from tests.session_client import connect
from tests.test_polyglot_node import assert_chat_reply
from tests.test_tls import _self_signed
from tests.ws_helpers import rpc


def python(
    served: Served, script: str, *args: str, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """A program of clients/python against `served`; it finds the token files as users' do."""
    return run_python(script, *args, address=served.grpc_address, car_home=served.car_home, **env)


def as_agent(served: Served, agent_id: str) -> dict[str, str]:
    """The environment of an example run as `agent_id` (`car-grpc agents add`)."""
    return {"CAR_AGENT_ID": agent_id, "CAR_AGENT_TOKEN": served.add_agent(agent_id)}


# ------------------------------------------------------------------ chats


async def test_the_python_agent_serves_the_python_host_and_owns_its_session(
    served: Served, channel: grpc.aio.Channel
) -> None:
    agent_env = as_agent(served, "py-agent")
    async with python(served, "agent.py", **agent_env) as agent:
        ready = await agent.expect("ready")
        assert ready["agent_id"] == "py-agent"
        # Its session is live and bound to its credentials: a typed call with them and its
        # car-session-id runs as that session.
        bound = (
            ("authorization", f"Bearer {agent_env['CAR_AGENT_TOKEN']}"),
            ("car-agent-id", "py-agent"),
            ("car-session-id", ready["session_id"]),
        )
        tools = tools_pb2_grpc.ToolServiceStub(channel)
        assert (await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=bound)).count == 0

        async with python(served, "chat.py", "py-agent", "hello from Python") as host:
            events = await host.finish()
        chat = await agent.expect("chat")
    assert chat == {
        "event": "chat",
        "session_id": events[0]["session_id"],
        "prompt": "hello from Python",
    }
    assert_chat_reply(events, "Python agent py-agent heard: hello from Python")


async def test_the_python_agent_with_a_wrong_token_is_refused(served: Served) -> None:
    served.add_agent("py-agent")
    env = {"CAR_AGENT_ID": "py-agent", "CAR_AGENT_TOKEN": "not-the-token"}
    async with python(served, "agent.py", **env) as agent:
        error = await agent.next_event()
        assert await bounded(agent.proc.wait()) == 1
    # The session stream's answer: a JSON-RPC error, no gRPC status.
    assert error == {"event": "error", "code": -32603, "message": "auth failed: token mismatch"}


async def test_the_python_agent_serves_a_websocket_host(served: Served) -> None:
    async with python(served, "agent.py", **as_agent(served, "py-agent")) as agent:
        await agent.expect("ready")
        async with rpc(served.ws_url) as host:
            await host.login(served.token("auth-token"))
            ask = {"agent_id": "py-agent", "prompt": "hello over WebSocket"}
            accepted = await host.result("agents.chat", ask)
            events: list[dict[str, Any]] = []
            while not events or events[-1]["kind"] not in ("done", "error"):
                message = await host.next_frame()
                assert message["method"] == "agents.chat.event", message
                events.append(message["params"])
    # The agent set only chat_id and kind_enum: the JSON wire has session_id and kind.
    assert all(e["session_id"] == accepted["session_id"] for e in events)
    assert [e["kind"] for e in events] == ["token"] * (len(events) - 1) + ["done"]
    text = "".join(e["delta"] for e in events[:-1])
    assert text == "Python agent py-agent heard: hello over WebSocket"


async def test_the_python_host_chat_with_an_agent_that_is_not_attached(served: Served) -> None:
    async with python(served, "chat.py", "nobody", "hello?") as host:
        error = await host.next_event()
        assert await bounded(host.proc.wait()) == 1
    # The server's answer, from car-error-bin: the JSON-RPC code, a typed status.
    assert error == {
        "event": "error",
        "grpc_code": "FailedPrecondition",
        "error_code": "ERROR_CODE_INTERNAL",
        "code": -32603,
        "message": "agent 'nobody' is not attached",
    }


# ------------------------------------------------------------------ runs


async def test_the_python_agent_records_a_run_that_the_python_host_watches_live(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """record-run.py --step records one turn at a time while watch-run.py (the host token)
    shows each live; a second watcher resumes from a cursor."""
    prompts = ["one", "two"]
    agent_env = as_agent(served, "py-recorder")
    async with python(served, "record-run.py", "--step", "fix it", *prompts, **agent_env) as agent:
        started = await agent.expect("started")
        assert started["agent_id"] == "py-recorder"
        run_id = started["run_id"]
        async with python(served, "watch-run.py", run_id) as watcher:
            assert await watcher.expect("record") == {
                "event": "record",
                "cursor": 1,
                "status": "RUN_STATUS_IN_PROGRESS",
                "kind": "started",
                "agent_id": "py-recorder",
                "intent": "fix it",
            }
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
            assert (ended["cursor"], ended["kind"], ended["ended_status"]) == (
                4,
                "ended",
                "RUN_STATUS_COMPLETED",
            )
            # The agent set only status_enum; the server filled the wire's string from it.
            assert (ended["outcome"], ended["outcome_enum"]) == (
                "success",
                "RUN_OUTCOME_STATUS_SUCCESS",
            )
            assert (await watcher.finish())[-1] == {"event": "end", "cursor": 4}
        await agent.finish()

    # What the agent recorded is what the store holds.
    host = (("authorization", f"Bearer {served.token('host-token')}"),)
    trace = await runs_pb2_grpc.RunServiceStub(channel).GetTrace(
        runs_pb2.GetTraceRequest(run_id=run_id), metadata=host
    )
    assert trace.records[-1].ended.outcome.summary == "recorded from Python"
    # A watcher that resumes from cursor 2 gets exactly the records after it.
    async with python(served, "watch-run.py", run_id, "2") as resumed:
        events = await resumed.finish()
    assert [(e["event"], e.get("cursor"), e.get("kind")) for e in events] == [
        ("record", 3, "turn"),
        ("record", 4, "ended"),
        ("end", 4, None),
    ]


async def test_a_python_watcher_of_another_agents_run_gets_the_servers_error(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """The server's answer is final: the watcher reports it and does not retry."""
    owner = await connect(channel, token=served.add_agent("py-owner"), agent_id="py-owner")
    try:
        run = await owner.request("runs_start", runs_pb2.StartRunRequest(intent="mine"))
    finally:
        await owner.close()
    async with python(
        served, "watch-run.py", run.run_id, **as_agent(served, "py-other")
    ) as watcher:
        error = await watcher.next_event()
        assert await bounded(watcher.proc.wait()) == 1
    assert (error["event"], error["grpc_code"], error["code"]) == ("error", "NotFound", -32602)
    assert error["error_code"] == "ERROR_CODE_INVALID_PARAMS"
    assert run.run_id in error["message"]


async def test_the_python_watcher_resumes_across_a_server_restart(tmp_path: Path) -> None:
    """watch-run.py reconnects with its last cursor (and the new host token) and sees the
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
            async with run_python(
                "watch-run.py",
                run.run_id,
                address=core.grpc_address,
                car_home=config.core.token_dir.parent,
            ) as watcher:
                assert (await watcher.expect("record"))["cursor"] == 1
                # The agent is still connected: its run stays open.
                await stopped(core.stop(grace=0))
                assert (await watcher.next_event())["event"] == "reconnecting"
                config = config.with_overrides(grpc_port=core.grpc_port)
                core = Core(config.core)
                await core.start()
                seen = len(watcher.events)
                events = (await watcher.finish(timeout=20))[seen:]
            await agent.close()
    finally:
        await stopped(core.stop(grace=0))
    assert [(e["event"], e.get("cursor"), e.get("kind")) for e in events] == [
        ("record", 2, "ended"),
        ("end", 2, None),
    ]
    assert events[0]["ended_status"] == "RUN_STATUS_INCOMPLETE"


# ------------------------------------------------------------------ tools


async def test_the_python_typed_tool_host_serves_websocket_and_grpc_proposals(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """serve-tools.py on ToolService.ServeTools (shared tools): a WebSocket client's
    proposal and an unbound typed one call its tools; a timed-out call is cancelled."""
    async with python(served, "serve-tools.py") as host:
        assert await host.expect("registered") == {
            "event": "registered",
            "host": "python-tools",
            "scope": "TOOL_SCOPE_SHARED",
            "tools": ["add", "divide", "wait"],
        }
        async with rpc(served.ws_url) as client:
            await client.login(served.token("auth-token"))
            add = {"id": "s", "type": "tool_call", "tool": "add", "parameters": {"a": 1, "b": 2}}
            divide = {
                "id": "d",
                "type": "tool_call",
                "tool": "divide",
                "parameters": {"a": 1, "b": 0},
                "failure_behavior": "skip",
            }
            proposal = {"proposal": {"actions": [add, divide]}}
            result = await client.result("proposal.submit", proposal)
        assert [(r["status"], r.get("output"), r.get("error")) for r in result["results"]] == [
            ("succeeded", 3, None),
            ("failed", None, "division by zero"),
        ]
        call = await host.expect("call")
        assert (call["tool"], call["parameters"], call["caller_role"]) == (
            "add",
            {"a": 1, "b": 2},
            "CALLER_ROLE_DAEMON",
        )

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


async def test_the_python_session_tool_host_answers_the_callbacks_of_its_proposal(
    served: Served,
) -> None:
    async with python(served, "tool-host.py") as host:
        registered, result = await host.finish(timeout=30)
    # The typed ListTools call, bound to the live session by car-session-id, saw the tools.
    assert registered == {"event": "registered", "count": 2, "tools": ["add", "divide"]}
    assert result == {
        "event": "result",
        "proposal_id": "python-proposal",
        "results": [
            {"action_id": "sum", "status": "ACTION_STATUS_SUCCEEDED", "output": 5, "error": None},
            # "$sum.output" was replaced by 5, so `half` ran after `sum`.
            {
                "action_id": "half",
                "status": "ACTION_STATUS_SUCCEEDED",
                "output": 2.5,
                "error": None,
            },
            # The tool answered ClientFrame.error; failure_behavior skip kept the others.
            {
                "action_id": "oops",
                "status": "ACTION_STATUS_FAILED",
                "output": None,
                "error": "division by zero",
            },
        ],
        "tool_calls": 3,
    }


# ------------------------------------------------------------------ TLS


async def test_a_python_example_reaches_a_tls_core_that_it_trusts(tmp_path: Path) -> None:
    """CAR_GRPC_CA: the examples speak TLS to a core with --grpc-tls-cert, trusting it."""
    certificate = _self_signed(tmp_path)
    config = make_config(tmp_path, grpc_tls_cert=certificate.cert, grpc_tls_key=certificate.key)
    core = Core(config.core)
    await core.start()
    try:
        home = config.core.token_dir.parent
        trusted = {"CAR_GRPC_CA": str(certificate.cert)}
        async with run_python(
            "tool-host.py", address=core.grpc_address, car_home=home, **trusted
        ) as host:
            registered, result = await host.finish(timeout=30)
        assert registered["tools"] == ["add", "divide"]
        assert result["tool_calls"] == 3
        # Without the trust, the same program cannot connect: no answer from the server.
        async with run_python("tool-host.py", address=core.grpc_address, car_home=home) as plain:
            error = await plain.next_event(timeout=20)
            assert await bounded(plain.proc.wait()) == 1
        assert (error["event"], error["code"], error["grpc_code"]) == ("error", 0, "Unavailable")
    finally:
        await stopped(core.stop(grace=0))
