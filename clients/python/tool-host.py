"""A tool host on the session stream (SessionService.Connect): it registers its tools on
its session, submits a proposal that calls them, and answers the server's `tools.execute`
callbacks on the same stream. (serve-tools.py is the simpler typed way to host tools.)

    python tool-host.py        # authenticates with the daemon token file (or CAR_AUTH_TOKEN)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from car import (
    JSON,
    CarError,
    Session,
    channel,
    daemon_token,
    fail,
    from_struct,
    from_value,
    log,
    metadata,
    to_struct,
    to_value,
)

from car_grpc.v1 import errors_pb2, session_pb2, tools_pb2, tools_pb2_grpc
from car_grpc.v1.session_pb2 import ClientFrame, ServerFrame


# The tools this host implements: parameters in, output out (any JSON), or an exception.
def num(value: JSON) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def divide(params: dict[str, JSON]) -> JSON:
    if num(params.get("b")) == 0:
        raise ValueError("division by zero")
    return num(params.get("a")) / num(params.get("b"))


TOOLS: dict[str, Callable[[dict[str, JSON]], JSON]] = {
    "add": lambda params: num(params.get("a")) + num(params.get("b")),
    "divide": divide,
}
NUMBERS: dict[str, JSON] = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
}


def tool_call(action_id: str, tool: str, parameters: dict[str, JSON]) -> tools_pb2.Action:
    return tools_pb2.Action(
        id=action_id,
        type=tools_pb2.ACTION_TYPE_TOOL_CALL,
        tool=tool,
        parameters=to_struct(parameters),
    )


async def main() -> None:
    token = daemon_token()
    async with channel() as ch:
        session = Session(ch)

        # One tools.execute callback (ExecuteToolRequest): run the tool, answer with its
        # output (ClientFrame.tools_execute) or with an error (ClientFrame.error). An error
        # with data {terminal: true} would also abort the proposal and halt the session.
        async def on_request(frame: ServerFrame) -> None:
            if frame.WhichOneof("body") != "tools_execute":
                method = frame.WhichOneof("body")
                error = errors_pb2.Error(code=-32601, message=f"unknown method: {method}")
                await session.send(ClientFrame(id=frame.id, error=error))
                return
            call = frame.tools_execute
            try:
                output = TOOLS[call.tool](from_struct(call.parameters))
            except Exception as e:
                error = errors_pb2.Error(code=-32603, message=str(e))
                await session.send(ClientFrame(id=frame.id, error=error))
            else:
                executed = tools_pb2.ExecuteToolResponse(output=to_value(output))
                await session.send(ClientFrame(id=frame.id, tools_execute=executed))

        session.on_request = on_request
        try:
            auth = session_pb2.AuthenticateRequest(token=token)
            authed = (await session.request(ClientFrame(session_auth=auth))).session_auth
            handshake = session_pb2.HandshakeRequest(
                protocol_version_number=3, client_version="car-grpc-python-examples"
            )
            await session.request(ClientFrame(server_handshake=handshake))
            register = tools_pb2.RegisterToolsRequest(
                tools=[
                    tools_pb2.ToolDefinition(
                        name="add", description="a + b", parameters=to_struct(NUMBERS)
                    ),
                    tools_pb2.ToolDefinition(
                        name="divide", description="a / b", parameters=to_struct(NUMBERS)
                    ),
                ]
            )
            count = (await session.request(ClientFrame(tools_register=register))).tools_register
            # A typed RPC bound to this session (car-session-id) sees the tools just registered.
            bound = metadata(token, session_id=authed.session_id)
            tools = tools_pb2_grpc.ToolServiceStub(ch)
            listed = await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=bound, timeout=10)
            log("registered", count=count.count, tools=[tool.name for tool in listed.tools])

            # `half` uses the output of `sum` ("$sum.output"), so the server runs it after
            # `sum`; `oops` fails and, with failure_behavior skip, does not abort the others.
            oops = tool_call("oops", "divide", {"a": 1, "b": 0})
            oops.failure_behavior = tools_pb2.FAILURE_BEHAVIOR_SKIP
            proposal = tools_pb2.ActionProposal(
                id="python-proposal",
                actions=[
                    tool_call("sum", "add", {"a": 2, "b": 3}),
                    tool_call("half", "divide", {"a": "$sum.output", "b": 2}),
                    oops,
                ],
            )
            submit = tools_pb2.SubmitProposalRequest(proposal=proposal)
            answer = await session.request(ClientFrame(proposal_submit=submit), timeout=30)
            result = answer.proposal_submit.result
            log(
                "result",
                proposal_id=result.proposal_id,
                results=[
                    {
                        "action_id": r.action_id,
                        "status": tools_pb2.ActionStatus.Name(r.status),
                        "output": from_value(r.output),
                        "error": r.error if r.HasField("error") else None,
                    }
                    for r in result.results
                ],
                tool_calls=result.cost.tool_calls,
            )
        except (CarError, grpc.aio.AioRpcError) as e:
            fail(e)
        session.close()


if __name__ == "__main__":
    asyncio.run(main())
