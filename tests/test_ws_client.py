"""The JSON-RPC test client (tests/ws_client.py) against a scripted WebSocket server:
pipelined answers matched by id, the order of everything else, frames it cannot parse,
timeouts, and how the connection ended."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.bounded import bounded
from tests.ws_client import Rpc, RpcError, rpc

Script = Callable[[ServerConnection], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Rpc]:
    """An Rpc connected to a server that runs `script` on the connection."""
    async with (
        serve(script, "127.0.0.1", 0, ping_interval=None) as server,
        rpc(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/") as client,
    ):
        yield client


async def requests(ws: ServerConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(await ws.recv()) for _ in range(n)]


def answer(request: dict[str, Any], **body: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request["id"], **body})


def note(method: str, **params: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params})


async def test_pipelined_calls_get_their_own_answers_and_the_rest_stays_in_order() -> None:
    async def script(ws: ServerConnection) -> None:
        first, second = await requests(ws, 2)
        await ws.send(note("a", n=1))
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": "cb-1", "method": "tools.execute"}))
        await ws.send(answer(second, error={"code": -32602, "message": "no"}))
        await ws.send(note("b", n=2))
        await ws.send(note("a", n=3))
        await ws.send(answer(first, result="one"))
        [reply] = await requests(ws, 1)
        await ws.send(json.dumps(reply))  # echoed back: lands in `other`
        await ws.wait_closed()

    async with scripted(script) as client:
        one = asyncio.create_task(client.result("first"))
        two = asyncio.create_task(client.result("second", {"x": 1}))
        with pytest.raises(RpcError) as refused:
            await two
        assert (refused.value.code, refused.value.message) == (-32602, "no")
        assert await one == "one"
        assert [type(f) for f in client.other] == [dict] * 4
        # Of method b, the first; what came before stays queued, in order.
        assert await client.next_notification("b") == {"n": 2}
        assert await client.next_notification("a", where={"n": 3}) == {"n": 3}
        request = await client.expect_request("tools.execute")
        assert await client.expect_notification("a") == {"n": 1}
        assert client.other == []
        await client.answer(request, {"done": True})
        assert await client.next_frame() == {
            "jsonrpc": "2.0",
            "id": "cb-1",
            "result": {"done": True},
        }


async def test_expect_notification_fails_on_another_method() -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.send(note("a"))
        await ws.send(note("b"))
        await ws.wait_closed()

    async with scripted(script) as client:
        with pytest.raises(AssertionError):
            await client.expect_notification("b")
        assert await client.next_notification("b") == {}


async def test_a_frame_that_is_not_json_fails_the_waiter_and_every_wait_after() -> None:
    async def script(ws: ServerConnection) -> None:
        await requests(ws, 1)
        await ws.send("{not json")
        await ws.send(note("a"))
        await ws.wait_closed()

    async with scripted(script) as client:
        pending = asyncio.create_task(client.call("x"))
        with pytest.raises(ValueError):
            await client.next_notification("a")
        with pytest.raises(ValueError):
            await pending
        with pytest.raises(ValueError):
            await client.next_frame()


async def test_every_wait_has_a_timeout() -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with scripted(script) as client:
        for wait in (
            client.call("x", timeout=0.05),
            client.recv(0.05),
            client.next_frame(0.05),
            client.next_notification("a", 0.05),
            client.expect_notification("a", 0.05),
            client.expect_request(timeout=0.05),
        ):
            with pytest.raises(TimeoutError):
                await wait


async def test_queued_files_what_arrived_without_waiting() -> None:
    sent = asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        await ws.send(note("a"))
        sent.set()
        await ws.wait_closed()

    async with scripted(script) as client:
        await bounded(sent.wait(), "the script's send")
        async with asyncio.timeout(5):
            while not await client.queued():  # noqa: ASYNC110 (queued() is what is tested)
                await asyncio.sleep(0.01)
        assert client.other == [{"jsonrpc": "2.0", "method": "a", "params": {}}]


async def test_how_the_server_closed() -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.send(note("bye"))
        await ws.close(1008, "auth required")

    async with scripted(script) as client:
        assert await client.wait_closed() == (1008, "auth required")
        assert await client.next_notification("bye") == {}
        with pytest.raises(ConnectionClosed):
            await client.call("x")


async def test_drop_sends_no_close_frame() -> None:
    seen: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def script(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()
        received = ws.protocol.close_rcvd
        seen.set_result(None if received is None else received.code)

    async with scripted(script) as client:
        client.drop()
        assert await asyncio.wait_for(seen, 5) is None
