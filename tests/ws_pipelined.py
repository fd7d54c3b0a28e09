"""A JSON-RPC client on one WebSocket that keeps many requests in flight (ws_helpers.Rpc
waits for each answer in turn): a reader task matches answers to requests by id, queues
notifications, and notes how the server closed the connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

JSON = Any


class RpcError(Exception):
    """A JSON-RPC error answer, or the connection ending before the answer came."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class Pipelined:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[JSON]] = {}
        self.notifications: asyncio.Queue[JSON] = asyncio.Queue()
        #: The server's requests (tools.execute, agent.chat, ...), unanswered.
        self.server_requests: asyncio.Queue[JSON] = asyncio.Queue()
        #: Set once the connection is gone; `close_code`/`close_reason` say how.
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "method" not in message:
                    future = self._waiting.pop(message.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif "id" in message:
                    await self.server_requests.put(message)
                else:
                    await self.notifications.put(message)
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            self.close_code, self.close_reason = (rcvd.code, rcvd.reason) if rcvd else (None, "")
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(RpcError(0, "connection closed"))

    async def call(self, method: str, params: JSON = None) -> JSON:
        """Send a request and return its result; RpcError for an error answer."""
        request_id = next(self._ids)
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        request: dict[str, JSON] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        try:
            await self.ws.send(json.dumps(request))
        except ConnectionClosed:
            self._waiting.pop(request_id, None)
            raise RpcError(0, "connection closed") from None
        answer = await future
        if "error" in answer:
            raise RpcError(answer["error"]["code"], answer["error"]["message"])
        return answer["result"]

    async def answer(self, request: JSON, result: JSON) -> None:
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}))

    async def notify(self, method: str, params: JSON) -> None:
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params}))

    async def login(self, **credentials: str) -> JSON:
        auth = await self.call("session.auth", credentials)
        await self.call("server.handshake", {"protocol_version": 3, "client_version": "test"})
        return auth

    async def next_notification(self, method: str, timeout: float = 5) -> JSON:
        """The next notification of `method` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while (message := await self.notifications.get())["method"] != method:
                pass
        return message

    def drop(self) -> None:
        """Go away as car-runtime does: no close frame, the TCP connection just ends."""
        self.ws.transport.abort()

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self._reader


@contextlib.asynccontextmanager
async def pipelined(url: str) -> AsyncIterator[Pipelined]:
    async with connect(url, ping_interval=None, max_size=None) as ws:
        client = Pipelined(ws)
        try:
            yield client
        finally:
            await client.close()
