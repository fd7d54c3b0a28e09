"""Which domain method serves each operation: the router, built once from the domains.

A domain (runs, chats, approvals, ...) declares its handlers by marking its own methods:

    class Runs:
        @handles("runs_start")
        async def start(self, session, req): ...

        @streams("WatchRun")
        async def watch(self, session, req): ...

Marking registers nothing. `wiring.wire` builds the domains and then one `Router` from
them; the router collects the marked methods, bound to their objects, into its tables
and refuses a member two domains claim. So every handler is a method of an object that
was built from explicit dependencies, and the place that serves `tools.list` is the one
method marked `@handles("tools_list")`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from car_grpc.wire import api

if TYPE_CHECKING:
    from car_grpc.core.session import ClientSession


@dataclass
class Reply:
    """A handler's response plus work to start once the response is queued to the client
    (e.g. the pump of a subscription, whose events must not overtake its snapshot)."""

    message: Message
    then: Callable[[], None]
    #: `then` may wait until the response is on its way (on a multiplexed stream: until
    #: the message holding it is written), so that the response leaves first.
    after_written: bool = False


Handler = Callable[["ClientSession", Any], Awaitable[Message | Reply]]
#: A notification handler: a plain function that takes the notification at once and
#: returns None, or returns what is left to wait for (see `handles_notification`).
AtOnceHandler = Callable[["ClientSession", Any], Awaitable[Any] | None]
StreamHandler = Callable[["ClientSession", Any], AsyncIterator[Message]]


class MessageStream(Protocol):
    """A bidirectional stream as a domain sees it (no transport): `read` returns None
    once the peer has finished sending. `write` takes a message, or one already
    serialized (its twins derived: wire/twins.fill_out)."""

    async def read(self) -> Message | None: ...

    async def write(self, message: Message | bytes) -> None: ...


#: A gRPC-only RPC (one without a JSON-RPC method): called with the call's session and
#: the request of a unary RPC (answering its response), or the MessageStream of a bidi
#: one (answering None). Failures are raised as CarError, as everywhere.
GrpcOnlyHandler = Callable[["ClientSession", Any], Awaitable[Message | None]]

F = TypeVar("F", bound=Callable[..., Any])

_REQUEST, _NOTIFICATION, _STREAM, _GRPC_ONLY = "request", "notification", "stream", "grpc_only"
_MARK = "__car_route__"


@dataclass(frozen=True)
class _Route:
    kind: str
    key: str
    inline: bool = False
    fills_in: bool = False


def _mark(route: _Route) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        setattr(fn, _MARK, route)
        return fn

    return mark


def handles(member: str, *, inline: bool = False) -> Callable[[F], F]:
    """Mark the method that serves a ClientFrame request member (e.g. "runs_start").

    `inline`: the handler never waits on anything (no store, no client, no other
    session), so a session stream may run it in its read loop. Such a handler must stay
    that way: one that waited there would stop the stream from reading anything else.
    """
    if member not in api.CLIENT_MEMBERS or api.CLIENT_MEMBERS[member].kind != api.REQUEST:
        raise ValueError(f"{member!r} is not a request member of ClientFrame")
    return _mark(_Route(_REQUEST, member, inline))


def handles_notification(member: str) -> Callable[[F], F]:
    """Mark the method that takes a ClientFrame notification (or binary frame) member.

    A plain function, not a coroutine function (the Router refuses one): it runs at once,
    in the session stream's read loop (no task: the hottest notifications, e.g. chat
    tokens), and must not block: it returns None when done, or an awaitable for what it
    has to wait for (e.g. room in a full buffer, or a coroutine of the rest of its work),
    which the stream then awaits in a task; an asyncio.Future
    needs no task: the stream holds an in-flight slot until it is done (a flood of audio
    waits that way, a future per chunk rather than a task). While work read
    before it still waits to start (a request's task), it runs in a task behind that work
    instead, so it does not overtake it."""
    kind = api.CLIENT_MEMBERS[member].kind if member in api.CLIENT_MEMBERS else None
    if kind not in (api.NOTIFICATION, api.BINARY):
        raise ValueError(f"{member!r} is not a notification member of ClientFrame")
    return _mark(_Route(_NOTIFICATION, member))


def streams(rpc_name: str) -> Callable[[F], F]:
    """Mark the method that serves a server-streaming typed RPC (e.g. "WatchRun")."""
    if not any(r.name == rpc_name and r.server_streaming for r in api.TYPED_RPCS):
        raise ValueError(f"{rpc_name!r} is not a server-streaming typed RPC")
    return _mark(_Route(_STREAM, rpc_name))


def grpc_only(full_name: str, *, fills_in: bool = False) -> Callable[[F], F]:
    """Mark the method that serves an RPC without a JSON-RPC method
    (e.g. "car.v1.VoiceService.ServeVoice").

    `fills_in`: the handler fills in the typed twins (wire/twins.py) of what it reads
    itself, so its requests come as parsed: for a hot stream whose messages it takes
    apart anyway (a voice engine's), where the walk of every message costs."""
    descriptor_pool.Default().FindMethodByName(full_name)  # KeyError when unknown
    return _mark(_Route(_GRPC_ONLY, full_name, fills_in=fills_in))


class Router:
    """Every handler of the core, by what it serves, bound to its domain object."""

    def __init__(self, domains: Iterable[object]) -> None:
        self.requests: dict[str, Handler] = {}
        #: Request members whose handlers never wait (see `handles`).
        self.inline: set[str] = set()
        #: Notification handlers, by member (see handles_notification).
        self.at_once: dict[str, AtOnceHandler] = {}
        self.streams: dict[str, StreamHandler] = {}
        self.grpc_only: dict[str, GrpcOnlyHandler] = {}
        #: gRPC-only RPCs whose handlers fill in their requests' twins (see `grpc_only`).
        self.fills_in: set[str] = set()
        tables: dict[str, dict[str, Any]] = {
            _REQUEST: self.requests,
            _NOTIFICATION: self.at_once,
            _STREAM: self.streams,
            _GRPC_ONLY: self.grpc_only,
        }
        for domain in domains:
            for name, fn in inspect.getmembers(type(domain), inspect.isfunction):
                route: _Route | None = getattr(fn, _MARK, None)
                if route is None:
                    continue
                table = tables[route.kind]
                if route.key in table:
                    raise ValueError(f"two handlers for {route.key!r}")
                if route.kind == _NOTIFICATION and inspect.iscoroutinefunction(fn):
                    raise ValueError(
                        f"the handler of {route.key!r} is a coroutine function: a "
                        "notification's is a plain function (it may return an awaitable)"
                    )
                table[route.key] = getattr(domain, name)
                if route.inline:
                    self.inline.add(route.key)
                if route.fills_in:
                    self.fills_in.add(route.key)

    def unserved(self) -> list[str]:
        """Request members no domain serves (a wiring mistake; the tests check none)."""
        return sorted(m.field for m in api.CLIENT_REQUESTS.values() if m.field not in self.requests)
