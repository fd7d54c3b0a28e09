"""Large frames do not hold the event loop: a real core and gateway on loopback, a client
sending frames that take a second or more to decode, and a bystander whose round trips
go on meanwhile.

The tests assert an order, not a timing: the bystander completes many round trips after
the large frame went out and before its answer came back. While the gateway decoded such
a frame on its event loop, nobody else was served at all until it was done."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.wire.errors import INVALID_PARAMS
from tests.conftest import make_config
from tests.ws_helpers import rpc, running

#: Round trips the bystander must complete while one large frame is being decoded.
ROUND_TRIPS = 50


@pytest.fixture
async def served(tmp_path: Path) -> Any:
    # State budgets wide enough for the megabyte values these frames carry.
    config = make_config(
        tmp_path, auth=False, state_value_max_bytes=8 << 20, state_max_bytes=64 << 20
    )
    async with running(config) as pair:
        yield pair


def tools(n: int) -> list[Any]:
    """tools.register params that are read to the end before they fail: n tools, then one
    whose name is not a string."""
    return [{"name": f"t{i}"} for i in range(n)] + [{"name": 5}]


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def one_frame() -> tuple[str, Any]:
    """400,000 tools to convert (7 MB): one -32602 naming the field."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools.register", "params": tools(400_000)}
    error = {
        "code": INVALID_PARAMS,
        "message": "invalid params: expected a string: tools[400000].name",
        "data": {"field": "tools[400000].name"},
    }
    return json.dumps(request), {"jsonrpc": "2.0", "id": 1, "error": error}


def a_batch() -> tuple[str, Any]:
    """1,000 entries of 400 tools each: 1,000 answers -32602."""
    batch = [
        {"jsonrpc": "2.0", "id": n, "method": "tools.register", "params": tools(400)}
        for n in range(1000)
    ]
    return json.dumps(batch), [INVALID_PARAMS] * 1000


def a_deep_batch() -> tuple[str, Any]:
    """1,000 values nested 400 levels deep: each -32602 with the precise reason."""
    params = {"key": "k", "value": deep(400)}
    batch = [
        {"jsonrpc": "2.0", "id": n, "method": "state.set", "params": params} for n in range(1000)
    ]
    return json.dumps(batch), ["invalid params: nested more than 100 levels deep"] * 1000


async def bystander(ws: ClientConnection, count: list[int], stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools.list"}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert answer == {"jsonrpc": "2.0", "id": n, "result": {"tools": [], "count": 0}}
        count[0] += 1


@pytest.mark.parametrize("frame", [one_frame, a_batch, a_deep_batch])
async def test_a_bystander_is_served_while_a_large_frame_is_decoded(
    served: tuple[Core, Gateway], frame: Any
) -> None:
    _, gateway = served
    text, expected = frame()
    async with (
        rpc(gateway.url, max_size=None) as attacker,
        rpc(gateway.url) as watcher,
    ):
        for client in (attacker, watcher):  # the full message size applies from here
            assert await client.result("tools.list") == {"tools": [], "count": 0}
        count, stop = [0], asyncio.Event()
        round_trips = asyncio.create_task(bystander(watcher.ws, count, stop))
        try:
            await attacker.ws.send(text)
            sent = count[0]
            answer = json.loads(await asyncio.wait_for(attacker.ws.recv(), 30))
            during = count[0] - sent
        finally:
            stop.set()
            await asyncio.wait_for(round_trips, 10)
    assert during >= ROUND_TRIPS, f"the bystander did {during} round trips meanwhile"
    if isinstance(answer, dict):
        assert answer == expected
    else:
        assert sorted(e["id"] for e in answer) == list(range(1000))
        found = [e["error"]["code" if isinstance(expected[0], int) else "message"] for e in answer]
        assert found == expected
    assert gateway.decoder.workers >= 1  # decoded by a worker process


async def test_small_frames_never_start_a_worker(served: tuple[Core, Gateway]) -> None:
    _, gateway = served
    async with rpc(gateway.url) as client:
        await client.result("state.set", {"key": "k", "value": "x" * 500_000})
        assert await client.result("state.get", {"key": "k"}) == "x" * 500_000
        await client.send([{"id": n, "method": "tools.list"} for n in range(200)])
        assert len(await client.recv()) == 200
    assert gateway.decoder.workers == 0


async def test_frames_decoded_by_a_worker_reach_the_core_whole(
    served: tuple[Core, Gateway],
) -> None:
    """Requests from a worker carry their gateway ids: every answer finds its request."""
    _, gateway = served
    async with rpc(gateway.url, max_size=None) as client:
        assert await client.result("tools.list") == {"tools": [], "count": 0}
        value = "v" * 3_000_000
        await client.send(
            {"id": "big", "method": "state.set", "params": {"key": "k", "value": value}}
        )
        assert await client.recv() == {"jsonrpc": "2.0", "id": "big", "result": {"ok": True}}
        batch = [
            {"id": n, "method": "state.set", "params": {"key": f"k{n}", "value": [n] * 1000}}
            for n in range(1000)
        ]
        await client.send(batch)
        # A thousand answers decoded by a worker: the test is about wholeness, not speed
        # (on a loaded 2-core machine they take longer than the default 5 s).
        answers = await client.recv(timeout=60)
        assert sorted(a["id"] for a in answers) == list(range(1000))
        assert all(a["result"] == {"ok": True} for a in answers)
        assert await client.result("state.get", {"key": "k"}) == value
        assert await client.result("state.get", {"key": "k999"}) == [999] * 1000
        assert len(await client.result("state.keys")) == 1001
    assert gateway.decoder.workers >= 1
