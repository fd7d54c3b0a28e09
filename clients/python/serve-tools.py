"""A tool host on the typed stream ToolService.ServeTools: it registers its tools in the
stream's first message, answers every `call` with one `result`, and stops working on a
call when a `cancel` names it. No session stream, no frame ids, no tools.execute.

    python serve-tools.py [--session <session_id>]

Without --session its tools are shared by name with every session's proposals (the
daemon token file, or CAR_AUTH_TOKEN). With --session it serves that session's own
tools (car-session-id, with the session's credentials: the daemon token, or
CAR_AGENT_ID and CAR_AGENT_TOKEN). It ends cleanly when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
from car import JSON, channel, daemon_token, fail, from_struct, log, metadata, to_struct, to_value

from car_grpc.v1 import options_pb2, tools_pb2, tools_pb2_grpc
from car_grpc.v1.tools_pb2 import ServeToolsRequest, ServeToolsResponse


# The tools: parameters in, output (any JSON) out, or an exception. A cancelled call is a
# cancelled task.
def num(value: JSON) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


async def add(params: dict[str, JSON]) -> JSON:
    return num(params.get("a")) + num(params.get("b"))


async def divide(params: dict[str, JSON]) -> JSON:
    if num(params.get("b")) == 0:
        raise ValueError("division by zero")
    return num(params.get("a")) / num(params.get("b"))


async def wait(params: dict[str, JSON]) -> JSON:
    await asyncio.Event().wait()  # until the server cancels the call
    return None


TOOLS: dict[str, Callable[[dict[str, JSON]], Awaitable[JSON]]] = {
    "add": add,
    "divide": divide,
    "wait": wait,
}
NUMBERS: dict[str, JSON] = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
}

Stream: TypeAlias = grpc.aio.StreamStreamCall[ServeToolsRequest, ServeToolsResponse]


# guide:serve-tools
class ToolHost:
    """One ServeTools stream: what the host sends goes through `send`; each call is
    answered by a task of its own, which a `cancel` cancels."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.sending = asyncio.Lock()  # one write at a time on a gRPC stream
        self.running: dict[str, asyncio.Task[None]] = {}  # request_id -> its task

    async def send(self, message: ServeToolsRequest) -> None:
        async with self.sending:
            await self.stream.write(message)

    def start(self, call: tools_pb2.ToolCall) -> None:
        task = asyncio.create_task(self.serve(call))
        self.running[call.request_id] = task
        task.add_done_callback(lambda _: self.running.pop(call.request_id, None))

    def cancel(self, request_id: str) -> None:
        if task := self.running.get(request_id):
            task.cancel()

    async def serve(self, call: tools_pb2.ToolCall) -> None:
        result = tools_pb2.ToolResult(request_id=call.request_id)
        try:
            output = await TOOLS[call.tool](from_struct(call.parameters))
            result.output.CopyFrom(to_value(output))
        except Exception as e:
            # terminal=True would also abort the proposal and halt the caller's session.
            result.error.message = str(e)
        # A cancelled call stops above, unanswered: the server no longer waits for it.
        # The stream may be gone by now (its end comes to the reader).
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self.send(ServeToolsRequest(result=result))

    async def end_when_stdin_closes(self) -> None:
        """Closing stdin ends the stream cleanly: the server then drops the tools."""
        stdin = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while await stdin.read(4096):
            pass
        async with self.sending:
            await self.stream.done_writing()


# guide:end


async def main(session_id: str) -> None:
    agent_id = os.environ.get("CAR_AGENT_ID", "")
    token = os.environ.get("CAR_AGENT_TOKEN", "") if agent_id else daemon_token()
    async with channel() as ch:
        # guide:serve-tools-loop
        credentials = metadata(token, agent_id=agent_id, session_id=session_id)
        host = ToolHost(tools_pb2_grpc.ToolServiceStub(ch).ServeTools(metadata=credentials))
        tools = [tools_pb2.ToolDefinition(name=n, parameters=to_struct(NUMBERS)) for n in TOOLS]
        register = tools_pb2.RegisterToolHost(host="python-tools", tools=tools)
        await host.send(ServeToolsRequest(register=register))
        stdin_closed = asyncio.create_task(host.end_when_stdin_closes())
        try:
            async for message in host.stream:
                body = message.WhichOneof("body")
                if body == "registered":
                    registered = message.registered
                    scope = tools_pb2.ToolScope.Name(registered.scope)
                    log("registered", host=registered.host, scope=scope, tools=[*registered.tools])
                elif body == "call":
                    call = message.call
                    log(
                        "call",
                        request_id=call.request_id,
                        action_id=call.action_id,
                        tool=call.tool,
                        parameters=from_struct(call.parameters),
                        caller_role=options_pb2.CallerRole.Name(call.caller.role),
                        agent_id=call.caller.agent_id,
                    )
                    host.start(call)
                elif body == "cancel":
                    cancel = message.cancel
                    log(
                        "cancel",
                        request_id=cancel.request_id,
                        action_id=cancel.action_id,
                        reason=cancel.reason,
                    )
                    host.cancel(cancel.request_id)
        except grpc.aio.AioRpcError as e:
            # A refused registration (PERMISSION_DENIED, INVALID_ARGUMENT, ...) ends here too.
            fail(e)
        log("end")
        # guide:end
        stdin_closed.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A tool host on ToolService.ServeTools.")
    parser.add_argument("--session", default="", help="serve this session's own tools")
    asyncio.run(main(parser.parse_args().session))
