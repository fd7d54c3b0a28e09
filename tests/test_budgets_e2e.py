"""End-to-end: the per-session budgets of docs/protocol.md §1 over the real gateway and core,
with a real WebSocket client (and, for the core's outbound queue, a real gRPC client
that stops reading).

State: 1 MiB per value, a total in bytes and a number of keys per session; over a
budget the request fails with -32602 naming the limit and nothing is stored; replacing a
key counts its new size minus the old; a proposal's state_write obeys the same budget
(the action fails). A value's size is the serialized size of its google.protobuf.Value;
an entry counts its key's bytes too. Pending server-initiated calls are bounded per
session. The core's outbound queue is bounded in bytes as well as in frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.metrics import OK
from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2, state_pb2, tools_pb2
from car_grpc.wire.codec import to_value
from car_grpc.wire.errors import INVALID_PARAMS
from tests.bounded import stopped
from tests.conftest import make_config
from tests.session_client import connect
from tests.ws_helpers import Rpc, daemon_token, rpc, running

MiB = 1024 * 1024


def sized(size: int) -> str:
    """A string whose google.protobuf.Value is exactly `size` bytes (tag, length, text)."""
    for length_bytes in range(1, 5):
        text = "x" * (size - 1 - length_bytes)
        if to_value(text).ByteSize() == size:
            return text
    raise AssertionError(size)


@pytest.fixture
async def client_of(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await client_of(**config)`: a logged-in WS client of a gateway + core with those
    Config fields."""
    stack: list[Any] = []

    async def open_client(**overrides: Any) -> Rpc:
        served = running(make_config(tmp_path, **overrides))
        core, gateway = await served.__aenter__()
        stack.append(served)
        client_cm = rpc(gateway.url, max_size=None)
        client = await client_cm.__aenter__()
        stack.append(client_cm)
        await client.login(daemon_token(core))
        return client

    yield open_client
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)


async def refused(client: Rpc, method: str, params: Any) -> str:
    answer = await client.call(method, params)
    assert "error" in answer, answer
    assert answer["error"]["code"] == INVALID_PARAMS, answer
    message: str = answer["error"]["message"]
    return message


async def keys(client: Rpc) -> list[str]:
    result: list[str] = await client.result("state.keys", {})  # a bare array
    return result


# ------------------------------------------------------------------ state.set


async def test_a_value_over_1_mib_is_refused_and_not_stored(
    client_of: Callable[..., Any],
) -> None:
    client = await client_of()  # the defaults
    assert Config().core.state_value_max_bytes == MiB
    await client.result("state.set", {"key": "k", "value": sized(MiB)})
    message = await refused(client, "state.set", {"key": "big", "value": sized(MiB + 1)})
    assert "state_value_max_bytes (1048576)" in message and f"{MiB + 1} bytes" in message
    assert await keys(client) == ["k"]
    assert await client.result("state.exists", {"key": "big"}) is False
    # A refused replacement leaves the old value.
    await refused(client, "state.set", {"key": "k", "value": [sized(MiB)]})
    assert len(await client.result("state.get", {"key": "k"})) == len(sized(MiB))


async def test_total_bytes_count_a_replacement_as_new_minus_old(
    client_of: Callable[..., Any],
) -> None:
    client = await client_of(state_max_bytes=10_000)
    # An entry is its key's bytes plus its value's.
    await client.result("state.set", {"key": "a", "value": sized(6000)})  # 6001
    # Replaced, not added: 9001 (counted on top of the old one it would be 15002).
    await client.result("state.set", {"key": "a", "value": sized(9000)})
    message = await refused(client, "state.set", {"key": "b", "value": sized(1000)})
    assert "10002 bytes > state_max_bytes (10000)" in message, message
    assert await keys(client) == ["a"]
    await client.result("state.set", {"key": "b", "value": sized(998)})  # exactly 10000
    await refused(client, "state.set", {"key": "b", "value": sized(999)})
    assert len(await client.result("state.get", {"key": "b"})) == len(sized(998))
    # Shrinking one entry makes room for another.
    await client.result("state.set", {"key": "a", "value": 1})
    await client.result("state.set", {"key": "c", "value": sized(8000)})
    assert await keys(client) == ["a", "b", "c"]


async def test_key_count(client_of: Callable[..., Any]) -> None:
    client = await client_of(state_max_keys=3)
    for key in ("k1", "k2", "k3"):
        await client.result("state.set", {"key": key, "value": key})
    message = await refused(client, "state.set", {"key": "k4", "value": 1})
    assert "4 keys > state_max_keys (3)" in message, message
    await client.result("state.set", {"key": "k1", "value": "again"})  # no new key
    assert await keys(client) == ["k1", "k2", "k3"]
    assert await client.result("state.exists", {"key": "k4"}) is False


# ------------------------------------------------------------------ proposals


def write(action_id: str, key: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {
        "id": action_id,
        "type": "state_write",
        "parameters": {"key": key, "value": value},
        **extra,
    }


async def submit(client: Rpc, *actions: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = await client.result(
        "proposal.submit", {"proposal": {"actions": list(actions)}}
    )
    return result


async def test_a_proposals_state_write_obeys_the_same_budget(
    client_of: Callable[..., Any],
) -> None:
    client = await client_of(state_value_max_bytes=1000, state_max_bytes=2000, state_max_keys=3)
    skip = {"failure_behavior": "skip"}
    result = await submit(
        client, write("w1", "x", "small"), write("w2", "big", sized(1001), **skip)
    )
    statuses = {r["action_id"]: (r["status"], r.get("error")) for r in result["results"]}
    assert statuses["w1"] == ("succeeded", None)
    status, error = statuses["w2"]
    assert status == "failed" and "state_value_max_bytes (1000)" in error, statuses
    assert await keys(client) == ["x"]

    # The same total as state.set: x (8 bytes) and y (1001) are there, z would be 1001.
    await client.result("state.set", {"key": "y", "value": sized(1000)})
    result = await submit(client, write("w3", "z", sized(1000), **skip))
    [only] = result["results"]
    assert only["status"] == "failed" and "2010 bytes > state_max_bytes (2000)" in only["error"], (
        only
    )
    assert await keys(client) == ["x", "y"]

    # Over the key count, the default failure_behavior (abort) rolls back what the
    # proposal wrote before.
    await client.result("state.set", {"key": "z", "value": 0})
    result = await submit(
        client,
        write("w4", "x", "changed"),
        write("w5", "fourth", 1, dependencies=["w4"]),
    )
    by_id = {r["action_id"]: r for r in result["results"]}
    assert by_id["w5"]["status"] == "failed", by_id
    assert "state_max_keys (3)" in by_id["w5"]["error"]
    assert by_id["w4"]["rolled_back"] is True
    assert await client.result("state.get", {"key": "x"}) == "small"
    assert await keys(client) == ["x", "y", "z"]


# ------------------------------------------------------------------ pending calls


async def test_pending_tool_calls_are_bounded(client_of: Callable[..., Any]) -> None:
    client = await client_of(max_pending_calls_per_session=2)
    await client.result("tools.register", [{"name": "slow"}])
    actions = [
        {"id": name, "type": "tool_call", "tool": "slow", "failure_behavior": "skip"}
        for name in ("a", "b", "c")
    ]
    await client.send(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "proposal.submit",
            "params": {"proposal": {"actions": actions}},
        }
    )
    calls = [await client.recv() for _ in range(2)]
    assert [c["method"] for c in calls] == ["tools.execute"] * 2
    assert sorted(c["params"]["action_id"] for c in calls) == ["a", "b"]
    for c in calls:
        await client.send({"jsonrpc": "2.0", "id": c["id"], "result": "done"})
    answer = await client.recv()  # the third call was never sent
    assert answer["id"] == 1, answer
    results = {r["action_id"]: r for r in answer["result"]["results"]}
    assert [results[a]["status"] for a in "ab"] == ["succeeded", "succeeded"]
    assert results["c"]["status"] == "failed"
    assert "max_pending_calls_per_session (2)" in results["c"]["error"], results["c"]


# ------------------------------------------------------------------ outbound queue


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    """Wait (bounded) until `predicate()` holds: state inside the core, which has no
    event to wait on."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


async def test_the_cores_outbound_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    budget = MiB
    core = Core(make_config(tmp_path, session_outbound_queue_bytes=budget).core)
    await core.start()
    # Fixed stream windows, as the gateway's: a client that stops reading holds little.
    options = [("grpc.http2.bdp_probe", 0)]
    try:
        async with grpc.aio.insecure_channel(core.grpc_address, options=options) as channel:
            client = await connect(channel, token=daemon_token(core))
            value = sized(256 * 1024)
            await client.request(
                "state_set", state_pb2.SetStateRequest(key="v", value=to_value(value))
            )
            assert core.parts is not None
            [session] = [s for s in core.parts.registry.sessions.values() if s.streaming]
            client.pause_reading()
            # 40 answers of 256 KiB each (10 MiB): proposals that read the value back.
            read = tools_pb2.ActionProposal()
            action = read.actions.add(id="r", type=tools_pb2.ACTION_TYPE_STATE_READ)
            action.parameters.fields["key"].string_value = "v"
            request = tools_pb2.SubmitProposalRequest(proposal=read)
            answers = [
                asyncio.create_task(client.request("proposal_submit", request, timeout=20))
                for _ in range(40)
            ]
            # Every answer is made (an answer goes on towards the queue without a pause)...
            requests = core.parts.metrics.requests
            await until(lambda: requests.value("proposal.submit", OK) == 40)
            # ... yet the queue holds at most its budget: most senders wait for room.
            assert session.outbound.bytes <= budget
            assert 0 < len(session.outbound) < 4  # 1 MiB holds three of them
            assert session.outbound.waiting >= 30
            # Fan-out towards this session is dropped (and counted), not queued.
            drops = core.parts.metrics.queue_drops
            before = drops.value("session_outbound")
            notice = session_pb2.ServerFrame(tools_cancel=tools_pb2.CancelToolNotice())
            assert session.try_send(notice) is False
            assert drops.value("session_outbound") == before + 1
            assert session.outbound.bytes <= budget

            client.resume_reading()
            for answer in await asyncio.gather(*answers):
                [result] = answer.result.results
                assert result.output.string_value == value
            await client.close()
    finally:
        await stopped(core.stop(grace=0))


def test_the_budgets_defaults() -> None:
    config = Config()
    assert (
        config.core.state_value_max_bytes,
        config.core.state_max_bytes,
        config.core.state_max_keys,
    ) == (
        MiB,
        16 * MiB,
        10_000,
    )
    assert config.core.session_outbound_queue_bytes == 8 * MiB
