"""Tool hosts: tools served over the typed stream ToolService.ServeTools (tools.proto,
"Tool hosts"), beside the `tools.execute` callbacks of a session's own client.

A tool host (`ToolHost`) is one ServeTools stream. It registers its tools in its first
message, then gets one `call` per tool call and answers each with a `result`. Its tools
reach as far as its stream is bound:

- bound to a live session (`car-session-id`): they are that session's tools, called by
  that session's proposals only and listed by its `tools.list`;
- not bound: they are shared by name with every authenticated session, for the names the
  session has not registered itself. Only the daemon token and the host role may serve
  them (an attached agent would see every session's parameters and feed every session's
  state: a confused deputy).

`ToolHosts.call_tool` gives `proposal.submit` the executor's CallTool for one proposal:
for each attempt it resolves the tool (a host bound to the session, the session's own
registered tool, a shared host, else the session's stream) and calls it there.

Everything is bounded per host: tools, calls sent and not answered (count and bytes; one
more fails at once), cancels queued (dropped beyond the same bounds), the time a write may
block (a host that stops reading is dropped, like a stalled voice engine) and the time to
register. When a host's stream ends its waiting calls fail at once and its tools are gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from car_grpc.core import proposals
from car_grpc.core.metrics import Metrics
from car_grpc.core.proposals import CallTool, ToolFailed, ToolInvocation
from car_grpc.core.router import MessageStream, grpc_only
from car_grpc.core.session import ClientSession, Role
from car_grpc.v1 import tools_pb2
from car_grpc.wire.codec import JSON, to_struct, value_to_json
from car_grpc.wire.errors import (
    INTERNAL,
    CarError,
    already_exists,
    failed_precondition,
    invalid_params,
    permission_denied,
    resource_exhausted,
)

log = logging.getLogger(__name__)

ServeToolsResponse = tools_pb2.ServeToolsResponse
SESSION = tools_pb2.TOOL_SCOPE_SESSION
SHARED = tools_pb2.TOOL_SCOPE_SHARED
#: Longest host or tool name.
MAX_NAME = 128
#: The label of host calls in the callback latency histogram.
METRIC_METHOD = "ToolService.ServeTools"


@dataclass(frozen=True)
class ToolHostLimits:
    """CoreConfig's tool host fields (tools.proto, "Bounds")."""

    max_hosts: int
    max_tools: int
    max_pending: int
    max_pending_bytes: int
    stall_timeout: float
    register_timeout: float


class HostGone(Exception):
    """The host's stream ended while a call waited for its result."""


@dataclass(eq=False)
class _Call:
    """A call sent (or queued) to a host and not answered yet."""

    message: tools_pb2.ToolCall
    size: int
    future: asyncio.Future[tools_pb2.ToolResult]
    written: bool = False
    sent_at: float = field(default_factory=time.perf_counter)


def scope_name(scope: tools_pb2.ToolScope.ValueType) -> str:
    return tools_pb2.ToolScope.Name(scope).removeprefix("TOOL_SCOPE_").lower()


class ToolHost:
    """One ServeTools stream: its tools, its calls waiting for a result, and the one task
    that writes to it (calls and cancels, in order, each write bounded by the stall
    timeout)."""

    def __init__(
        self,
        name: str,
        scope: tools_pb2.ToolScope.ValueType,
        tools: list[tools_pb2.ToolDefinition],
        stream: MessageStream,
        limits: ToolHostLimits,
        metrics: Metrics,
        owner: ClientSession | None,
    ) -> None:
        self.name = name
        self.scope = scope
        self.tools = {t.name: t for t in tools}
        self.stream = stream
        self.limits = limits
        self._metrics = metrics
        #: The session whose tools these are (scope SESSION), else None.
        self.owner = owner
        #: request_id -> the call, from when it is queued until it is answered or given up.
        self.pending: dict[str, _Call] = {}
        self.pending_bytes = 0
        #: What the writer sends next: calls (counted in `pending`) and cancels.
        self._outbox: deque[_Call | tools_pb2.ToolCancel] = deque()
        self._cancels = 0
        self._cancel_bytes = 0
        self._wakeup = asyncio.Event()
        self.gone = False
        #: Set when the stream must end; `failure` says how, if it is the server's doing.
        self.done = asyncio.Event()
        self.failure: CarError | None = None

    # -------------------------------------------------------------- calls

    async def call(self, request: tools_pb2.ToolCall, wait: float) -> JSON:
        """Send one call and wait (at most `wait` seconds) for its result. ToolFailed when
        the host answers with an error, does not answer in time, is busy or goes away;
        a cancelled caller sends the host a cancel with the cancellation's reason."""
        if self.gone:
            raise ToolFailed(self.gone_reason())
        limits, size = self.limits, request.ByteSize()
        if len(self.pending) >= limits.max_pending:
            raise ToolFailed(
                f"tool host '{self.name}' has {len(self.pending)} calls pending: "
                f"tool_host_max_pending ({limits.max_pending})"
            )
        if self.pending and self.pending_bytes + size > limits.max_pending_bytes:
            raise ToolFailed(
                f"tool host '{self.name}' has {self.pending_bytes} bytes of calls pending: "
                f"tool_host_max_pending_bytes ({limits.max_pending_bytes})"
            )
        call = _Call(request, size, asyncio.get_running_loop().create_future())
        self.pending[request.request_id] = call
        self.pending_bytes += size
        self._outbox.append(call)
        self._wakeup.set()
        try:
            async with asyncio.timeout(wait):
                result = await call.future
        except TimeoutError:
            self._give_up(call, proposals.CANCEL_TIMEOUT)
            raise ToolFailed(proposals.timed_out(request.tool, wait)) from None
        except HostGone:
            raise ToolFailed(self.gone_reason()) from None
        except asyncio.CancelledError as e:
            self._give_up(call, proposals.cancel_reason(e))
            raise
        finally:
            self._forget(call)
        self._metrics.callback_seconds.observe(time.perf_counter() - call.sent_at, METRIC_METHOD)
        outcome = result.WhichOneof("outcome")
        if outcome == "error":
            message = result.error.message or f"tool '{request.tool}' failed"
            raise ToolFailed(message, terminal=result.error.terminal)
        if outcome == "output":
            return value_to_json(result.output)
        return None

    def disconnected(self) -> str:
        return f"tool host '{self.name}' disconnected"

    def gone_reason(self) -> str:
        """Why the host is gone: the server's reason for ending it, else a disconnect."""
        return self.failure.message if self.failure is not None else self.disconnected()

    def _forget(self, call: _Call) -> None:
        if self.pending.pop(call.message.request_id, None) is call:
            self.pending_bytes -= call.size

    def _give_up(self, call: _Call, reason: str) -> None:
        """The caller no longer waits: an unwritten call is not sent at all, a written one
        gets a cancel (dropped when the cancels queued are at the host's bounds)."""
        if not call.written:
            try:
                self._outbox.remove(call)
            except ValueError:
                pass  # the writer holds it right now: it is written, and cancelled below
            else:
                return
        if self.gone:
            return
        cancel = tools_pb2.ToolCancel(
            request_id=call.message.request_id, action_id=call.message.action_id, reason=reason
        )
        size = cancel.ByteSize()
        if (
            self._cancels >= self.limits.max_pending
            or self._cancel_bytes + size > self.limits.max_pending_bytes
        ):
            self._metrics.queue_drops.inc("tool_host_cancels")
            return
        self._cancels += 1
        self._cancel_bytes += size
        self._outbox.append(cancel)
        self._wakeup.set()

    def resolve(self, result: tools_pb2.ToolResult) -> None:
        """A result from the host: it completes its call (late and unknown ids are ignored)."""
        call = self.pending.get(result.request_id)
        if call is not None and call.written and not call.future.done():
            call.future.set_result(result)

    # -------------------------------------------------------------- the stream

    async def send(self, message: ServeToolsResponse) -> bool:
        """Write one message, waiting at most the stall timeout; False when the host is
        gone (or stalled now, and dropped)."""
        if self.gone:
            return False
        try:
            async with asyncio.timeout(self.limits.stall_timeout):
                await self.stream.write(message)
        except TimeoutError:
            self.fail(
                resource_exhausted(
                    f"tool host '{self.name}' not reading: a message waited "
                    f"{self.limits.stall_timeout:g}s"
                )
            )
            return False
        except Exception as e:  # the call ended under us
            log.debug("tool host %s: write failed: %r", self.name, e)
            self.end()
            return False
        return True

    async def write_loop(self) -> None:
        """Send what is queued, in order, until the host is gone."""
        while not self.gone:
            while self._outbox:
                item = self._outbox.popleft()
                if isinstance(item, _Call):
                    item.written = True
                    message = ServeToolsResponse(call=item.message)
                else:
                    self._cancels -= 1
                    self._cancel_bytes -= item.ByteSize()
                    message = ServeToolsResponse(cancel=item)
                if not await self.send(message):
                    return
            self._wakeup.clear()
            await self._wakeup.wait()  # until more is queued; cancelled when the host ends

    async def read_loop(self) -> None:
        """Take the host's results until its stream ends (or it breaks the protocol)."""
        try:
            while True:
                message = await self.stream.read()
                if message is None:
                    return
                assert isinstance(message, tools_pb2.ServeToolsRequest)
                body = message.WhichOneof("body")
                if body == "register":
                    self.fail(invalid_params("register may be sent only once"))
                    return
                if body == "result":
                    self.resolve(message.result)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("tool host %s: reading its stream failed: %r", self.name, e)
        finally:
            self.end()

    def fail(self, error: CarError) -> None:
        """End the host's stream with `error` (the first failure wins)."""
        if self.failure is None and not self.gone:
            self.failure = error
        self.end()

    def end(self) -> None:
        self.gone = True
        self.done.set()
        self._wakeup.set()

    def close(self) -> None:
        """The stream is over: every call still waiting fails at once."""
        self.end()
        for call in list(self.pending.values()):
            if not call.future.done():
                call.future.set_exception(HostGone(self.name))
        self._outbox.clear()


def _checked(tools: list[tools_pb2.ToolDefinition], limit: int) -> list[tools_pb2.ToolDefinition]:
    """Copies of a registration's tools, or INVALID_ARGUMENT naming the problem."""
    if not tools:
        raise invalid_params("invalid params: register needs at least one tool: tools")
    if len(tools) > limit:
        raise invalid_params(
            f"invalid params: a tool host serves at most {limit} tools "
            f"(tool_host_max_tools), got {len(tools)}: tools"
        )
    seen: set[str] = set()
    checked = []
    for i, tool in enumerate(tools):
        if not 0 < len(tool.name) <= MAX_NAME:
            raise invalid_params(
                f"invalid params: a tool name has 1 to {MAX_NAME} characters: tools[{i}].name"
            )
        if tool.name in seen:
            raise invalid_params(f"invalid params: duplicate tool '{tool.name}': tools[{i}].name")
        seen.add(tool.name)
        checked.append(kept_tool(tool))
    return checked


def kept_tool(tool: tools_pb2.ToolDefinition) -> tools_pb2.ToolDefinition:
    """A copy of `tool` as it is kept and listed: its parameters `{}` when not given."""
    copy = tools_pb2.ToolDefinition()
    copy.CopyFrom(tool)
    copy.parameters.SetInParent()
    return copy


class ToolHosts:
    """The tool hosts of one core: shared tools by name, session tools by session."""

    def __init__(
        self,
        limits: ToolHostLimits,
        metrics: Metrics,
        *,
        tool_timeout: float,
        callback_grace: float,
        auth_enabled: bool,
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        self._tool_timeout = tool_timeout
        self._grace = callback_grace
        self._auth_enabled = auth_enabled
        #: Shared tool name -> the host serving it.
        self.shared: dict[str, ToolHost] = {}
        #: Session id -> its tools served by hosts bound to it. The key stays while the
        #: session lives: it marks the session's close hook as registered.
        self._bound: dict[str, dict[str, ToolHost]] = {}
        self.hosts: set[ToolHost] = set()
        self._host_numbers = itertools.count(1)
        self._request_ids = itertools.count(1)

    # -------------------------------------------------------------- lookups

    def bound_host(self, session: ClientSession, name: str) -> ToolHost | None:
        """The host bound to `session` that serves its tool `name`, if any."""
        return self._bound.get(session.id, {}).get(name)

    def resolve(self, session: ClientSession, name: str) -> ToolHost | None:
        """The host that serves `session`'s call of tool `name`: one bound to the session;
        else, unless the session registered the name itself, a shared one; else None (the
        call goes to the session's own client)."""
        host = self.bound_host(session, name)
        if host is not None:
            return host
        if name in session.tools:
            return None
        return self.shared.get(name)

    def session_tools(self, session: ClientSession) -> list[tools_pb2.ToolDefinition]:
        """The tools hosts bound to `session` serve."""
        return [host.tools[name] for name, host in self._bound.get(session.id, {}).items()]

    def refuse_hosted(self, session: ClientSession, names: list[str], path: str) -> None:
        """-32602 when a host bound to `session` serves one of `names`: its client may not
        register or remove that tool while the host serves it."""
        for i, name in enumerate(names):
            host = self.bound_host(session, name)
            if host is not None:
                field = path.format(i=i)
                raise invalid_params(
                    f"invalid params: tool '{name}' is served by tool host '{host.name}' "
                    f"bound to this session: {field}"
                )

    def call_tool(
        self,
        session: ClientSession,
        *,
        proposal_id: str,
        label: str | None,
        fallback: CallTool | None,
    ) -> CallTool:
        """The executor's CallTool for one proposal of `session`: each attempt goes to the
        host that serves the tool then, else to `fallback` (the session's own client;
        None for a session without a stream, whose call then fails)."""

        async def call(inv: ToolInvocation) -> JSON:
            host = self.resolve(session, inv.tool)
            if host is None:
                if fallback is None:
                    raise ToolFailed(f"no tool host serves tool '{inv.tool}'")
                return await fallback(inv)
            request = tools_pb2.ToolCall(
                request_id=f"tc-{next(self._request_ids)}",
                action_id=inv.action_id,
                tool=inv.tool,
                parameters=to_struct(inv.parameters),
                attempt=inv.attempt,
                proposal_id=proposal_id,
            )
            request.caller.role = session.role.value
            if session.agent_id is not None:
                request.caller.agent_id = session.agent_id
            if inv.timeout_ms is not None:
                request.timeout_ms = inv.timeout_ms
            if label is not None:
                request.session_id = label
            wait = self._tool_timeout
            if inv.timeout_ms is not None:
                wait = inv.timeout_ms / 1000 + self._grace
            return await host.call(request, wait)

        return call

    # -------------------------------------------------------------- the host stream

    async def serve(self, session: ClientSession, stream: MessageStream) -> None:
        """Run one host's ServeTools stream until it ends; raises CarError when the server
        ends it (a bad registration, a stalled host, its session gone)."""
        if self._auth_enabled and not session.streaming and session.role is Role.AGENT:
            raise permission_denied(
                "permission denied: shared tools (ServeTools without car-session-id) need "
                "the daemon token or the host role; an attached agent serves only its own "
                "session's tools"
            )
        host = await self._register(session, stream)
        if host is None:
            return
        reader = asyncio.create_task(host.read_loop())
        writer = asyncio.create_task(host.write_loop())
        try:
            await host.done.wait()
        finally:
            reader.cancel()
            writer.cancel()
            self._remove(host)
            host.close()
            log.info("tool host %s gone: %s", host.name, host.gone_reason())
        if host.failure is not None:
            raise host.failure

    async def _register(self, session: ClientSession, stream: MessageStream) -> ToolHost | None:
        wait = self.limits.register_timeout
        try:
            async with asyncio.timeout(wait):
                first = await stream.read()
        except TimeoutError:
            raise invalid_params(f"register within {wait:g}s of connecting") from None
        if first is None:
            return None
        assert isinstance(first, tools_pb2.ServeToolsRequest)
        if first.WhichOneof("body") != "register":
            raise invalid_params("the first message must be `register`")
        register = first.register
        scope = SESSION if session.streaming else SHARED
        if register.scope not in (tools_pb2.TOOL_SCOPE_UNSPECIFIED, scope):
            raise invalid_params(
                "scope session needs a stream bound with car-session-id"
                if register.scope == SESSION
                else "scope shared needs a stream without car-session-id"
            )
        if len(register.host) > MAX_NAME:
            raise invalid_params(f"invalid params: a host name has at most {MAX_NAME} characters")
        tools = _checked(list(register.tools), self.limits.max_tools)
        name = register.host or f"tool-host-{next(self._host_numbers)}"
        for tool in tools:
            self._refuse_taken(session, scope, tool.name)
        if len(self.hosts) >= self.limits.max_hosts:
            raise resource_exhausted(
                f"too many tool hosts: at most {self.limits.max_hosts} (tool_hosts_max)"
            )
        if scope == SESSION and session.closed.is_set():
            raise failed_precondition(INTERNAL, "the session this tool host binds to has ended")
        owner = session if scope == SESSION else None
        host = ToolHost(name, scope, tools, stream, self.limits, self._metrics, owner)
        self._add(host)
        registered = tools_pb2.ToolHostRegistered(
            host=name, scope=scope, tools=[t.name for t in tools]
        )
        if not await host.send(ServeToolsResponse(registered=registered)):
            self._remove(host)
            if host.failure is not None:
                raise host.failure
            return None
        log.info("tool host %s serves %s tools: %s", name, scope_name(scope), ", ".join(host.tools))
        return host

    def _refuse_taken(
        self, session: ClientSession, scope: tools_pb2.ToolScope.ValueType, name: str
    ) -> None:
        """ALREADY_EXISTS when someone already serves `name` in `scope`."""
        if scope == SHARED:
            other = self.shared.get(name)
            if other is not None:
                raise already_exists(f"tool '{name}' is served by tool host '{other.name}'")
            return
        host = self.bound_host(session, name)
        if host is not None:
            raise already_exists(
                f"tool '{name}' of this session is served by tool host '{host.name}'"
            )
        if name in session.tools:
            raise already_exists(f"tool '{name}' is registered by this session's client")

    def _add(self, host: ToolHost) -> None:
        self.hosts.add(host)
        if host.owner is None:
            for name in host.tools:
                self.shared[name] = host
            return
        owner = host.owner
        if owner.id not in self._bound:
            self._bound[owner.id] = {}
            owner.on_close(self._session_closed)
        for name in host.tools:
            self._bound[owner.id][name] = host

    def _remove(self, host: ToolHost) -> None:
        self.hosts.discard(host)
        table = self.shared if host.owner is None else self._bound.get(host.owner.id, {})
        for name in host.tools:
            if table.get(name) is host:
                del table[name]

    def _session_closed(self, session: ClientSession) -> None:
        for host in set(self._bound.pop(session.id, {}).values()):
            host.fail(failed_precondition(INTERNAL, "the session this tool host serves has ended"))

    # ------------------------------------------------------------ handlers

    @grpc_only("car.v1.ToolService.ServeTools")
    async def serve_tools(self, session: ClientSession, stream: MessageStream) -> None:
        await self.serve(session, stream)
