"""The A2A HTTP listener's own bounds, on a real listener over loopback with raw sockets:
what one peer may hold in connections before any token is read, and how long a request
head and a request body may take to come (docs/protocol.md §7b)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from car_grpc.a2a.server import A2aListener, ListenerLimits
from car_grpc.cli import build_parser, config_from
from car_grpc.config import Config
from car_grpc.connection_caps import RETRY_AFTER
from car_grpc.core.server import Core
from tests.bounded import bounded, stopped
from tests.conftest import make_config
from tests.ws_helpers import running_core

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(url: str) -> Connection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: its status, headers and body."""
    head = await bounded(reader.readuntil(b"\r\n\r\n"), "a response head")
    status_line, *lines = head.decode().split("\r\n")[:-2]
    headers = {name.lower(): value for name, _, value in (x.partition(": ") for x in lines)}
    body = await bounded(reader.readexactly(int(headers["content-length"])), "a response body")
    return int(status_line.split(" ")[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (all it still sends read and dropped)."""
    return await bounded(reader.read(), "the server's close") == b""


def post_head(core: Core, length: int, token: str = "") -> bytes:
    """The head of a JSON-RPC POST to agent-1 announcing `length` bytes of body."""
    port = urlsplit(core.a2a_url).port
    lines = [
        "POST /a2a/agent-1 HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def trickling(writer: asyncio.StreamWriter, data: bytes) -> AsyncIterator[None]:
    """`data` sent a byte every 20 ms (over and over) while the block runs: a client that
    is never idle, so no idle timeout would end it."""

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                for byte in data:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.02)

    task = asyncio.create_task(trickle())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def listening(limits: ListenerLimits) -> AsyncIterator[A2aListener]:
    """A listener with `limits` whose app answers GET / with "ok"."""

    async def ok(_request: Request) -> Response:
        return PlainTextResponse("ok")

    listener = A2aListener(Starlette(routes=[Route("/", ok)]), "127.0.0.1", 0, None, limits)
    await listener.start()
    try:
        yield listener
    finally:
        await stopped(listener.stop())


async def served(http: httpx.AsyncClient, url: str) -> httpx.Response:
    """The answer to GET `url` once it is not refused at the per-peer cap: once the server
    has seen a connection go (a client's close reaches it a moment later)."""

    async def retried() -> httpx.Response:
        while True:
            answer = await http.get(url)
            if answer.status_code != 503:
                return answer
            await asyncio.sleep(0.01)

    return await bounded(retried(), f"GET {url} served")


async def held(core: Core) -> Connection:
    """A connection the listener holds: a tokenless POST, answered 401 at once, whose body
    has not come (held until a2a_body_timeout)."""
    reader, writer = await connect(core.a2a_url)
    writer.write(post_head(core, 100) + b"{")
    status, _, _ = await read_response(reader)
    assert status == 401
    return reader, writer


async def test_one_peer_holds_at_most_its_connections_one_more_is_answered_503(
    tmp_path: Path,
) -> None:
    """Two connections held from 127.0.0.1 (every loopback client is that peer): a third
    is answered 503 with Retry-After and the JSON-RPC error naming the limit, before any
    token is read, and closed; once one of the two goes, a request is served again."""
    config = make_config(tmp_path, a2a_max_connections_per_peer=2)
    async with running_core(config.core) as core:
        card = f"{core.a2a_url}/a2a/agent-1/.well-known/agent-card.json"
        first, second = await held(core), await held(core)
        message = "too many connections from 127.0.0.1: at most 2 (a2a_max_connections_per_peer)"
        async with httpx.AsyncClient() as http:
            refused = await http.get(card)
            assert (refused.status_code, refused.headers["Retry-After"]) == (503, str(RETRY_AFTER))
            assert refused.json() == {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": -32603, "message": message},
            }
            # A client that sends nothing is answered all the same, and not held.
            reader, writer = await connect(core.a2a_url)
            status, headers, body = await read_response(reader)
            assert (status, headers["retry-after"]) == (503, str(RETRY_AFTER))
            assert json.loads(body)["error"]["message"] == message
            assert await closed_by_server(reader)
            writer.close()
            first[1].close()
            assert (await served(http, card)).status_code == 404  # not attached
        second[1].close()


async def test_past_its_connections_in_all_one_more_is_answered_503_naming_the_limit() -> None:
    """Two connections held from two peers fill a listener of two: a third, from a third
    peer, is answered 503 with Retry-After and the JSON-RPC error naming the limit (not
    uvicorn's bare 503), and closed; once one of the two goes, a request is served."""
    async with listening(ListenerLimits(max_connections=2)) as listener:
        parts = urlsplit(listener.url)
        holding = [
            await asyncio.open_connection(parts.hostname, parts.port, local_addr=(host, 0))
            for host in ("127.0.0.2", "127.0.0.3")
        ]
        reader, writer = await asyncio.open_connection(
            parts.hostname, parts.port, local_addr=("127.0.0.4", 0)
        )
        status, headers, body = await read_response(reader)
        assert (status, headers["retry-after"]) == (503, str(RETRY_AFTER))
        assert json.loads(body) == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32603,
                "message": "too many connections: at most 2 (the A2A listener's)",
            },
        }
        assert await closed_by_server(reader)
        writer.close()
        holding[0][1].close()
        async with httpx.AsyncClient() as http:
            assert (await served(http, f"{listener.url}/")).text == "ok"
        holding[1][1].close()


async def test_a_flood_from_one_peer_leaves_the_listener_to_the_others(tmp_path: Path) -> None:
    """300 connections that send nothing, from 127.0.0.2 (another peer than 127.0.0.1, on
    loopback too): past the default 64 each is answered 503 and closed, so the listener's
    256 connections stay open to other peers, and a request from 127.0.0.1 is served.
    (uvicorn alone answered it 503, past 256 connections held by anyone.)"""
    async with running_core(make_config(tmp_path).core) as core:
        parts = urlsplit(core.a2a_url)
        flood = [
            await asyncio.open_connection(parts.hostname, parts.port, local_addr=("127.0.0.2", 0))
            for _ in range(300)
        ]
        async with httpx.AsyncClient() as http:
            card = await http.get(f"{core.a2a_url}/a2a/agent-1/.well-known/agent-card.json")
        assert card.status_code == 404  # served: not attached
        for reader, _ in flood[64:]:
            status, _, body = await read_response(reader)
            assert status == 503 and b"127.0.0.2: at most 64" in body
        for _, writer in flood:
            writer.close()


async def test_a_request_body_not_sent_in_time_is_answered_408_and_its_connection_closed(
    tmp_path: Path,
) -> None:
    """A body trickled a byte at a time (never idle) gets a2a_body_timeout from its head:
    a caller's request is answered 408 with the JSON-RPC error naming the limit, and a
    tokenless one, answered 401 at once, is cut off all the same; a prompt body is
    served as ever."""
    config = make_config(tmp_path, a2a_body_timeout=0.5)
    async with running_core(config.core) as core:
        assert core.parts is not None and core.parts.a2a is not None
        token = await core.parts.a2a.callers.add("peer")
        reader, writer = await connect(core.a2a_url)
        writer.write(post_head(core, 1000, token) + b'{"jsonrpc": "2.0", ')
        async with trickling(writer, b" "):
            status, headers, body = await read_response(reader)
            assert (status, headers["connection"]) == (408, "close")
            assert json.loads(body)["error"] == {
                "code": -32600,
                "message": "request body not received within 0.5 s (a2a_body_timeout)",
            }
            assert await closed_by_server(reader)
        writer.close()

        reader, writer = await connect(core.a2a_url)
        writer.write(post_head(core, 1000) + b"{")
        async with trickling(writer, b" "):
            status, _, _ = await read_response(reader)
            assert status == 401
            assert await closed_by_server(reader)
        writer.close()

        request: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "GetTask",
            "params": {"id": "t"},
        }
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{core.a2a_url}/a2a/agent-1",
                json=request,
                headers={"Authorization": f"Bearer {token}", "A2A-Version": "1.0"},
            )
        assert answer.json()["error"]["code"] == -32001  # TaskNotFound


async def test_a_connection_that_sends_no_request_head_in_time_is_closed() -> None:
    async with listening(ListenerLimits(head_timeout=0.3)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        async with httpx.AsyncClient() as http:  # a prompt request is served as ever
            assert (await http.get(f"{listener.url}/")).text == "ok"


async def test_a_kept_alive_connection_that_trickles_its_next_request_head_is_closed() -> None:
    """The head deadline holds for every request of a connection, not only its first:
    uvicorn's keep-alive timer stops at the first byte that comes."""
    async with listening(ListenerLimits(head_timeout=0.3)) as listener:
        reader, writer = await connect(listener.url)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with trickling(writer, b"X-Slow: yes\r\n"):
            assert await closed_by_server(reader)
        writer.close()


async def test_an_upgrade_request_is_a_plain_request_and_its_connection_counted_out() -> None:
    """The listener serves no WebSocket: a request asking for one is answered as any
    other, and its connection leaves the per-peer count when it closes (uvicorn would have
    handed it to a protocol that never counts it out)."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with listening(ListenerLimits(max_connections_per_peer=1)) as listener:
        for _ in range(3):
            async with httpx.AsyncClient(headers=upgrade) as http:
                assert (await served(http, f"{listener.url}/")).text == "ok"


def test_the_per_peer_cap_comes_from_the_environment_or_the_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Config().core.a2a_max_connections_per_peer == 64
    monkeypatch.setenv("CAR_A2A_MAX_CONNECTIONS_PER_PEER", "5")
    assert Config.from_env().core.a2a_max_connections_per_peer == 5
    for command in ("serve", "core"):
        args = build_parser().parse_args([command, "--a2a-max-connections-per-peer", "3"])
        assert config_from(args).core.a2a_max_connections_per_peer == 3
    monkeypatch.setenv("CAR_A2A_MAX_CONNECTIONS_PER_PEER", "0")
    with pytest.raises(ValueError, match="CAR_A2A_MAX_CONNECTIONS_PER_PEER must be a whole"):
        Config.from_env()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["core", "--a2a-max-connections-per-peer", "0"])
