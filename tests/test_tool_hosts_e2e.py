"""Tool hosts on the typed stream ToolService.ServeTools (tools.proto, "Tool hosts"), end
to end: a real core and gateway on loopback, a Python host on the generated stub, and
proposals submitted over the WebSocket (a `websockets` JSON-RPC client) and over typed
gRPC. Both scopes: shared tools (an unbound stream) and a session's own tools (a stream
bound with car-session-id)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.core.tools import HALTED
from car_grpc.gateway import Gateway
from car_grpc.v1 import options_pb2, session_pb2, tools_pb2, tools_pb2_grpc
from car_grpc.wire.codec import struct_to_json, value_to_json
from car_grpc.wire.errors import INVALID_PARAMS, CarError
from tests.conftest import make_config
from tests.runs_helpers import state_of
from tests.session_client import SessionClient, connect
from tests.test_proposals_e2e import submit_request
from tests.tool_host import ToolHost
from tests.tool_host_stream import HostToolError, StreamToolHost, bearer, serving
from tests.ws_helpers import Rpc, daemon_token, rpc, running, running_core

JSON = Any
SHARED, SESSION = tools_pb2.TOOL_SCOPE_SHARED, tools_pb2.TOOL_SCOPE_SESSION


# ------------------------------------------------------------------ helpers


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Core, Gateway]]:
    async with running(make_config(tmp_path)) as both:
        yield both


def call(id: str, tool: str, **extra: JSON) -> dict[str, JSON]:
    return {"id": id, "type": "tool_call", "tool": tool, **extra}


async def ws_submit(client: Rpc, actions: list[dict[str, JSON]], **extra: JSON) -> JSON:
    return await client.result(
        "proposal.submit", {"proposal": {"id": "p1", "actions": actions}, **extra}
    )


async def typed_submit(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], actions: list[dict[str, JSON]]
) -> tools_pb2.ProposalResult:
    stub = tools_pb2_grpc.ToolServiceStub(channel)
    reply = await stub.SubmitProposal(submit_request(actions), metadata=metadata, timeout=20)
    return reply.result


async def session_submit(
    client: SessionClient, actions: list[dict[str, JSON]]
) -> tools_pb2.ProposalResult:
    reply = await client.request("proposal_submit", submit_request(actions), timeout=20)
    result: tools_pb2.ProposalResult = reply.result
    return result


async def session_id_of(client: SessionClient) -> str:
    reply = await client.request("session_init", session_pb2.InitSessionRequest())
    return str(reply.session_id)


def outputs(result: tools_pb2.ProposalResult) -> dict[str, JSON]:
    return {r.action_id: value_to_json(r.output) for r in result.results}


async def add(call: tools_pb2.ToolCall) -> JSON:
    params = struct_to_json(call.parameters)
    return params["a"] + params["b"]


async def forever(call: tools_pb2.ToolCall) -> JSON:
    await asyncio.Event().wait()


async def registration_error(host: StreamToolHost) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await host.start()
    host.disconnect()
    return refused.value


# ------------------------------------------------------------------ shared tools


async def test_a_shared_host_serves_a_websocket_agents_proposal(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with (
        grpc.aio.insecure_channel(core.grpc_address) as channel,
        serving(channel, {"add": add}, metadata=bearer(daemon_token(core)), name="py-host") as host,
    ):
        token = await state_of(core).agent_tokens.add("ws-agent")
        async with rpc(gateway.url) as client:
            await client.result("session.auth", {"token": token, "agent_id": "ws-agent"})
            await client.result("server.handshake", {"protocol_version": 3, "client_version": "t"})
            result = await ws_submit(
                client,
                [
                    call("sum", "add", parameters={"a": 2, "b": 3}, timeout_ms=5000),
                    call("again", "add", parameters={"a": "$sum.output", "b": 10}),
                ],
                session_id="my-label",
            )
            assert [r["status"] for r in result["results"]] == ["succeeded"] * 2
            assert [r["output"] for r in result["results"]] == [5, 15]
            assert result["cost"]["tool_calls"] == 2
            # The WebSocket client was never called back: no tools.execute reached it.
            assert client.other == []
            # The shared tool is not one of the session's own tools.
            assert (await client.result("tools.list"))["tools"] == []
        first, second = host.calls
        assert (first.action_id, first.tool, first.attempt, first.timeout_ms) == (
            "sum",
            "add",
            1,
            5000,
        )
        assert struct_to_json(first.parameters) == {"a": 2, "b": 3}
        assert struct_to_json(second.parameters) == {"a": 5, "b": 10}
        assert not second.HasField("timeout_ms")
        assert first.request_id != second.request_id
        assert first.session_id == "my-label" and first.proposal_id == "p1"
        # Who asked, as the server authenticated it.
        assert first.caller.role == options_pb2.CALLER_ROLE_AGENT
        assert first.caller.agent_id == "ws-agent"


async def test_registration_says_the_scope_and_the_tools(
    core: Core, channel: grpc.aio.Channel
) -> None:
    host = StreamToolHost(channel, {"add": add, "sub": add}, metadata=bearer(daemon_token(core)))
    registered = await host.start()
    assert (registered.scope, list(registered.tools)) == (SHARED, ["add", "sub"])
    assert registered.host.startswith("tool-host-")
    await host.close()
    # Its tools are gone with its stream: a new host may take the names.
    async with serving(channel, {"add": add}, metadata=bearer(daemon_token(core)), name="b"):
        pass


async def test_an_unbound_typed_proposal_calls_shared_tools_only(
    core: Core, channel: grpc.aio.Channel
) -> None:
    daemon = bearer(daemon_token(core))
    async with serving(channel, {"add": add}, metadata=daemon) as host:
        # No car-session-id: a one-call session with no stream to call back on. Shared
        # tools need none.
        result = await typed_submit(
            channel, daemon, [call("sum", "add", parameters={"a": 1, "b": 2})]
        )
        assert outputs(result) == {"sum": 3}
        assert host.calls[0].caller.role == options_pb2.CALLER_ROLE_DAEMON
        # A tool nobody hosts cannot be called back: refused before anything runs.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await typed_submit(
                channel,
                daemon,
                [call("sum", "add", parameters={"a": 1, "b": 2}), call("x", "nobody")],
            )
        assert refused.value.code() == grpc.StatusCode.INTERNAL
        assert "car-session-id" in (refused.value.details() or "")
        assert "no tool host serves 'nobody'" in (refused.value.details() or "")
        assert len(host.calls) == 1


async def test_a_sessions_own_tool_wins_over_a_shared_one(
    core: Core, channel: grpc.aio.Channel
) -> None:
    token = daemon_token(core)
    async with serving(channel, {"echo": lambda c: _echo("shared", c)}, metadata=bearer(token)):
        mine = await connect(channel, token=token)
        other = await connect(channel, token=token)
        try:
            # `mine` registered an `echo` of its own: its calls go to its own client.
            await mine.request(
                "tools_register",
                tools_pb2.RegisterToolsRequest(tools=[tools_pb2.ToolDefinition(name="echo")]),
            )
            own = ToolHost(mine, lambda req: _answer("own"))
            assert outputs(await session_submit(mine, [call("e", "echo")])) == {"e": "own"}
            assert own.action_ids() == ["e"]
            # `other` did not: the shared host serves it, and `other` is never called back.
            assert outputs(await session_submit(other, [call("e", "echo")])) == {"e": "shared"}
            assert other.server_requests.empty()
            # Once `mine` unregisters its tool, the shared one serves it too.
            await mine.request("tools_unregister", tools_pb2.UnregisterToolRequest(name="echo"))
            assert outputs(await session_submit(mine, [call("e", "echo")])) == {"e": "shared"}
            assert own.action_ids() == ["e"]
            await own.close()
        finally:
            await mine.close()
            await other.close()


async def _echo(who: str, call: tools_pb2.ToolCall) -> JSON:
    return who


async def _answer(output: JSON) -> JSON:
    return output


# ------------------------------------------------------------------ session tools


async def test_a_bound_host_serves_its_sessions_tools_and_nobody_elses(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    token = daemon_token(core)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        owner = await connect(channel, token=token)
        stranger = await connect(channel, token=token)
        sid = await session_id_of(owner)
        definition = tools_pb2.ToolDefinition(name="secret", description="the owner's")
        host = StreamToolHost(
            channel,
            {"secret": lambda c: _answer("for the owner")},
            metadata=bearer(token, session_id=sid),
            scope=SESSION,
            definitions=[definition],
        )
        registered = await host.start()
        assert (registered.scope, list(registered.tools)) == (SESSION, ["secret"])
        try:
            # The owner's tools.list (on its stream, and typed, bound) shows the tool.
            listed = await owner.request("tools_list", tools_pb2.ListToolsRequest())
            assert [(t.name, t.description) for t in listed.tools] == [("secret", "the owner's")]
            stub = tools_pb2_grpc.ToolServiceStub(channel)
            typed = await stub.ListTools(
                tools_pb2.ListToolsRequest(), metadata=bearer(token, session_id=sid)
            )
            assert [t.name for t in typed.tools] == ["secret"]
            # The owner's proposal calls the host, not the owner's stream.
            result = await session_submit(owner, [call("s", "secret")])
            assert outputs(result) == {"s": "for the owner"}
            assert owner.server_requests.empty()
            assert host.calls[0].caller.role == options_pb2.CALLER_ROLE_DAEMON
            # Another session's proposal never reaches the host: `secret` is not its
            # tool, so it goes to that session's own client, as before.
            theirs = ToolHost(stranger, lambda req: _answer("the stranger's own"))
            result = await session_submit(stranger, [call("s", "secret")])
            assert outputs(result) == {"s": "the stranger's own"}
            assert theirs.action_ids() == ["s"]
            await theirs.close()
            # Nor does a WebSocket session's, nor an unbound typed call's (refused: no
            # stream to call back on, and no host serves `secret` for it).
            async with rpc(gateway.url) as ws:
                await ws.login(token)
                await ws.send(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "proposal.submit",
                        "params": {"proposal": {"actions": [call("s", "secret", timeout_ms=300)]}},
                    }
                )
                execute = await ws.recv()
                assert execute["method"] == "tools.execute"
                assert execute["params"]["tool"] == "secret"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await typed_submit(channel, bearer(token), [call("s", "secret")])
            assert "no tool host serves 'secret'" in (refused.value.details() or "")
            assert len(host.calls) == 1
            # The owner's client cannot register or remove the hosted name.
            with pytest.raises(CarError) as taken:
                await owner.request(
                    "tools_register", tools_pb2.RegisterToolsRequest(tools=[definition])
                )
            assert taken.value.code == INVALID_PARAMS
            assert "served by tool host" in taken.value.message
            with pytest.raises(CarError):
                await owner.request(
                    "tools_unregister", tools_pb2.UnregisterToolRequest(name="secret")
                )
        finally:
            await stranger.close()
        # When the owner's session ends, so does the host's stream, and its tools.
        await owner.close()
        assert await host.wait_ended() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has ended" in host.end_details
        await host.close()
        assert state_of(core).tool_hosts.hosts == set()


async def test_a_bound_hosts_tool_wins_over_a_shared_one(
    core: Core, channel: grpc.aio.Channel
) -> None:
    token = daemon_token(core)
    async with serving(channel, {"echo": lambda c: _echo("shared", c)}, metadata=bearer(token)):
        owner = await connect(channel, token=token)
        sid = await session_id_of(owner)
        bound = {"echo": lambda c: _echo("bound", c)}
        async with serving(channel, bound, metadata=bearer(token, session_id=sid)):
            assert outputs(await session_submit(owner, [call("e", "echo")])) == {"e": "bound"}
        # The bound host has gone (its stream ended cleanly, its tools first): the shared
        # one serves the name again.
        assert outputs(await session_submit(owner, [call("e", "echo")])) == {"e": "shared"}
        await owner.close()


async def test_a_host_bound_to_a_websocket_session_serves_its_proposals(
    served: tuple[Core, Gateway],
) -> None:
    """The session a host binds to may be a WebSocket client's: the same session id and
    token that session.auth answered it with."""
    core, gateway = served
    token = daemon_token(core)
    async with rpc(gateway.url) as client, grpc.aio.insecure_channel(core.grpc_address) as ch:
        sid = (await client.login(token))["session_id"]
        bound = bearer(token, session_id=sid)
        async with serving(ch, {"add": add}, metadata=bound, name="ws-own") as host:
            listed = await client.result("tools.list")
            assert [t["name"] for t in listed["tools"]] == ["add"]
            result = await ws_submit(client, [call("s", "add", parameters={"a": 20, "b": 22})])
            assert result["results"][0]["output"] == 42
            assert client.other == []
            assert host.calls[0].caller.role == options_pb2.CALLER_ROLE_DAEMON


# ------------------------------------------------------------------ names and registration


async def test_a_name_is_served_by_one_host_at_a_time(
    core: Core, channel: grpc.aio.Channel
) -> None:
    token = daemon_token(core)
    async with serving(channel, {"add": add}, metadata=bearer(token), name="first"):
        second = StreamToolHost(channel, {"mul": add, "add": add}, metadata=bearer(token))
        error = await registration_error(second)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error.details() == "tool 'add' is served by tool host 'first'"
        # Nothing of the refused host was registered.
        assert set(state_of(core).tool_hosts.shared) == {"add"}

        # Session tools: a name the session's client registered, or another bound host
        # serves, is taken too.
        owner = await connect(channel, token=token)
        sid = await session_id_of(owner)
        await owner.request(
            "tools_register",
            tools_pb2.RegisterToolsRequest(tools=[tools_pb2.ToolDefinition(name="mine")]),
        )
        bound = bearer(token, session_id=sid)
        error = await registration_error(StreamToolHost(channel, {"mine": add}, metadata=bound))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error.details() == "tool 'mine' is registered by this session's client"
        async with serving(channel, {"add": add}, metadata=bound, name="b1"):
            # A shared name may also be a session's tool: the scopes are apart.
            error = await registration_error(StreamToolHost(channel, {"add": add}, metadata=bound))
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert error.details() == "tool 'add' of this session is served by tool host 'b1'"
        await owner.close()


@pytest.mark.parametrize(
    ("register", "details"),
    [
        (tools_pb2.RegisterToolHost(), "register needs at least one tool"),
        (
            tools_pb2.RegisterToolHost(
                tools=[tools_pb2.ToolDefinition(name="a"), tools_pb2.ToolDefinition(name="a")]
            ),
            "duplicate tool 'a': tools[1].name",
        ),
        (
            tools_pb2.RegisterToolHost(tools=[tools_pb2.ToolDefinition(name="x" * 129)]),
            "a tool name has 1 to 128 characters: tools[0].name",
        ),
        (
            tools_pb2.RegisterToolHost(tools=[tools_pb2.ToolDefinition(name="a")], scope=SESSION),
            "scope session needs a stream bound with car-session-id",
        ),
    ],
)
async def test_bad_registrations_are_refused(
    core: Core, channel: grpc.aio.Channel, register: tools_pb2.RegisterToolHost, details: str
) -> None:
    stream: Any = tools_pb2_grpc.ToolServiceStub(channel).ServeTools(
        metadata=bearer(daemon_token(core))
    )
    await stream.write(tools_pb2.ServeToolsRequest(register=register))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(stream.read(), 5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in (refused.value.details() or "")
    assert state_of(core).tool_hosts.hosts == set()


async def test_the_first_message_must_be_register_and_only_once(
    core: Core, channel: grpc.aio.Channel
) -> None:
    stream: Any = tools_pb2_grpc.ToolServiceStub(channel).ServeTools(
        metadata=bearer(daemon_token(core))
    )
    await stream.write(tools_pb2.ServeToolsRequest(result=tools_pb2.ToolResult(request_id="tc-1")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(stream.read(), 5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "the first message must be `register`"

    host = StreamToolHost(channel, {"add": add}, metadata=bearer(daemon_token(core)))
    await host.start()
    await host.send(tools_pb2.ServeToolsRequest(register=host.register))
    assert await host.wait_ended() == grpc.StatusCode.INVALID_ARGUMENT
    assert host.end_details == "register may be sent only once"
    await host.close()
    assert state_of(core).tool_hosts.shared == {}


# ------------------------------------------------------------------ calls: deadlines, errors


async def test_an_action_timeout_cancels_the_call_at_the_host(
    core: Core, channel: grpc.aio.Channel
) -> None:
    token = daemon_token(core)
    release = asyncio.Event()

    async def slow(call: tools_pb2.ToolCall) -> JSON:
        if struct_to_json(call.parameters).get("wait"):
            await release.wait()
        return "done"

    async with serving(channel, {"slow": slow}, metadata=bearer(token), name="h") as host:
        result = await typed_submit(
            channel, bearer(token), [call("s", "slow", parameters={"wait": True}, timeout_ms=200)]
        )
        failed = result.results[0]
        assert failed.status == tools_pb2.ACTION_STATUS_FAILED
        assert failed.error == "tool 'slow' callback timed out (0.2s)"
        (cancel,) = await host.wait_for_cancels(1)
        assert (cancel.request_id, cancel.action_id, cancel.reason) == (
            host.calls[0].request_id,
            "s",
            "timeout",
        )
        # A late answer is ignored, and the host goes on serving.
        await host.answer(host.calls[0].request_id, "too late")
        result = await typed_submit(channel, bearer(token), [call("t", "slow")])
        assert outputs(result) == {"t": "done"}


async def test_an_aborted_proposal_cancels_its_other_calls(
    core: Core, channel: grpc.aio.Channel
) -> None:
    token = daemon_token(core)
    started = asyncio.Event()

    async def hang(call: tools_pb2.ToolCall) -> JSON:
        started.set()
        await asyncio.Event().wait()

    async def boom(call: tools_pb2.ToolCall) -> JSON:
        await asyncio.wait_for(started.wait(), 5)
        raise HostToolError("kaboom")

    async with serving(channel, {"hang": hang, "boom": boom}, metadata=bearer(token)) as host:
        result = await typed_submit(channel, bearer(token), [call("h", "hang"), call("b", "boom")])
        statuses = {r.action_id: (r.status, r.error) for r in result.results}
        assert statuses["b"] == (tools_pb2.ACTION_STATUS_FAILED, "kaboom")
        assert statuses["h"][0] == tools_pb2.ACTION_STATUS_SKIPPED
        (cancel,) = await host.wait_for_cancels(1)
        assert (cancel.action_id, cancel.reason) == ("h", "proposal aborted")


async def test_a_client_that_leaves_mid_proposal_cancels_the_hosts_call(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    token = daemon_token(core)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:  # noqa: SIM117
        async with serving(channel, {"stuck": forever}, metadata=bearer(token)) as host:
            async with rpc(gateway.url) as client:
                await client.login(token)
                await client.send(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "proposal.submit",
                        "params": {"proposal": {"actions": [call("s", "stuck")]}},
                    }
                )
                await host.wait_for_calls(1)
            # The WebSocket closed: its session ended and the proposal with it.
            (cancel,) = await host.wait_for_cancels(1)
            assert (cancel.request_id, cancel.action_id, cancel.reason) == (
                host.calls[0].request_id,
                "s",
                "proposal cancelled",
            )


async def test_a_failed_call_is_retried_as_a_new_call(
    core: Core, channel: grpc.aio.Channel
) -> None:
    async def flaky(call: tools_pb2.ToolCall) -> JSON:
        if call.attempt < 3:
            raise HostToolError(f"attempt {call.attempt} failed")
        return "third time"

    token = daemon_token(core)
    async with serving(channel, {"flaky": flaky}, metadata=bearer(token)) as host:
        result = await typed_submit(
            channel,
            bearer(token),
            [call("f", "flaky", failure_behavior="retry", max_retries=2)],
        )
        assert outputs(result) == {"f": "third time"}
        assert result.cost.retries == 2 and result.cost.tool_calls == 3
        assert [c.attempt for c in host.calls] == [1, 2, 3]
        assert len({c.request_id for c in host.calls}) == 3


async def test_a_terminal_error_halts_the_submitting_session_only(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    token = daemon_token(core)

    async def fatal(call: tools_pb2.ToolCall) -> JSON:
        raise HostToolError("disk is gone", terminal=True)

    tools = {"fatal": fatal, "add": add}
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:  # noqa: SIM117
        async with serving(channel, tools, metadata=bearer(token)) as host:
            async with rpc(gateway.url) as halted, rpc(gateway.url) as bystander:
                await halted.login(token)
                await bystander.login(token)
                result = await ws_submit(
                    halted,
                    [
                        call("f", "fatal", failure_behavior="retry", max_retries=3),
                        call("after", "add", parameters={"a": 1, "b": 1}, dependencies=["f"]),
                    ],
                )
                first, after = result["results"]
                assert (first["status"], first["error"], first["terminal"]) == (
                    "failed",
                    "disk is gone",
                    True,
                )
                assert after["status"] == "skipped"
                assert [c.tool for c in host.calls] == ["fatal"]  # terminal: no retry
                # The submitting session is halted: nothing runs until clear_halt.
                again = await ws_submit(halted, [call("a", "add", parameters={"a": 1, "b": 2})])
                assert again["results"][0]["status"] == "skipped"
                assert again["results"][0]["error"] == HALTED
                assert len(host.calls) == 1
                # Other sessions are not.
                other = await ws_submit(bystander, [call("a", "add", parameters={"a": 1, "b": 2})])
                assert other["results"][0]["output"] == 3
                assert await halted.result("session.clear_halt") == {"cleared": True}
                again = await ws_submit(halted, [call("a", "add", parameters={"a": 2, "b": 2})])
                assert again["results"][0]["output"] == 4


async def test_a_host_that_disconnects_mid_call_fails_the_action_at_once(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    token = daemon_token(core)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        host = StreamToolHost(channel, {"stuck": forever}, metadata=bearer(token), name="crashy")
        await host.start()
        async with rpc(gateway.url) as client:
            await client.login(token)
            submitted = asyncio.create_task(
                ws_submit(client, [call("s", "stuck", timeout_ms=60_000)])
            )
            await host.wait_for_calls(1)
            began = time.monotonic()
            host.disconnect()
            result = await asyncio.wait_for(submitted, 5)
            assert time.monotonic() - began < 2  # not the action's 60 s
            failed = result["results"][0]
            assert (failed["status"], failed["error"]) == (
                "failed",
                "tool host 'crashy' disconnected",
            )
            # Its tools went with it.
            assert state_of(core).tool_hosts.shared == {}
        await host.close()


# ------------------------------------------------------------------ bounds


@contextlib.asynccontextmanager
async def core_with(tmp_path: Path, **overrides: object) -> AsyncIterator[Core]:
    """A core with these config overrides."""
    async with running_core(make_config(tmp_path, **overrides).core) as core:
        yield core


def skip(id: str, tool: str, **extra: JSON) -> dict[str, JSON]:
    return call(id, tool, failure_behavior="skip", **extra)


async def test_calls_pending_at_a_host_are_bounded_in_number(tmp_path: Path) -> None:
    async with core_with(tmp_path, tool_host_max_pending=2) as bounded:
        token = daemon_token(bounded)
        async with (
            grpc.aio.insecure_channel(bounded.grpc_address) as channel,
            serving(channel, {"stuck": forever}, metadata=bearer(token), name="h") as host,
        ):
            actions = [skip(f"c{i}", "stuck", timeout_ms=1000) for i in range(3)]
            result = await typed_submit(channel, bearer(token), actions)
            errors = sorted(r.error for r in result.results)
            # Two calls were sent (and timed out); the third failed at once.
            assert errors == [
                "tool 'stuck' callback timed out (1s)",
                "tool 'stuck' callback timed out (1s)",
                "tool host 'h' has 2 calls pending: tool_host_max_pending (2)",
            ]
            assert len(await host.wait_for_cancels(2)) == 2
            assert len(host.calls) == 2


async def test_calls_pending_at_a_host_are_bounded_in_bytes(tmp_path: Path) -> None:
    async with core_with(tmp_path, tool_host_max_pending_bytes=4096) as bounded:
        token = daemon_token(bounded)
        async with (
            grpc.aio.insecure_channel(bounded.grpc_address) as channel,
            serving(channel, {"stuck": forever}, metadata=bearer(token), name="h") as host,
        ):
            # One call larger than the bound passes when nothing is pending; a second one
            # while it waits does not (whichever of the two came second).
            actions = [
                skip("big", "stuck", parameters={"blob": "x" * 8192}, timeout_ms=1000),
                skip("small", "stuck", timeout_ms=1000),
            ]
            result = await typed_submit(channel, bearer(token), actions)
            errors = sorted(r.error for r in result.results)
            assert errors[0] == "tool 'stuck' callback timed out (1s)"
            assert errors[1].startswith("tool host 'h' has ")
            assert errors[1].endswith(" bytes of calls pending: tool_host_max_pending_bytes (4096)")
            assert len(host.calls) == 1


async def test_tools_per_host_and_hosts_are_bounded(tmp_path: Path) -> None:
    async with core_with(tmp_path, tool_host_max_tools=2, tool_hosts_max=1) as bounded:
        token = daemon_token(bounded)
        async with grpc.aio.insecure_channel(bounded.grpc_address) as channel:
            three = {"a": add, "b": add, "c": add}
            error = await registration_error(StreamToolHost(channel, three, metadata=bearer(token)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 2 tools (tool_host_max_tools), got 3" in (error.details() or "")
            async with serving(channel, {"a": add, "b": add}, metadata=bearer(token)):
                error = await registration_error(
                    StreamToolHost(channel, {"c": add}, metadata=bearer(token))
                )
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error.details() == "too many tool hosts: at most 1 (tool_hosts_max)"
            # Once the first has gone, there is room again.
            for _ in range(100):
                if not state_of(bounded).tool_hosts.hosts:
                    break
                await asyncio.sleep(0.02)
            async with serving(channel, {"c": add}, metadata=bearer(token)):
                pass


async def test_a_host_must_register_in_time(tmp_path: Path) -> None:
    async with (
        core_with(tmp_path, tool_host_register_timeout=0.3) as bounded,
        grpc.aio.insecure_channel(bounded.grpc_address) as channel,
    ):
        stream: Any = tools_pb2_grpc.ToolServiceStub(channel).ServeTools(
            metadata=bearer(daemon_token(bounded))
        )
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(stream.read(), 5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "register within 0.3s of connecting"
        assert time.monotonic() - began < 3


async def test_a_host_that_stops_reading_is_dropped_and_its_calls_fail(tmp_path: Path) -> None:
    async with core_with(
        tmp_path, tool_host_stall_timeout=0.3, tool_host_max_pending_bytes=64 * 1024 * 1024
    ) as bounded:
        token = daemon_token(bounded)
        async with grpc.aio.insecure_channel(bounded.grpc_address) as channel:
            host = StreamToolHost(channel, {"stuck": forever}, metadata=bearer(token), name="h")
            await host.start()
            host.pause_reading()
            blob = "x" * (512 * 1024)
            # Far more than the transport buffers: a write to the host blocks.
            actions = [
                skip(f"c{i}", "stuck", parameters={"blob": blob}, timeout_ms=30_000)
                for i in range(48)
            ]
            began = time.monotonic()
            result = await typed_submit(channel, bearer(token), actions)
            assert time.monotonic() - began < 10  # not the actions' 30 s
            errors = {r.error for r in result.results}
            assert errors == {"tool host 'h' not reading: a message waited 0.3s"}
            assert state_of(bounded).tool_hosts.hosts == set()
            # Once it reads again, its call has ended with an error status.
            host.resume_reading()
            assert await host.wait_ended() not in (None, grpc.StatusCode.OK)
            await host.close()
