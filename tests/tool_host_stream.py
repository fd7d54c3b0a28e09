"""A tool host on the typed stream ToolService.ServeTools (Python's generated stubs).

`StreamToolHost(channel, tools, metadata=...)` registers `tools` (name -> async function
of the ToolCall returning the output, or raising `HostToolError`), answers every call on
its own task, and cancels that task when the server sends a cancel. Every call and cancel
is recorded for the test to inspect. (For users: clients/python/serve-tools.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from car_grpc.v1 import tools_pb2, tools_pb2_grpc
from car_grpc.wire.codec import to_value
from tests.bounded import stopped

Tool = Callable[[tools_pb2.ToolCall], Awaitable[Any]]
ServeToolsRequest = tools_pb2.ServeToolsRequest


class HostToolError(Exception):
    """What a tool raises to fail its call (`terminal`: do not retry, halt the caller)."""

    def __init__(self, message: str, *, terminal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.terminal = terminal


def bearer(token: str, **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata: the token, and e.g. session_id="..." as car-session-id."""
    keys = {"session_id": "car-session-id", "agent_id": "car-agent-id"}
    return (("authorization", f"Bearer {token}"), *((keys[k], v) for k, v in extra.items()))


class StreamToolHost:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        tools: Mapping[str, Tool],
        *,
        metadata: Sequence[tuple[str, str]] = (),
        name: str | None = None,
        scope: tools_pb2.ToolScope.ValueType = tools_pb2.TOOL_SCOPE_UNSPECIFIED,
        definitions: list[tools_pb2.ToolDefinition] | None = None,
    ) -> None:
        self.tools = tools
        self.register = tools_pb2.RegisterToolHost(
            tools=definitions or [tools_pb2.ToolDefinition(name=n) for n in tools], scope=scope
        )
        if name is not None:
            self.register.host = name
        self.call: Any = tools_pb2_grpc.ToolServiceStub(channel).ServeTools(
            metadata=tuple(metadata)
        )
        #: Every call and cancel received, in order.
        self.calls: list[tools_pb2.ToolCall] = []
        self.cancels: list[tools_pb2.ToolCancel] = []
        self.changed = asyncio.Condition()
        self._answering: dict[str, asyncio.Task[None]] = {}
        self._writing = asyncio.Lock()
        self._reading = asyncio.Event()
        self._reading.set()
        self._reader: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.end_code: grpc.StatusCode | None = None
        self.end_details = ""

    async def start(self) -> tools_pb2.ToolHostRegistered:
        """Register; the server's answer, or the AioRpcError it ended the stream with."""
        await self.send(ServeToolsRequest(register=self.register))
        first = await asyncio.wait_for(self.call.read(), 5)
        assert first is not grpc.aio.EOF and first.WhichOneof("body") == "registered", first
        self._reader = asyncio.create_task(self._read())
        return first.registered  # type: ignore[no-any-return]

    async def send(self, message: ServeToolsRequest) -> None:
        async with self._writing:  # grpc.aio allows one write at a time per call
            await self.call.write(message)

    def pause_reading(self) -> None:
        """Stop reading the stream, as a host that hangs would."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def _read(self) -> None:
        try:
            while True:
                await self._reading.wait()
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                body = message.WhichOneof("body")
                if body == "call":
                    self._start(message.call)
                elif body == "cancel":
                    answering = self._answering.get(message.cancel.request_id)
                    if answering is not None:
                        answering.cancel()
                async with self.changed:
                    if body == "call":
                        self.calls.append(message.call)
                    elif body == "cancel":
                        self.cancels.append(message.cancel)
                    self.changed.notify_all()
        except grpc.aio.AioRpcError as e:
            self.end_code, self.end_details = e.code(), e.details() or ""
        finally:
            self.ended.set()

    def _start(self, call: tools_pb2.ToolCall) -> None:
        """Answer `call` on a task of its own (cancelled by a cancel for it)."""
        task = asyncio.create_task(self._answer(call))
        self._answering[call.request_id] = task
        task.add_done_callback(lambda _: self._answering.pop(call.request_id, None))

    async def _answer(self, call: tools_pb2.ToolCall) -> None:
        result = tools_pb2.ToolResult(request_id=call.request_id)
        try:
            result.output.CopyFrom(to_value(await self.tools[call.tool](call)))
        except HostToolError as e:
            result.error.message, result.error.terminal = e.message, e.terminal
        # The stream may be gone by now (its status still comes to the reader).
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self.send(ServeToolsRequest(result=result))

    async def answer(self, request_id: str, output: Any) -> None:
        """Answer a call by hand (e.g. after it was cancelled: a late answer)."""
        result = tools_pb2.ToolResult(request_id=request_id, output=to_value(output))
        await self.send(ServeToolsRequest(result=result))

    async def wait_for_calls(self, count: int, timeout: float = 5) -> list[tools_pb2.ToolCall]:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.calls) >= count)
        return self.calls

    async def wait_for_cancels(self, count: int, timeout: float = 5) -> list[tools_pb2.ToolCancel]:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.cancels) >= count)
        return self.cancels

    async def wait_ended(self, timeout: float = 5) -> grpc.StatusCode | None:
        """The status the stream ended with (None: it ended cleanly)."""
        await asyncio.wait_for(self.ended.wait(), timeout)
        return self.end_code

    def disconnect(self) -> None:
        """Drop the stream at once, as a host that crashes would."""
        self.call.cancel()

    async def close(self) -> None:
        """End the stream cleanly (half-close), then stop answering."""
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), 5)
        self.call.cancel()
        tasks = [t for t in [self._reader, *self._answering.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await stopped(asyncio.gather(*tasks, return_exceptions=True), "the tool host's tasks")


@contextlib.asynccontextmanager
async def serving(
    channel: grpc.aio.Channel, tools: Mapping[str, Tool], **kwargs: Any
) -> AsyncIterator[StreamToolHost]:
    """A started StreamToolHost, closed afterwards."""
    host = StreamToolHost(channel, tools, **kwargs)
    try:
        await host.start()
        yield host
    finally:
        await host.close()
