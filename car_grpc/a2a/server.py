"""The A2A server: agent cards, JSON-RPC + SSE on the A2A HTTP listener, and
`lf.a2a.v1.A2AService` on the core's gRPC port; every request authenticated by its
caller's bearer token (callers.py) before the a2a-sdk sees it.

    GET  /a2a/<agent_id>/.well-known/agent-card.json   the agent's card (no token needed)
    POST /a2a/<agent_id>                               A2A JSON-RPC, SSE for the streams
    gRPC lf.a2a.v1.A2AService/*                        the agent named by `tenant`

Only attached agents have a card and take messages; a task stays readable (GetTask,
ListTasks) when its agent has gone. The SDK's DefaultRequestHandler runs the protocol;
`AgentsRequestHandler` adds what is ours before a message is taken: the agent is
attached, the caller is under its running-task bound, the message can be carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
import h11
import uvicorn
from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.server.request_handlers import (
    DefaultRequestHandler,
    GrpcHandler,
    GrpcServerCallContextBuilder,
)
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import ServerCallContextBuilder
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.types import a2a_pb2
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    Message,
    SecurityRequirement,
    SecurityScheme,
    SendMessageRequest,
    StringList,
    SubscribeToTaskRequest,
    Task,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT
from a2a.utils.errors import A2AError, InternalError, UnsupportedOperationError
from google.protobuf import message_factory
from google.protobuf.message import Message as ProtoMessage
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from car_grpc.a2a.bridge import BridgeLimits, ChatExecutor, chat_request
from car_grpc.a2a.callers import A2aCallers
from car_grpc.a2a.tasks import AGENT_KEY, CALLER_KEY, A2aTasks, Owner
from car_grpc.config import SERVER_VERSION, CoreConfig
from car_grpc.connection_caps import RETRY_AFTER, PeerCounts, peer_of
from car_grpc.core.chats import Chats
from car_grpc.core.event_buffer import EventBuffer, PutResult
from car_grpc.core.host import Host
from car_grpc.core.registry import SessionRegistry
from car_grpc.store.repositories import A2aClientStore, A2aTaskStore
from car_grpc.wire.errors import CarError

log = logging.getLogger(__name__)

SERVICE = "lf.a2a.v1.A2AService"
#: The security scheme every card declares.
BEARER = "bearer"
#: Seconds between writes of a streamed reply to the store (tasks.py).
FLUSH_INTERVAL = 0.5


@dataclass(frozen=True)
class A2aLimits:
    """CoreConfig's a2a_* bounds."""

    max_body_bytes: int
    task_timeout: float
    reply_max_bytes: int
    tasks_per_caller: int
    stored_tasks_per_caller: int


@dataclass(frozen=True)
class Endpoints:
    """Where peers reach the agents: the HTTP listener's base URL, the gRPC address."""

    http: str
    grpc: str


def not_attached(agent_id: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        message=f"agent '{agent_id}' is not attached: it takes no messages now"
    )


class AgentsRequestHandler(DefaultRequestHandler):
    """The SDK's request handler, with our admission of a message first."""

    def __init__(self, server: A2aServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._server = server

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Message | Task:
        self._server.admit(params, context)
        result: Message | Task = await super().on_message_send(params, context)
        return result

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        self._server.admit(params, context)
        async for event in _promptly(super().on_message_send_stream(params, context)):
            yield event

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        async for event in _promptly(super().on_subscribe_to_task(params, context)):
            yield event


#: What a reader of a task's stream (SSE or gRPC) may fall behind by, in events and in
#: bytes (their serialized size; one larger event alone); one more ends its stream
#: (`_promptly`). It may resubscribe (SubscribeToTask: the task, then what follows).
BEHIND_EVENTS = 256
BEHIND_BYTES = 1024 * 1024


async def _promptly(stream: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """`stream`'s events, taken from the SDK as they come and held here for a reader that
    is behind, at most BEHIND_EVENTS and BEHIND_BYTES; one more ends the reader's stream
    (InternalError saying so). The SDK holds, with each event it keeps for a reader, a
    copy of the whole task (the caller's message, the reply so far), up to 1,024 of
    them: a reader that stopped reading made it hold that many copies of a task of
    megabytes. Ends `stream` (the SDK's subscription) when the reader goes."""
    buffer: EventBuffer[Event | A2AError] = EventBuffer(
        BEHIND_EVENTS, 0.0, limit_bytes=BEHIND_BYTES
    )

    async def take() -> None:
        try:
            async for event in stream:
                if buffer.offer(event, event.ByteSize()) is not PutResult.QUEUED:
                    behind = InternalError(
                        message=f"the reader fell more than {BEHIND_EVENTS} events or"
                        f" {BEHIND_BYTES} bytes behind: resubscribe (SubscribeToTask)"
                    )
                    buffer.close(behind, drop_waiting=True)
                    return
        except A2AError as e:  # the request's refusal (a task not found): the reader's
            buffer.close(e)
        finally:
            buffer.close()
            await stream.aclose()

    taking = asyncio.create_task(take())
    try:
        while (item := await buffer.get()) is not None:
            if isinstance(item, A2AError):
                raise item
            yield item
        await taking  # what it raised, if anything but a refusal
    finally:
        taking.cancel()


class A2aServer:
    """Everything A2A of one core, built in core/wiring.py."""

    def __init__(
        self,
        *,
        chats: Chats,
        registry: SessionRegistry,
        host: Host,
        clients: A2aClientStore,
        tasks: A2aTaskStore,
        limits: A2aLimits,
    ) -> None:
        self._registry = registry
        self._host = host
        self.limits = limits
        self.callers = A2aCallers(clients)
        self.tasks = A2aTasks(
            tasks, flush_interval=FLUSH_INTERVAL, keep_per_caller=limits.stored_tasks_per_caller
        )
        self.executor = ChatExecutor(
            chats,
            registry,
            BridgeLimits(limits.task_timeout, limits.reply_max_bytes, limits.tasks_per_caller),
        )
        template = self._card("agent", Endpoints("http://127.0.0.1/", ""))
        self.handler = AgentsRequestHandler(
            self,
            agent_executor=self.executor,
            task_store=self.tasks,
            agent_card=template,
            extended_agent_card=template,
            extended_card_modifier=self._extended_card,
        )
        #: Set once the listeners are bound (Core.start).
        self.endpoints: Endpoints | None = None

    async def start(self) -> None:
        failed = await self.tasks.fail_unfinished("the server stopped while the task ran")
        if failed:
            log.info("a2a: %d task(s) left running by a stop ended failed", failed)

    async def close(self) -> None:
        """End the running tasks (their chats are cancelled), write what is held back."""
        await self.handler.aclose()
        await self.tasks.flush()

    # ------------------------------------------------------------ admission

    def admit(self, params: SendMessageRequest, context: ServerCallContext) -> None:
        """Raise the A2A error that refuses this message, if any."""
        owner = Owner.of(context)
        if owner.agent_id not in self._registry.attached:
            raise not_attached(owner.agent_id)
        limit = self.limits.tasks_per_caller
        if self.executor.running_for(owner.caller) >= limit:
            raise UnsupportedOperationError(
                message=f"too many tasks: {limit} run at once per caller (a2a_tasks_per_caller)"
            )
        chat_request(owner.agent_id, params.message.task_id or "new", params.message)

    # ------------------------------------------------------------ cards

    def card(self, agent_id: str) -> AgentCard | None:
        """The card of an attached agent; None for any other."""
        if agent_id not in self._registry.attached or self.endpoints is None:
            return None
        return self._card(agent_id, self.endpoints)

    async def _extended_card(self, _card: AgentCard, context: ServerCallContext) -> AgentCard:
        agent_id = Owner.of(context).agent_id
        card = self.card(agent_id)
        if card is None:
            raise not_attached(agent_id)
        return card

    def _card(self, agent_id: str, endpoints: Endpoints) -> AgentCard:
        registered = {a.id: a for a in self._host.agents()}.get(agent_id)
        name = registered.name if registered and registered.name else agent_id
        kind = f" ({registered.kind})" if registered and registered.kind else ""
        skills = [
            AgentSkill(
                id="chat",
                name="chat",
                description=f"Chat with {name}: a message is the prompt, the reply streams back.",
                tags=["chat"],
            )
        ]
        for capability in registered.capabilities if registered else ():
            skills.append(AgentSkill(id=capability, name=capability, tags=[capability]))
        interfaces = [
            AgentInterface(
                url=f"{endpoints.http.rstrip('/')}/a2a/{agent_id}",
                protocol_binding="JSONRPC",
                protocol_version=PROTOCOL_VERSION_CURRENT,
            )
        ]
        if endpoints.grpc:
            interfaces.append(
                AgentInterface(
                    url=endpoints.grpc,
                    protocol_binding="GRPC",
                    protocol_version=PROTOCOL_VERSION_CURRENT,
                    tenant=agent_id,
                )
            )
        return AgentCard(
            name=name,
            description=f"Agent '{agent_id}'{kind}, attached to car-grpc.",
            version=SERVER_VERSION,
            supported_interfaces=interfaces,
            capabilities=AgentCapabilities(
                streaming=True, push_notifications=False, extended_agent_card=True
            ),
            security_schemes={
                BEARER: SecurityScheme(
                    http_auth_security_scheme=HTTPAuthSecurityScheme(
                        scheme="Bearer",
                        description="a token minted for the caller: car-grpc a2a-clients add NAME",
                    )
                )
            },
            security_requirements=[SecurityRequirement(schemes={BEARER: StringList()})],
            default_input_modes=["text/plain", "application/json", "image/png", "image/jpeg"],
            default_output_modes=["text/plain"],
            skills=skills,
        )

    # ------------------------------------------------------------ HTTP

    def json_rpc_dispatcher(self) -> JsonRpcDispatcher:
        """a2a-sdk's JSON-RPC dispatcher on this server's handler, for HTTP requests: the
        listener's, and a session's handed over as one (a2a/sessions.py). v0.3 method
        names (message/send, tasks/get, ...) are served too, as aliases."""
        return JsonRpcDispatcher(
            self.handler, context_builder=_HttpContext(), enable_v0_3_compat=True
        )

    def http_app(self) -> Starlette:
        dispatcher = self.json_rpc_dispatcher()
        max_body = self.limits.max_body_bytes

        async def card(request: Request) -> Response:
            agent_id = request.path_params["agent_id"]
            found = self.card(agent_id)
            if found is None:
                return JSONResponse(
                    {"error": f"agent '{agent_id}' is not attached"}, status_code=404
                )
            return JSONResponse(agent_card_to_dict(found))

        async def rpc(request: Request) -> Response:
            caller = await self.callers.identify(request.headers.get("authorization", ""))
            if caller is None:
                return _unauthenticated()
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_body:
                return _too_large(max_body)
            limited = Request(request.scope, _bounded(request.receive, max_body))
            limited.state.a2a_caller = caller
            # Counted with the core's sessions and streams (max_sessions) until its answer
            # is sent: an SSE stream as long as it streams, message/send its whole task.
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self._registry.holding_stream())
                except CarError as e:
                    return _no_room(e.message)
                response = await dispatcher.handle_requests(limited)
                return _Held(response, held.pop_all())

        return Starlette(
            routes=[
                Route("/a2a/{agent_id}/.well-known/agent-card.json", card, methods=["GET"]),
                Route("/a2a/{agent_id}", rpc, methods=["POST"]),
            ]
        )

    # ------------------------------------------------------------ gRPC

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        """lf.a2a.v1.A2AService, every call authenticated first and its agent its `tenant`."""
        servicer = GrpcHandler(self.handler, context_builder=_GrpcContext())
        service = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"]
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in service.methods:
            behaviour = getattr(servicer, method.name)
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            if method.server_streaming:
                methods[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._grpc_stream(behaviour),
                    request_deserializer=request_class.FromString,
                    response_serializer=response_class.SerializeToString,
                )
            else:
                methods[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._grpc_unary(behaviour),
                    request_deserializer=request_class.FromString,
                    response_serializer=response_class.SerializeToString,
                )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    async def _grpc_owner(
        self, request: ProtoMessage, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Owner:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        caller = await self.callers.identify(metadata.get("authorization", ""))
        if caller is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "unauthenticated: send 'authorization: Bearer <token>' with a token from "
                "car-grpc a2a-clients add",
            )
        limit = self.limits.max_body_bytes
        if request.ByteSize() > limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request over {limit} bytes (a2a_max_body_bytes)",
            )
        agent_id = str(getattr(request, "tenant", ""))
        if not agent_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "tenant: name the agent (its agent_id)"
            )
        assert caller is not None
        return Owner(agent_id, caller)

    def _grpc_unary(
        self, behaviour: Callable[[Any, Any], Awaitable[Any]]
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def call(request: ProtoMessage, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = _GRPC_OWNER.set(await self._grpc_owner(request, context))
            try:
                return await behaviour(request, context)
            finally:
                _GRPC_OWNER.reset(token)

        return call

    def _grpc_stream(
        self, behaviour: Callable[[Any, Any], AsyncIterator[Any]]
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def call(
            request: ProtoMessage, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            _GRPC_OWNER.set(await self._grpc_owner(request, context))
            try:
                # Counted with the core's sessions and streams once the caller is known.
                with self._registry.holding_stream():
                    async for item in behaviour(request, context):
                        yield item
            except CarError as e:  # no room (max_sessions)
                await e.abort(context)

        return call


#: The caller and agent of the gRPC call being served (set before the SDK's servicer runs,
#: read by its context builder in the same task).
_GRPC_OWNER: contextvars.ContextVar[Owner] = contextvars.ContextVar("a2a_grpc_owner")


class _GrpcContext(GrpcServerCallContextBuilder):
    def build(self, context: grpc.aio.ServicerContext[Any, Any]) -> ServerCallContext:
        owner = _GRPC_OWNER.get()
        return ServerCallContext(
            state={"grpc_context": context, AGENT_KEY: owner.agent_id, CALLER_KEY: owner.caller}
        )


class _HttpContext(ServerCallContextBuilder):
    def build(self, request: Request) -> ServerCallContext:
        return ServerCallContext(
            state={
                AGENT_KEY: request.path_params["agent_id"],
                CALLER_KEY: request.state.a2a_caller,
                "headers": dict(request.headers),
            }
        )


def _error(code: int, message: str) -> dict[str, Any]:
    """The JSON-RPC error of an HTTP refusal, which answers no request id."""
    return {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}


def _refused(status: int, code: int, message: str, **headers: str) -> Response:
    """An HTTP refusal before the request is read, its body a JSON-RPC error."""
    return JSONResponse(_error(code, message), status_code=status, headers=headers)


def _refused_raw(status: int, code: int, message: str, **headers: str) -> bytes:
    """The same refusal written by the connection itself (no request, or none the app
    answers), after which the connection is closed."""
    body = json.dumps(_error(code, message)).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    fields = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    head += [f"{name}: {value}" for name, value in fields.items()]
    head += ["Connection: close", "", ""]
    return "\r\n".join(head).encode() + body


def _unauthenticated() -> Response:
    message = (
        "unauthenticated: send 'Authorization: Bearer <token>' with a token from car-grpc"
        " a2a-clients add"
    )
    return _refused(401, -32600, message, **{"WWW-Authenticate": 'Bearer realm="a2a"'})


def _too_large(limit: int) -> Response:
    return _refused(413, -32600, f"request body over {limit} bytes")


def _no_room(message: str) -> Response:
    """The core holds max_sessions sessions and streams already: 503, as the gateway
    refuses a connection at its caps."""
    return _refused(503, -32603, message, **{"Retry-After": str(RETRY_AFTER)})


class _Held(Response):
    """`response`, sent with `held` (its slot under max_sessions) released once it is sent
    or the client is gone, however it ends."""

    def __init__(self, response: Response, held: contextlib.ExitStack) -> None:
        # A whole Response, whose status and headers are what `response` sends (its body,
        # which may stream, and its background task are `response`'s to send and run).
        super().__init__(status_code=response.status_code)
        self.raw_headers = response.raw_headers
        self._response = response
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._held:
            await self._response(scope, receive, send)


def _bounded(
    receive: Callable[[], Awaitable[AsgiMessage]], limit: int
) -> Callable[[], Awaitable[AsgiMessage]]:
    """`receive` that fails (413, which the SDK answers as a JSON-RPC error) once the body
    goes past `limit` bytes: a body sent without Content-Length is bounded too. A client
    gone before the body's end (or cut off at a2a_body_timeout) fails it too, quietly:
    the SDK would log its ClientDisconnect as an unhandled exception."""
    seen = 0
    whole = False

    async def bounded() -> AsgiMessage:
        nonlocal seen, whole
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            whole = not message.get("more_body", False)
        elif not whole:  # nobody to answer
            raise HTTPException(400, "the client went before its request body's end")
        return message

    return bounded


#: Seconds a connection refused at a2a_max_connections_per_peer is kept once its 503 is
#: written, for the client's request to come: read, so closing sends no reset that could
#: take the answer with it.
REFUSED_LINGER = 1.0

#: Connections the A2A HTTP listener holds at once (each runs one request at a time, so
#: this bounds its requests too); one more is answered 503 as at the per-peer cap.
MAX_CONNECTIONS = 256


@dataclass(frozen=True)
class ListenerLimits:
    """What the A2A HTTP listener bounds that uvicorn does not: the time to send a request
    head and a request body, and its connections, in all and of one peer."""

    head_timeout: float = 5.0
    body_timeout: float = CoreConfig.a2a_body_timeout
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_peer: int = CoreConfig.a2a_max_connections_per_peer


def _http_protocol(limits: ListenerLimits) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 with `limits`. uvicorn times out only kept-alive connections
    idle after a response, and any byte that comes stops that timer: a connection that
    never sends a whole request head, or a body a byte at a time, would be held for good.
    Its `max_connections` are open to anyone before a token is read, so one peer may hold
    at most `max_connections_per_peer` of them."""
    served = PeerCounts()  # connections served, by peer
    refused = PeerCounts()  # connections answered 503 at a cap, until closed
    cap, total = limits.max_connections_per_peer, limits.max_connections

    class Http(H11Protocol):
        _counts: PeerCounts | None = None
        _deadline: asyncio.TimerHandle | None = None
        _phase: tuple[object, object] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._peer = peer_of(transport.get_extra_info("peername"))
            if served.of(self._peer) >= cap:
                message = (
                    f"too many connections from {self._peer or 'the Unix socket'}: at most"
                    f" {cap} (a2a_max_connections_per_peer)"
                )
            elif served.total >= total:
                message = f"too many connections: at most {total} (the A2A listener's)"
            else:
                self._counts = served
                served.add(self._peer)
                self._watch()
                return
            # Refused before it asks: not one of uvicorn's connections, answered at once,
            # closed once its request has come; as many apart, then closed at once.
            self.connections.discard(self)
            retry = {"Retry-After": str(RETRY_AFTER)}
            self.transport.write(_refused_raw(503, -32603, message, **retry))
            if refused.of(self._peer) >= cap or refused.total >= total:
                self.transport.close()
                return
            self._counts = refused
            refused.add(self._peer)
            self._deadline = self.loop.call_later(REFUSED_LINGER, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if self._counts is not served:  # refused: its request has come
                self.transport.close()
                return
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def _should_upgrade(self) -> bool:
            # No WebSocket here: an upgrade would hand the connection to another protocol
            # object, never counted out (nor logged as refused); it is a plain request.
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            if self._counts is not None:
                self._counts.remove(self._peer)
                self._counts = None
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Keep a deadline on what the connection waits for from its client: a request
            head (head_timeout), the rest of a request's body (body_timeout from its
            head, answered or not); none while a request is being answered."""
            state = self.conn.their_state
            if (state, self.cycle) == self._phase:
                return
            self._phase = (state, self.cycle)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if state is h11.IDLE:
                self._deadline = self.loop.call_later(limits.head_timeout, self._head_overdue)
            elif state is h11.SEND_BODY:
                self._deadline = self.loop.call_later(limits.body_timeout, self._body_overdue)

        def _head_overdue(self) -> None:
            self.transport.close()

        def _body_overdue(self) -> None:
            cycle = self.cycle
            if not cycle.response_started and not self.transport.is_closing():
                cycle.disconnected = True  # the app's answer, if it comes, goes nowhere
                message = (
                    f"request body not received within {limits.body_timeout:g} s (a2a_body_timeout)"
                )
                self.transport.write(_refused_raw(408, -32600, message))
            self.transport.close()

    return Http


class A2aListener:
    """The A2A HTTP listener: the app on uvicorn, on a socket bound here (so a port in use
    is an OSError at start, and port 0 works)."""

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        limits: ListenerLimits = ListenerLimits(),
    ) -> None:
        self._limits = limits
        self._app = app
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._main: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family)
        config = uvicorn.Config(
            self._app,
            http=_http_protocol(self._limits),
            lifespan="off",
            log_config=None,
            access_log=False,
            # Bounds: a request head's size (its time, a body's, the connections: above),
            # idle keep-alive connections. No limit_concurrency: its 503 would name no
            # limit and ask for no wait (the listener's MAX_CONNECTIONS bound it instead).
            h11_max_incomplete_event_size=16 * 1024,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
        )
        config.load()
        config.ssl = self._ssl
        server = uvicorn.Server(config)
        # What Server.serve() does before startup(); serve() itself is not used because it
        # takes over SIGINT/SIGTERM, which belong to the process (cli.py).
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._socket, self._server = sock, server
        self._main = asyncio.create_task(server.main_loop())
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        server, main, sock = self._server, self._main, self._socket
        self._server = self._main = self._socket = None
        if server is None or main is None or sock is None:
            return
        server.should_exit = True
        await main
        await server.shutdown(sockets=[sock])
        sock.close()


__all__ = ["A2aLimits", "A2aListener", "A2aServer", "Endpoints", "ListenerLimits"]
