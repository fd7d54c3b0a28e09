"""A small typed client of SessionService.Connect for tests, on the generated stub.

It multiplexes the stream the way a real client must: requests get fresh ids and are
matched to their responses; server-initiated requests and notifications land in queues
the test reads (or in a callback for server requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
from google.protobuf.message import Message

from car_grpc.v1 import session_pb2, session_pb2_grpc
from car_grpc.wire.errors import CarError
from tests.bounded import stopped

ServerRequestHandler = Callable[[session_pb2.ServerFrame], Coroutine[Any, Any, None]]


class SessionClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = session_pb2_grpc.SessionServiceStub(channel)
        self.call: Any = self.stub.Connect()
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[session_pb2.ServerFrame]] = {}
        #: Server-initiated requests (tools.execute, agent.chat, ...) not handled by
        #: `on_server_request`.
        self.server_requests: asyncio.Queue[session_pb2.ServerFrame] = asyncio.Queue()
        #: Notifications (tools.cancel, runs.trace.event, ...).
        self.notifications: asyncio.Queue[session_pb2.ServerFrame] = asyncio.Queue()
        self.on_server_request: ServerRequestHandler | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.ended = asyncio.Event()
        self.end_code: grpc.StatusCode | None = None
        self._writing = asyncio.Lock()
        #: Cleared by `pause_reading`: frames then stay in the transport (a slow client).
        self._reading = asyncio.Event()
        self._reading.set()
        self._reader = asyncio.create_task(self._read())

    def pause_reading(self) -> None:
        """Stop reading the stream, as a client that stopped reading its socket would."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def _frames(self) -> AsyncIterator[session_pb2.ServerFrame]:
        while True:
            await self._reading.wait()
            frame = await self.call.read()
            if frame is grpc.aio.EOF:
                return
            yield frame

    async def _read(self) -> None:
        try:
            async for frame in self._frames():
                if frame.id in self._waiting:
                    self._waiting.pop(frame.id).set_result(frame)
                elif frame.id:
                    if self.on_server_request is not None:
                        task = asyncio.create_task(self.on_server_request(frame))
                        self._handlers.add(task)
                        task.add_done_callback(self._handlers.discard)
                    else:
                        await self.server_requests.put(frame)
                else:
                    await self.notifications.put(frame)
        except grpc.aio.AioRpcError as e:
            self.end_code = e.code()
        finally:
            self.ended.set()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("stream ended"))

    async def send(self, frame: session_pb2.ClientFrame) -> None:
        async with self._writing:  # grpc.aio allows one write at a time per call
            await self.call.write(frame)

    async def request_frame(
        self, member: str, message: Message, timeout: float = 10
    ) -> session_pb2.ServerFrame:
        """Send a request and return the whole answer frame (response or error)."""
        frame_id = str(next(self._ids))
        frame = session_pb2.ClientFrame(id=frame_id)
        getattr(frame, member).CopyFrom(message)
        fut: asyncio.Future[session_pb2.ServerFrame] = asyncio.get_running_loop().create_future()
        self._waiting[frame_id] = fut
        await self.send(frame)
        return await asyncio.wait_for(fut, timeout)

    async def request(self, member: str, message: Message, timeout: float = 10) -> Any:
        """Send a request; return the response message or raise CarError."""
        answer = await self.request_frame(member, message, timeout)
        if answer.WhichOneof("body") == "error":
            raise CarError.from_proto(answer.error)
        assert answer.WhichOneof("body") == member, answer
        return getattr(answer, member)

    async def answer(self, frame_id: str, member: str, message: Message) -> None:
        """Answer a server-initiated request."""
        reply = session_pb2.ClientFrame(id=frame_id)
        getattr(reply, member).CopyFrom(message)
        await self.send(reply)

    async def answer_error(self, frame_id: str, error: CarError) -> None:
        await self.send(session_pb2.ClientFrame(id=frame_id, error=error.to_proto()))

    async def next_notification(self, timeout: float = 5) -> session_pb2.ServerFrame:
        return await asyncio.wait_for(self.notifications.get(), timeout)

    async def next_server_request(self, timeout: float = 5) -> session_pb2.ServerFrame:
        return await asyncio.wait_for(self.server_requests.get(), timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        self.call.cancel()
        # Whatever it ended with (cancelled, the stream's error) is no news at a close.
        await stopped(asyncio.gather(self._reader, return_exceptions=True), "the client's reader")


async def connect(
    channel: grpc.aio.Channel,
    *,
    token: str | None = None,
    host_token: str | None = None,
    agent_id: str | None = None,
    handshake: bool = True,
) -> SessionClient:
    """Open a session, authenticate (when a credential is given) and handshake."""
    client = SessionClient(channel)
    auth = session_pb2.AuthenticateRequest()
    if token is not None:
        auth.token = token
    if host_token is not None:
        auth.host_token = host_token
    if agent_id is not None:
        auth.agent_id = agent_id
    await client.request("session_auth", auth)
    if handshake:
        hs = session_pb2.HandshakeRequest(client_version="test")
        hs.protocol_version.number_value = 3
        await client.request("server_handshake", hs)
    return client
