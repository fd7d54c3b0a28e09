"""The JSON-RPC test client: one WebSocket to the gateway, speaking JSON-RPC 2.0 with
integer ids as car-runtime does. Every test that talks JSON-RPC to the gateway uses it
(tests.ws_helpers exports it as `Rpc` and `rpc`).

Nothing reads the connection in the background. A frame is read only while something
waits for one (`call`, `recv`, `next_frame`, `next_notification`, ...), by one waiter at a
time, and whoever reads files what it read for the others: the answer a pending `call`
waits for goes to that call (so requests may be pipelined, each matched by its id), any
other frame to `other`. A test that waits for nothing leaves the frames in the socket, as
a slow client would, and may read `ws` itself.

`other` keeps, in arrival order, the frames that are not answers to a pending `call`:
notifications, the server's requests, answers to frames sent with `send`. `next_frame`,
`next_notification`, `expect_notification` and `expect_request` take from it (reading more
while it holds nothing that fits) and leave the rest in order. `recv` is the one exception:
it reads the next frame off the connection, `other` aside.

Every wait has a timeout (TimeoutError), sending too. Nothing is swallowed: a frame that
is not JSON fails the wait that read it and every wait after it (what the client missed
is unknown), and once the connection has ended every wait that needs a new frame raises
websockets' ConnectionClosed; `close_code`/`close_reason` say how the server closed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

JSON = Any

#: What the handshake of `Rpc.login` says.
HANDSHAKE = {"protocol_version": 3, "client_version": "t"}


class RpcError(AssertionError):
    """An error answer where a result was expected: it fails the test like a failed
    assertion, unless the test catches it to look at `code`, `message` and `data`."""

    def __init__(self, answer: JSON) -> None:
        super().__init__(answer)
        self.answer = answer
        error = answer.get("error") if isinstance(answer, dict) else None
        error = error if isinstance(error, dict) else {}
        self.code: int | None = error.get("code")
        self.message: str = error.get("message", "")
        self.data: JSON = error.get("data")


class _Missing:
    """What a picker returns when what it looks for has not arrived."""


_MISSING = _Missing()


def is_notification(frame: JSON) -> bool:
    return isinstance(frame, dict) and "method" in frame and "id" not in frame


def is_request(frame: JSON) -> bool:
    """A request from the server (tools.execute, agent.chat, ...)."""
    return isinstance(frame, dict) and "method" in frame and "id" in frame


def _matches(params: JSON, where: Mapping[str, JSON] | None) -> bool:
    if not where:
        return True
    return isinstance(params, dict) and all(
        key in params and params[key] == value for key, value in where.items()
    )


class Rpc:
    """A JSON-RPC client on one WebSocket (see the module's docstring)."""

    def __init__(self, ws: ClientConnection, *, keep_binary: bool = False) -> None:
        self.ws = ws
        #: Request ids count up from 11, clear of the small ids tests write by hand.
        self._next = 10
        #: Frames that are not answers to a pending `call`, in arrival order.
        self.other: list[JSON] = []
        #: Binary frames (audio), in order, when `keep_binary`; otherwise a binary frame is
        #: read as JSON like a text frame.
        self.binary: list[bytes] = []
        self._keep_binary = keep_binary
        self._awaited: set[int] = set()
        self._answers: dict[int, JSON] = {}
        self._reading = asyncio.Lock()
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ sending

    async def send(self, message: JSON, timeout: float = 10) -> None:
        """Send a frame: a str as it is, anything else as JSON (a server that reads nothing
        holds it up to `timeout`)."""
        async with asyncio.timeout(timeout):
            await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def notify(self, method: str, params: JSON = None) -> None:
        message: dict[str, JSON] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)

    async def answer(self, request: JSON, result: JSON) -> None:
        """Answer a request of the server with `result`."""
        await self.send({"jsonrpc": "2.0", "id": request["id"], "result": result})

    # ------------------------------------------------------------------ requests

    async def call(self, method: str, params: JSON = None, timeout: float = 10) -> JSON:
        """Send a request and return its whole answer ({result} or {error}). Calls may be
        in flight together (tasks): each gets the answer with its id."""
        self._next += 1
        request_id = self._next
        request: dict[str, JSON] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        self._awaited.add(request_id)
        try:
            await self.send(request)
            return await self._wait_for(lambda: self._answers.pop(request_id, _MISSING), timeout)
        finally:
            self._awaited.discard(request_id)
            self._answers.pop(request_id, None)

    async def result(self, method: str, params: JSON = None, timeout: float = 10) -> JSON:
        """The result of a request; an error answer raises RpcError."""
        answer = await self.call(method, params, timeout)
        if not isinstance(answer, dict) or "result" not in answer:
            raise RpcError(answer)
        return answer["result"]

    async def error(self, method: str, params: JSON = None, timeout: float = 10) -> JSON:
        """The error object of a request that must fail."""
        answer = await self.call(method, params, timeout)
        assert isinstance(answer, dict) and "error" in answer, answer
        return answer["error"]

    async def login(self, token: str | None = None, **credentials: str) -> dict[str, JSON]:
        """session.auth with `token` (the daemon token, or an agent's with `agent_id`) or
        other credentials (`host_token=...`), then server.handshake; the auth result."""
        params = ({} if token is None else {"token": token}) | credentials
        auth: dict[str, JSON] = await self.result("session.auth", params)
        await self.result("server.handshake", HANDSHAKE)
        return auth

    # ------------------------------------------------------------------ frames

    async def recv(self, timeout: float = 5) -> JSON:
        """The next frame read off the connection (`other` aside), unless a pending `call`
        awaits it."""
        async with asyncio.timeout(timeout):
            while True:
                async with self._reading:
                    frame = await self._read()
                if frame is not _MISSING:
                    return frame

    async def next_frame(self, timeout: float = 5) -> JSON:
        """The next frame that is not an answer to `call`: the oldest of `other`, else the
        next one read."""
        return self.other.pop(0) if self.other else await self.recv(timeout)

    async def next_notification(
        self, method: str, timeout: float = 5, *, where: Mapping[str, JSON] | None = None
    ) -> JSON:
        """The params of the first notification of `method` (whose params hold the items of
        `where`); the frames before it stay in `other`, in order."""

        def pick() -> JSON:
            for i, frame in enumerate(self.other):
                if (
                    is_notification(frame)
                    and frame["method"] == method
                    and _matches(frame.get("params"), where)
                ):
                    return self.other.pop(i).get("params")
            return _MISSING

        return await self._wait_for(pick, timeout)

    async def expect_notification(self, method: str, timeout: float = 5) -> JSON:
        """The params of the next notification (the server's requests aside), which must
        be of `method`."""

        def pick() -> JSON:
            for i, frame in enumerate(self.other):
                if is_notification(frame):
                    assert frame["method"] == method, frame
                    return self.other.pop(i).get("params")
            return _MISSING

        return await self._wait_for(pick, timeout)

    async def expect_request(self, method: str | None = None, timeout: float = 5) -> JSON:
        """The next request of the server (notifications aside), whole (answer it with
        `answer`); it must be of `method` when one is given."""

        def pick() -> JSON:
            for i, frame in enumerate(self.other):
                if is_request(frame):
                    assert method is None or frame["method"] == method, frame
                    return self.other.pop(i)
            return _MISSING

        return await self._wait_for(pick, timeout)

    async def next_binary(self, timeout: float = 5) -> bytes:
        """The next binary frame (with `keep_binary`); text frames read meanwhile go to
        `other`."""
        assert self._keep_binary, "binary frames are read as JSON unless keep_binary"
        found: bytes = await self._wait_for(
            lambda: self.binary.pop(0) if self.binary else _MISSING, timeout
        )
        return found

    async def queued(self) -> list[JSON]:
        """`other`, after filing every frame the connection already holds, without waiting
        for more (a frame on its way may still be missing; a connection that ended is left
        to the next wait to raise)."""
        if not self._reading.locked():  # else a waiter is reading: it files what comes
            async with self._reading:
                while True:
                    try:
                        async with asyncio.timeout(0):  # reading a received frame needs no wait
                            frame = await self._read()
                    except (TimeoutError, ConnectionClosed):
                        break
                    if frame is not _MISSING:
                        self.other.append(frame)
        return self.other

    # ------------------------------------------------------------------ the connection

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame (None: none came, or not yet)."""
        received = self.ws.protocol.close_rcvd
        return received.code if received else None

    @property
    def close_reason(self) -> str:
        received = self.ws.protocol.close_rcvd
        return received.reason if received else ""

    async def wait_closed(self, timeout: float = 10) -> tuple[int | None, str]:
        """Read (filing frames in `other`) until the connection ends; how the server closed
        it: (code, reason), (None, "") without a close frame."""
        async with asyncio.timeout(timeout):
            while True:
                async with self._reading:
                    try:
                        frame = await self._read()
                    except ConnectionClosed:
                        break
                if frame is not _MISSING:
                    self.other.append(frame)
        return self.close_code, self.close_reason

    def drop(self) -> None:
        """Go away as car-runtime does: no close frame, the TCP connection just ends."""
        self.ws.transport.abort()

    async def close(self) -> None:
        await self.ws.close()

    # ------------------------------------------------------------------ reading

    async def _read(self) -> JSON:
        """Read one frame (holding `_reading`): an answer a `call` awaits goes to it, a
        binary frame to `binary` with keep_binary (both: _MISSING); any other frame is
        returned."""
        if self._failure is not None:
            raise self._failure
        raw = await self.ws.recv()
        if self._keep_binary and isinstance(raw, bytes):
            self.binary.append(raw)
            return _MISSING
        try:
            frame = json.loads(raw)
        except ValueError as e:
            e.add_note(f"the frame: {raw[:500]!r}")
            self._failure = e
            raise
        if (
            isinstance(frame, dict)
            and "method" not in frame
            and ("result" in frame or "error" in frame)
            and type(request_id := frame.get("id")) is int
            and request_id in self._awaited
        ):
            self._answers[request_id] = frame
            return _MISSING
        return frame

    async def _wait_for(self, pick: Callable[[], JSON], timeout: float) -> JSON:
        """What `pick` finds (it returns _MISSING until then), reading frames into `other`
        while it finds nothing."""
        async with asyncio.timeout(timeout):
            while (found := pick()) is _MISSING:
                async with self._reading:
                    if (found := pick()) is not _MISSING:  # another waiter read it
                        return found
                    frame = await self._read()
                    if frame is not _MISSING:
                        self.other.append(frame)
            return found


@contextlib.asynccontextmanager
async def rpc(url: str, **kwargs: Any) -> AsyncIterator[Rpc]:
    """An Rpc on a new connection to `url` (no pings; `kwargs` go to websockets' connect)."""
    async with connect(url, ping_interval=None, **kwargs) as ws:
        yield Rpc(ws)
