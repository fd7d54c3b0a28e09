"""Tools and proposals on a session (docs/protocol.md §3): session.init, session.clear_halt,
tools.register/list/unregister and proposal.submit.

proposal.submit runs the executor (proposals.py) with a tool caller bound to the session:
each tool call is a server-initiated `tools.execute` on the session's stream (id and
request_id `cb-N`), waited for at most timeout_ms + callback_grace (or tool_timeout when
the action declares no timeout_ms). Every call given up — timeout, proposal abort,
handler deadline, cancelled RPC — sends the notification `tools.cancel`; a late answer is
ignored by the session. A client error answer fails the action with its message; one with
`data.terminal: true` aborts the proposal and halts the session. The most common proposal,
one tool call of the session's own client with nothing to order, retry or time out
(`proposals.lone_call`), runs without the plan and the executor's run (`run_lone`): the
same answer, calls and cancels (tests/test_proposal_lone.py runs both paths).

A tool that a tool host serves (ToolService.ServeTools, tool_hosts.py) is called on that
host instead: a host bound to the session serves the session's own tools (listed by
tools.list; the client cannot register or remove those names), a shared host serves
every session the names it has not registered itself. A call without a session stream
(an unbound typed SubmitProposal) may call hosted tools only.

A halted session runs no proposal: every action of a later proposal comes back
`skipped` with the error HALTED, and no tool is called, until `session.clear_halt` (or a
new session).
"""

from __future__ import annotations

import asyncio
import logging

from car_grpc.core import proposals
from car_grpc.core.policies import checked_policy
from car_grpc.core.proposals import ToolFailed, ToolInvocation
from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession, SessionClosed
from car_grpc.core.tool_hosts import ToolHosts, kept_tool
from car_grpc.v1 import session_pb2, tools_pb2
from car_grpc.wire import proposal_text
from car_grpc.wire.codec import JSON, json_to_struct, value_to_json
from car_grpc.wire.errors import INTERNAL, CarError, field_error, require

log = logging.getLogger(__name__)

HALTED = "session halted by a terminal tool error; call session.clear_halt"


def _checked_tools(
    tools: list[tools_pb2.ToolDefinition], path: str = "tools"
) -> list[tools_pb2.ToolDefinition]:
    """Copies of `tools` (parameters `{}` when not given), or -32602 naming the field."""
    for i, tool in enumerate(tools):
        require(tool.name, f"{path}[{i}].name")
    return [kept_tool(tool) for tool in tools]


class Tools:
    """The session-local operations of §3 but policies and state. `hosts` serve the tools
    of tool hosts; `tool_timeout` bounds a callback without its own timeout_ms;
    `callback_grace` is added to one that has it."""

    def __init__(self, hosts: ToolHosts, tool_timeout: float, callback_grace: float) -> None:
        self._hosts = hosts
        self._tool_timeout = tool_timeout
        self._callback_grace = callback_grace

    # ------------------------------------------------------------ handlers

    @handles("session_init", inline=True)
    async def session_init(
        self, session: ClientSession, req: session_pb2.InitSessionRequest
    ) -> session_pb2.InitSessionResponse:
        tools = _checked_tools(list(req.tools))
        self._hosts.refuse_hosted(session, [t.name for t in tools], "tools[{i}].name")
        policies = [checked_policy(p, f"policies[{i}].") for i, p in enumerate(req.policies)]
        for tool in tools:
            session.tools[tool.name] = tool
        for policy in policies:
            session.policies[policy.name] = policy
        return session_pb2.InitSessionResponse(
            session_id=session.id, tools_registered=len(tools), policies_registered=len(policies)
        )

    @handles("session_clear_halt", inline=True)
    async def session_clear_halt(
        self, session: ClientSession, req: session_pb2.ClearHaltRequest
    ) -> session_pb2.ClearHaltResponse:
        was_halted, session.halted = session.halted, False
        return session_pb2.ClearHaltResponse(cleared=was_halted)

    @handles("tools_register", inline=True)
    async def tools_register(
        self, session: ClientSession, req: tools_pb2.RegisterToolsRequest
    ) -> tools_pb2.RegisterToolsResponse:
        tools = _checked_tools(list(req.tools))
        self._hosts.refuse_hosted(session, [t.name for t in tools], "tools[{i}].name")
        for tool in tools:
            session.tools[tool.name] = tool
        return tools_pb2.RegisterToolsResponse(count=len(tools))

    @handles("tools_list", inline=True)
    async def tools_list(
        self, session: ClientSession, req: tools_pb2.ListToolsRequest
    ) -> tools_pb2.ListToolsResponse:
        tools = sorted(
            [*session.tools.values(), *self._hosts.session_tools(session)], key=lambda t: t.name
        )
        return tools_pb2.ListToolsResponse(tools=tools, count=len(tools))

    @handles("tools_unregister", inline=True)
    async def tools_unregister(
        self, session: ClientSession, req: tools_pb2.UnregisterToolRequest
    ) -> tools_pb2.UnregisterToolResponse:
        name = require(req.name, "name")
        self._hosts.refuse_hosted(session, [name], "name")
        removed = session.tools.pop(name, None) is not None
        return tools_pb2.UnregisterToolResponse(unregistered=name, removed=int(removed))

    @handles("proposal_submit")
    async def proposal_submit(
        self, session: ClientSession, req: tools_pb2.SubmitProposalRequest
    ) -> tools_pb2.SubmitProposalResponse:
        if not req.HasField("proposal"):
            raise field_error("proposal")
        lone = proposals.lone_call(req.proposal)
        if (
            lone is not None
            and session.streaming
            and not session.halted
            and self._hosts.resolve(session, lone.tool) is None
        ):
            return await self._submit_lone(session, req, lone)
        plan = proposals.plan(req.proposal)
        if session.halted:
            return tools_pb2.SubmitProposalResponse(result=proposals.skipped_result(plan, HALTED))
        label = req.session_id if req.HasField("session_id") else None
        fallback = None
        if session.streaming:
            fallback = SessionTools(session, label, self._tool_timeout, self._callback_grace)
        else:
            unserved = sorted(
                {
                    a.tool
                    for a in plan.actions
                    if a.type == tools_pb2.ACTION_TYPE_TOOL_CALL
                    and self._hosts.resolve(session, a.tool) is None
                }
            )
            if unserved:
                names = ", ".join(f"'{name}'" for name in unserved)
                raise CarError(
                    INTERNAL,
                    "proposal.submit calls tools back on a session stream: "
                    "bind the call to a Connect session with car-session-id "
                    f"(no tool host serves {names})",
                )
        call_tool = self._hosts.call_tool(
            session, proposal_id=plan.proposal_id, label=label, fallback=fallback
        )
        outputs: dict[str, JSON] = {}
        result = await proposals.execute(
            plan,
            state=session.kv,
            policies=list(session.policies.values()),
            call_tool=call_tool,
            outputs=outputs,
        )
        if any(r.terminal for r in result.results):
            session.halted = True
        response = tools_pb2.SubmitProposalResponse(result=result)
        if session.bridged:  # car-grpc's gateway: the result's text too (proposal_text.py)
            texts = fallback.texts if fallback is not None else {}
            response.result_text = proposal_text.result_text(result, outputs, texts)
        return response

    async def _submit_lone(
        self, session: ClientSession, req: tools_pb2.SubmitProposalRequest, action: tools_pb2.Action
    ) -> tools_pb2.SubmitProposalResponse:
        """proposal_submit of a proposal that is one tool call of the session's own client
        (`proposals.lone_call`), the most common one: the same answer, its result written
        once, in place, without the plan and the executor's run built for one action."""
        label = req.session_id if req.HasField("session_id") else None
        call_tool = SessionTools(session, label, self._tool_timeout, self._callback_grace)
        response = tools_pb2.SubmitProposalResponse()
        result = response.result
        result.proposal_id = proposals.proposal_id(req.proposal)
        outputs: dict[str, JSON] = {}
        await proposals.run_lone(
            action,
            result,
            state=session.kv,
            policies=list(session.policies.values()),
            call_tool=call_tool,
            outputs=outputs,
        )
        if result.results[0].terminal:
            session.halted = True
        if session.bridged:  # car-grpc's gateway: the result's text too (proposal_text.py)
            response.result_text = proposal_text.result_text(result, outputs, call_tool.texts)
        return response


class SessionTools:
    """The executor's CallTool for one session: tools.execute on the session's stream."""

    def __init__(
        self, session: ClientSession, label: str | None, tool_timeout: float, grace: float
    ) -> None:
        self.session = session
        self.label = label
        self._tool_timeout = tool_timeout
        self._grace = grace
        #: action id -> (the output of its last call answered with a text, that text), from
        #: car-grpc's gateway (ExecuteToolResponse.output_text): written into the result.
        self.texts: dict[str, tuple[JSON, str]] = {}

    async def __call__(self, inv: ToolInvocation) -> JSON:
        wait = self._tool_timeout if inv.timeout_ms is None else inv.timeout_ms / 1000 + self._grace
        request_id = self.session.next_callback_id()
        frame = self.request_frame(inv, request_id)
        try:
            answer = await self.session.call_frame(frame, "tools_execute", wait, twins=False)
        except TimeoutError:
            self._cancel(request_id, inv, proposals.CANCEL_TIMEOUT)
            raise ToolFailed(proposals.timed_out(inv.tool, wait)) from None
        except SessionClosed:
            raise ToolFailed(f"tool '{inv.tool}' callback failed: session closed") from None
        except CarError as e:
            raise ToolFailed(e.message, terminal=_is_terminal(e)) from None
        except asyncio.CancelledError as e:
            self._cancel(request_id, inv, proposals.cancel_reason(e))
            raise
        member = answer.WhichOneof("body")
        if member != "tools_execute":
            raise ToolFailed(f"tool '{inv.tool}' callback was answered with {member}")
        body = answer.tools_execute
        if self.session.bridged and (text := body.output_text):  # (json_internal)
            output = proposal_text.read_output(text)
            self.texts[inv.action_id] = (output, text)
            return output
        return value_to_json(body.output)

    def request_frame(self, inv: ToolInvocation, request_id: str) -> session_pb2.ServerFrame:
        """The call's tools.execute frame, written straight into the frame that goes out (no
        request message to copy in), with its one twin (session_label) written here too:
        no walk of wire/twins.fill_out over it (tests/test_typed_twins.py checks it adds
        nothing)."""
        frame = session_pb2.ServerFrame(id=request_id)
        request = frame.tools_execute
        request.action_id = inv.action_id
        request.tool = inv.tool
        json_to_struct(inv.parameters, request.parameters)
        request.attempt = inv.attempt
        request.request_id = request_id
        if inv.timeout_ms is not None:
            request.timeout_ms = inv.timeout_ms
        if self.label is not None:
            request.session_id = self.label
            if not self.session.bridged:  # its gateway reads no twins (as fill_out skips them)
                request.session_label = self.label
        return frame

    def _cancel(self, request_id: str, inv: ToolInvocation, reason: str) -> None:
        """Send tools.cancel without waiting (a cancelled task must not block on a full
        queue); when the queue is full or the session gone the notice is dropped."""
        notice = tools_pb2.CancelToolNotice(
            request_id=request_id, action_id=inv.action_id, reason=reason
        )
        if not self.session.try_send(session_pb2.ServerFrame(tools_cancel=notice)):
            log.debug("tools.cancel %s not delivered (session full or closed)", request_id)


def _is_terminal(error: CarError) -> bool:
    """Whether a client error answer says `data.terminal: true`."""
    data = error.data
    if data is None or data.WhichOneof("kind") != "struct_value":
        return False
    flag = data.struct_value.fields.get("terminal")
    return flag is not None and flag.WhichOneof("kind") == "bool_value" and flag.bool_value
