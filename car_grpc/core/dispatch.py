"""Handlers and the one dispatch path that both the session stream and typed RPCs use.

Domain modules register a handler per ClientFrame request member with `@handles(member)`.
`execute` runs one request for a session: the declared access rule (options.proto
`Access`, read off the request's ClientFrame member: roles and handshake), the approval
gate, the handler under its deadline, and the mapping of every failure to a CarError.
`check_access` is the same rule for the RPCs that do not go through `execute` (server
streams and gRPC-only RPCs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from car_grpc import api
from car_grpc.errors import (
    AUTH_REQUIRED,
    DEADLINE_EXCEEDED,
    HANDSHAKE_REQUIRED,
    INTERNAL,
    METHOD_NOT_FOUND,
    CarError,
    invalid_params,
    permission_denied,
)
from car_grpc.v1 import options_pb2

if TYPE_CHECKING:
    from car_grpc.core.session import ClientSession

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """A handler's response plus work to start once the response is queued to the client
    (e.g. the pump of a subscription, whose events must not overtake its snapshot)."""

    message: Message
    then: Callable[[], None]


Handler = Callable[["ClientSession", Any], Awaitable[Message | Reply]]
NotificationHandler = Callable[["ClientSession", Any], Awaitable[None]]

#: Request handlers by ClientFrame member name (e.g. "runs_start").
HANDLERS: dict[str, Handler] = {}
#: Handlers of client notifications by ClientFrame member name (e.g. "agent_chat_event").
NOTIFICATION_HANDLERS: dict[str, NotificationHandler] = {}
#: Request members whose handlers never wait (in-memory work only): a session stream
#: answers them in its read loop, without a task of their own.
INLINE: set[str] = set()


def handles(member: str, *, inline: bool = False) -> Callable[[Handler], Handler]:
    """Register the handler of a ClientFrame request member.

    `inline`: the handler never waits on anything (no store, no client, no other
    session), so it may run in the session stream's read loop. Such a handler must stay
    that way: one that waited there would stop the stream from reading anything else.
    """
    if member not in api.CLIENT_MEMBERS or api.CLIENT_MEMBERS[member].kind != api.REQUEST:
        raise ValueError(f"{member!r} is not a request member of ClientFrame")

    def register(fn: Handler) -> Handler:
        if member in HANDLERS:
            raise ValueError(f"two handlers for {member!r}")
        HANDLERS[member] = fn
        if inline:
            INLINE.add(member)
        return fn

    return register


def runs_inline(session: ClientSession, member: str) -> bool:
    """Whether a request of `session` never waits: an inline handler, not parked by the
    approval gate."""
    if member not in INLINE:
        return False
    config = session.server.config
    return not (config.approvals and api.CLIENT_MEMBERS[member].method in config.gated_methods)


def handles_notification(member: str) -> Callable[[NotificationHandler], NotificationHandler]:
    """Register the handler of a ClientFrame notification (or binary frame) member."""
    kind = api.CLIENT_MEMBERS[member].kind if member in api.CLIENT_MEMBERS else None
    if kind not in (api.NOTIFICATION, api.BINARY):
        raise ValueError(f"{member!r} is not a notification member of ClientFrame")

    def register(fn: NotificationHandler) -> NotificationHandler:
        NOTIFICATION_HANDLERS[member] = fn
        return fn

    return register


class AuthRequired(CarError):
    """A request before auth: answered with -32001, then the stream is closed."""

    def __init__(self) -> None:
        super().__init__(AUTH_REQUIRED, "auth required: call session.auth first")


async def execute(session: ClientSession, member: str, request: Message) -> Message | Reply:
    """Run one request of `session`. Raises CarError for every failure."""
    method = api.CLIENT_MEMBERS[member].method
    metrics = session.server.metrics
    try:
        result = await _execute(session, member, method, request)
    except CarError as e:
        metrics.request_done(method, e.code, None)
        raise
    metrics.request_done(method, None, result.message if isinstance(result, Reply) else result)
    return result


def admits(access: options_pb2.Access, role: options_pb2.CallerRole.ValueType) -> bool:
    """Whether a declared rule admits a caller of `role` (auth on)."""
    return role in access.roles


_ROLE_NAMES = {
    options_pb2.CALLER_ROLE_DAEMON: "the daemon token",
    options_pb2.CALLER_ROLE_HOST: "the host role",
    options_pb2.CALLER_ROLE_AGENT: "an attached agent",
}


def check_access(session: ClientSession, access: options_pb2.Access, method: str) -> None:
    """Raise unless `session`'s role may call `method`: -32001 before auth, a permission
    error for a role the rule does not list. With auth off every session may call
    everything (no role can be proven)."""
    if session.server.auth_enabled and not admits(access, session.role.value):
        if not session.authenticated:
            raise AuthRequired()
        allowed = " or ".join(_ROLE_NAMES[r] for r in access.roles if r in _ROLE_NAMES)
        raise permission_denied(f"permission denied: {method} needs {allowed}")


async def _execute(
    session: ClientSession, member: str, method: str, request: Message
) -> Message | Reply:
    access = api.CLIENT_MEMBERS[member].access
    check_access(session, access, method)
    if access.needs_handshake and session.protocol_version is None:
        raise CarError(
            HANDSHAKE_REQUIRED,
            f"protocol handshake required: call server.handshake before {method}",
        )
    handler = HANDLERS.get(member)
    if handler is None:
        raise CarError(METHOD_NOT_FOUND, f"unknown method: {method}")
    server = session.server
    deadline = asyncio.timeout(server.config.handler_timeout)
    try:
        async with deadline:
            await server.gate(session, method, request)
            return await handler(session, request)
    except CarError:
        raise
    except TimeoutError as e:
        if deadline.expired():
            limit = server.config.handler_timeout
            raise CarError(
                DEADLINE_EXCEEDED, f"handler deadline exceeded: {method} ran past {limit:g}s"
            ) from None
        log.exception("handler for %s timed out", method)
        raise CarError(INTERNAL, f"{method} failed: timed out") from e
    except Exception as e:
        log.exception("handler for %s failed", method)
        raise CarError(INTERNAL, f"{method} failed: {e}") from e


def field_error(name: str, reason: str = "missing field") -> CarError:
    """-32602 naming the field, e.g. `invalid params: missing field: name`."""
    return invalid_params(f"invalid params: {reason}: {name}")


def require(value: str, name: str) -> str:
    """The value of a required string field, or -32602 naming it."""
    if not value:
        raise field_error(name)
    return value
