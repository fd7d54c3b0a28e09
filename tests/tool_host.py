"""A test client's tool side: answers the server's tools.execute requests on a session.

`ToolHost(client, tool)` reads the session's server-initiated requests and answers each
tools.execute with `await tool(request)` (the output), or with the error it raises
(CarError). Every request, cancel notice and answer is recorded for the test to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import struct_pb2

from car_grpc.v1 import tools_pb2
from car_grpc.wire.codec import json_to_value, to_value
from car_grpc.wire.errors import CarError
from tests.bounded import stopped
from tests.session_client import SessionClient

Tool = Callable[[tools_pb2.ExecuteToolRequest], Awaitable[Any]]


def terminal_error(message: str) -> CarError:
    """The error car-runtime sends for a TerminalToolError."""
    data = struct_pb2.Value()
    json_to_value({"terminal": True}, data)
    return CarError(-32000, message, data)


class ToolHost:
    def __init__(self, client: SessionClient, tool: Tool) -> None:
        self.client = client
        self.tool = tool
        #: (frame id, request) of every tools.execute, in arrival order.
        self.requests: list[tuple[str, tools_pb2.ExecuteToolRequest]] = []
        self.received = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frame = await self.client.server_requests.get()
            assert frame.WhichOneof("body") == "tools_execute", frame
            async with self.received:
                self.requests.append((frame.id, frame.tools_execute))
                self.received.notify_all()
            task = asyncio.create_task(self._answer(frame.id, frame.tools_execute))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frame_id: str, request: tools_pb2.ExecuteToolRequest) -> None:
        try:
            output = await self.tool(request)
        except CarError as e:
            await self.client.answer_error(frame_id, e)
            return
        response = tools_pb2.ExecuteToolResponse(output=to_value(output))
        with contextlib.suppress(Exception):  # the stream may be gone by now
            await self.client.answer(frame_id, "tools_execute", response)

    async def wait_for_requests(self, count: int, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout), self.received:
            await self.received.wait_for(lambda: len(self.requests) >= count)

    def action_ids(self) -> list[str]:
        return [r.action_id for _, r in self.requests]

    async def close(self) -> None:
        for task in [self._reader, *self._tasks]:
            task.cancel()
        for task in [self._reader, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError):
                await stopped(task, "the tool host's task")
