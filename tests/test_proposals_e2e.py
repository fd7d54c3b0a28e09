"""End-to-end: proposal.submit on a real core, tool calls answered by the test client over
the Connect stream (tools.execute / tools.cancel), as docs/protocol.md §3 describes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.core.tools import HALTED
from car_grpc.v1 import session_pb2, state_pb2, tools_pb2
from car_grpc.wire.codec import json_to_message, struct_to_json, to_value, value_to_json
from car_grpc.wire.errors import DEADLINE_EXCEEDED, INVALID_PARAMS, CarError
from tests.conftest import make_config
from tests.session_client import SessionClient, connect
from tests.tool_host import ToolHost, terminal_error
from tests.ws_helpers import daemon_token, running_core

Status = tools_pb2.ActionStatus
JSON = Any


def submit_request(
    actions: list[dict[str, JSON]], **extra: JSON
) -> tools_pb2.SubmitProposalRequest:
    req = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": {"id": "p1", "actions": actions}, **extra}, req)
    return req


async def submit(
    client: SessionClient, actions: list[dict[str, JSON]], **extra: JSON
) -> tools_pb2.ProposalResult:
    reply = await client.request("proposal_submit", submit_request(actions, **extra))
    result: tools_pb2.ProposalResult = reply.result
    return result


def by_id(result: tools_pb2.ProposalResult) -> dict[str, tools_pb2.ActionResult]:
    return {r.action_id: r for r in result.results}


def call(id: str, tool: str, **extra: JSON) -> dict[str, JSON]:
    return {"id": id, "type": "tool_call", "tool": tool, **extra}


async def state_get(client: SessionClient, key: str) -> JSON:
    reply = await client.request("state_get", state_pb2.GetStateRequest(key=key))
    return value_to_json(reply.value)


async def next_cancel(client: SessionClient) -> tools_pb2.CancelToolNotice:
    frame = await client.next_notification()
    assert frame.WhichOneof("body") == "tools_cancel", frame
    return frame.tools_cancel


def no_tool_calls(client: SessionClient) -> bool:
    """Nothing was dispatched: a tools.execute would precede the response on the stream."""
    return client.server_requests.empty()


async def test_dag_of_tool_calls(client: SessionClient) -> None:
    first_two = asyncio.Event()

    async def tool(req: tools_pb2.ExecuteToolRequest) -> JSON:
        params = struct_to_json(req.parameters)
        if req.action_id in ("a", "d"):
            # Answer neither until both arrived: they run concurrently.
            if {"a", "d"} <= set(host.action_ids()):
                first_two.set()
            await asyncio.wait_for(first_two.wait(), 5)
        if req.tool == "add":
            return params["x"] + params["y"]
        return {"echo": params}

    host = ToolHost(client, tool)
    result = await submit(
        client,
        [
            call("a", "add", parameters={"x": 1, "y": 2}, timeout_ms=5000),
            call("b", "add", parameters={"x": "$a.output", "y": 10}),
            call("c", "echo", parameters={"from_b": "$b.output"}, dependencies=["b"]),
            {
                "id": "w",
                "type": "state_write",
                "parameters": {"key": "total", "value": "$b.output"},
            },
            call("e", "echo", parameters={}, state_dependencies=["total"]),
            call("d", "echo", parameters={"n": 1}),
        ],
        session_id="label-1",
    )
    assert result.proposal_id == "p1"
    assert [r.status for r in result.results] == [Status.ACTION_STATUS_SUCCEEDED] * 6
    outputs = {r.action_id: value_to_json(r.output) for r in result.results}
    assert outputs["a"] == 3 and outputs["b"] == 13
    assert outputs["c"] == {"echo": {"from_b": 13}}
    order = host.action_ids()
    assert order.index("b") > order.index("a")
    assert order.index("c") > order.index("b")
    assert order.index("e") > order.index("b")  # after w, which waited for b
    assert await state_get(client, "total") == 13
    assert result.cost.tool_calls == 5
    assert result.cost.actions_executed == 6

    # The exact tools.execute fields of docs/protocol.md §3.
    frame_id, first = host.requests[order.index("a")]
    assert first.request_id == frame_id and frame_id.startswith("cb-")
    assert (first.action_id, first.tool, first.attempt, first.timeout_ms) == ("a", "add", 1, 5000)
    assert struct_to_json(first.parameters) == {"x": 1, "y": 2}
    assert first.session_id == "label-1"
    _, b = host.requests[order.index("b")]
    assert not b.HasField("timeout_ms")
    assert len({fid for fid, _ in host.requests}) == 5  # a fresh cb-N per call
    await host.close()


async def test_timeout_sends_cancel_and_fails(client: SessionClient) -> None:
    release = asyncio.Event()

    async def slow(req: tools_pb2.ExecuteToolRequest) -> JSON:
        await release.wait()
        return "too late"

    host = ToolHost(client, slow)
    result = await submit(client, [call("s", "slow", timeout_ms=100)])
    assert result.results[0].status == Status.ACTION_STATUS_FAILED
    assert result.results[0].error == "tool 'slow' callback timed out (0.1s)"
    cancel = await next_cancel(client)
    frame_id, _ = host.requests[0]
    assert (cancel.request_id, cancel.action_id, cancel.reason) == (frame_id, "s", "timeout")
    # The late answer is ignored and the session carries on.
    release.set()
    await client.request("state_set", state_pb2.SetStateRequest(key="k", value=to_value(1)))
    assert await state_get(client, "k") == 1
    await host.close()


async def test_server_backstop_without_timeout_ms(tmp_path: Path) -> None:
    async with (
        running_core(make_config(tmp_path, tool_timeout=0.2).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        client = await connect(channel, token=daemon_token(core))
        host = ToolHost(client, lambda req: asyncio.Event().wait())
        result = await submit(client, [call("s", "never")])
        assert result.results[0].error == "tool 'never' callback timed out (0.2s)"
        cancel = await next_cancel(client)
        assert (cancel.action_id, cancel.reason) == ("s", "timeout")
        await host.close()
        await client.close()


async def test_abort_rolls_back_state(client: SessionClient) -> None:
    async def tool(req: tools_pb2.ExecuteToolRequest) -> JSON:
        if req.tool == "fail":
            raise CarError(-32000, "Python tool callback raised: ValueError: kaboom")
        return "ok"

    host = ToolHost(client, tool)
    await client.request("state_set", state_pb2.SetStateRequest(key="k", value=to_value("old")))
    result = await submit(
        client,
        [
            {"id": "w", "type": "state_write", "parameters": {"key": "k", "value": "new"}},
            {"id": "w2", "type": "state_write", "parameters": {"key": "fresh", "value": 1}},
            call("ok", "fine", dependencies=["w"]),
            call("boom", "fail", dependencies=["ok", "w2"]),
            call("never", "fine", dependencies=["boom"]),
        ],
    )
    results = by_id(result)
    assert results["boom"].status == Status.ACTION_STATUS_FAILED
    assert results["boom"].error == "Python tool callback raised: ValueError: kaboom"
    assert results["never"].status == Status.ACTION_STATUS_SKIPPED
    for done in ("w", "w2", "ok"):
        assert results[done].status == Status.ACTION_STATUS_SUCCEEDED
        assert results[done].rolled_back
    assert struct_to_json(results["w"].state_changes) == {"k": "new"}
    assert await state_get(client, "k") == "old"
    keys = await client.request("state_keys", state_pb2.ListStateKeysRequest())
    assert list(keys.keys) == ["k"]
    assert "never" not in host.action_ids()
    await host.close()


async def test_abort_cancels_in_flight_siblings(client: SessionClient) -> None:
    async def tool(req: tools_pb2.ExecuteToolRequest) -> JSON:
        if req.tool == "fail":
            await host.wait_for_requests(2)  # the sibling is in flight
            raise CarError(-32000, "broken")
        await asyncio.Event().wait()

    host = ToolHost(client, tool)
    result = await submit(client, [call("slow", "hang"), call("boom", "fail")])
    results = by_id(result)
    assert results["slow"].status == Status.ACTION_STATUS_SKIPPED
    assert results["slow"].error == "cancelled: proposal aborted"
    cancel = await next_cancel(client)
    assert (cancel.action_id, cancel.reason) == ("slow", "proposal aborted")
    await host.close()


async def test_retry_then_success(client: SessionClient) -> None:
    async def flaky(req: tools_pb2.ExecuteToolRequest) -> JSON:
        if req.attempt == 1:
            raise CarError(-32000, "transient")
        return f"attempt {req.attempt}"

    host = ToolHost(client, flaky)
    result = await submit(client, [call("r", "flaky", failure_behavior="retry", max_retries=2)])
    assert result.results[0].status == Status.ACTION_STATUS_SUCCEEDED
    assert value_to_json(result.results[0].output) == "attempt 2"
    assert [r.attempt for _, r in host.requests] == [1, 2]
    assert host.requests[0][0] != host.requests[1][0]
    assert (result.cost.retries, result.cost.tool_calls) == (1, 2)
    await host.close()


async def test_policy_denial_rejects_without_dispatch(client: SessionClient) -> None:
    host = ToolHost(client, lambda req: asyncio.sleep(0, "ran"))
    policy = state_pb2.RegisterPolicyRequest()
    json_to_message({"name": "no-rm", "rule": "deny_tool", "target": "rm"}, policy)
    await client.request("policy_register", policy)
    result = await submit(client, [call("x", "rm", parameters={"path": "/"})])
    assert result.results[0].status == Status.ACTION_STATUS_REJECTED
    assert "no-rm" in result.results[0].error
    assert result.cost.actions_rejected == 1 and result.cost.tool_calls == 0
    assert host.requests == []
    await host.close()


async def test_terminal_error_halts_until_clear_halt(client: SessionClient) -> None:
    async def tool(req: tools_pb2.ExecuteToolRequest) -> JSON:
        if req.tool == "fatal":
            raise terminal_error("Python tool callback raised: TerminalToolError: disk gone")
        return "ok"

    host = ToolHost(client, tool)
    result = await submit(
        client,
        [call("f", "fatal", failure_behavior="retry"), call("n", "fine", dependencies=["f"])],
    )
    results = by_id(result)
    assert results["f"].status == Status.ACTION_STATUS_FAILED and results["f"].terminal
    assert results["n"].status == Status.ACTION_STATUS_SKIPPED
    assert len(host.requests) == 1  # terminal: no retry

    halted = await submit(client, [call("a", "fine"), call("b", "fine")])
    assert [(r.status, r.error) for r in halted.results] == [
        (Status.ACTION_STATUS_SKIPPED, HALTED)
    ] * 2
    assert len(host.requests) == 1

    cleared = await client.request("session_clear_halt", session_pb2.ClearHaltRequest())
    assert cleared.cleared
    again = await client.request("session_clear_halt", session_pb2.ClearHaltRequest())
    assert not again.cleared
    ok = await submit(client, [call("a", "fine")])
    assert ok.results[0].status == Status.ACTION_STATUS_SUCCEEDED
    await host.close()


async def test_halt_ends_with_the_session(core: Core, channel: grpc.aio.Channel) -> None:
    client = await connect(channel, token=daemon_token(core))
    host = ToolHost(client, lambda req: _raise(terminal_error("gone")))
    result = await submit(client, [call("f", "fatal")])
    assert result.results[0].terminal
    await host.close()
    await client.close()
    # Reconnecting is a new session, not halted.
    client = await connect(channel, token=daemon_token(core))
    host = ToolHost(client, lambda req: asyncio.sleep(0, "ok"))
    result = await submit(client, [call("a", "fine")])
    assert result.results[0].status == Status.ACTION_STATUS_SUCCEEDED
    await host.close()
    await client.close()


async def _raise(error: Exception) -> JSON:
    raise error


async def test_bad_proposals_name_the_field_and_run_nothing(client: SessionClient) -> None:
    with pytest.raises(CarError) as err:
        await client.request("proposal_submit", tools_pb2.SubmitProposalRequest())
    assert (err.value.code, err.value.message) == (
        INVALID_PARAMS,
        "invalid params: missing field: proposal",
    )
    cases = [
        ([call("a", "t", parameters={"p": "$zz.output"})], "proposal.actions[0].parameters.p"),
        (
            [call("a", "t", dependencies=["b"]), call("b", "t", dependencies=["a"])],
            "proposal.actions",
        ),
        (
            [{"id": "w", "type": "state_write", "parameters": {"value": 1}}],
            "proposal.actions[0].parameters.key",
        ),
        ([{"id": "a", "type": "tool_call"}], "proposal.actions[0].tool"),
    ]
    for actions, field in cases:
        with pytest.raises(CarError) as err:
            await submit(
                client,
                [
                    {"id": "w0", "type": "state_write", "parameters": {"key": "x", "value": 1}},
                    *actions,
                ],
            )
        assert err.value.code == INVALID_PARAMS
        assert err.value.message.endswith(field.replace("[0]", "[1]"))
    assert no_tool_calls(client)
    keys = await client.request("state_keys", state_pb2.ListStateKeysRequest())
    assert list(keys.keys) == []  # not even the valid state_write ran


async def test_concurrent_proposals_on_several_sessions(
    core: Core, channel: grpc.aio.Channel
) -> None:
    clients = [await connect(channel, token=daemon_token(core)) for _ in range(4)]
    hosts = []
    for n, c in enumerate(clients):

        async def tool(req: tools_pb2.ExecuteToolRequest, n: int = n) -> JSON:
            await asyncio.sleep(0.01)
            return {"session": n, "got": struct_to_json(req.parameters)["v"]}

        hosts.append(ToolHost(c, tool))

    async def one(n: int, c: SessionClient) -> tools_pb2.ProposalResult:
        return await submit(
            c,
            [
                call("t1", "tag", parameters={"v": n}),
                call("t2", "tag", parameters={"v": "$t1.output"}),
                {
                    "id": "w",
                    "type": "state_write",
                    "parameters": {"key": "mine", "value": "$t2.output"},
                },
            ],
        )

    results = await asyncio.gather(*(one(n, c) for n, c in enumerate(clients)))
    for n, (c, h, result) in enumerate(zip(clients, hosts, results, strict=True)):
        assert [r.status for r in result.results] == [Status.ACTION_STATUS_SUCCEEDED] * 3
        expected = {"session": n, "got": {"session": n, "got": n}}
        assert await state_get(c, "mine") == expected
        assert h.action_ids() == ["t1", "t2"]  # only its own callbacks
    for c, h in zip(clients, hosts, strict=True):
        await h.close()
        await c.close()


async def test_handler_deadline_cancels_tool_calls(tmp_path: Path) -> None:
    async with (
        running_core(make_config(tmp_path, handler_timeout=0.3).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        client = await connect(channel, token=daemon_token(core))
        host = ToolHost(client, lambda req: asyncio.Event().wait())
        with pytest.raises(CarError) as err:
            await submit(client, [call("s", "never")])
        assert err.value.code == DEADLINE_EXCEEDED
        assert "proposal.submit" in err.value.message
        cancel = await next_cancel(client)
        assert (cancel.action_id, cancel.reason) == ("s", "proposal cancelled")
        assert cancel.request_id == host.requests[0][0]
        await host.close()
        await client.close()
