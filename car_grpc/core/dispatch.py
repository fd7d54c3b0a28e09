"""The one dispatch path that the session stream and the typed RPCs share.

`Dispatcher.execute` runs one request of a session: the declared access rule
(options.proto `Access`, read off the request's ClientFrame member: roles and handshake),
the approval gate, the handler (from the router) under its deadline, and the mapping of
every failure to a CarError. `Dispatcher.check_access` is the same role rule for the RPCs
that do not go through `execute` (server streams and gRPC-only RPCs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from car_grpc.core.deadlines import Deadline, Deadlines
from car_grpc.core.metrics import Metrics
from car_grpc.core.router import Reply, Router
from car_grpc.store import StoreRefused, StoreUnavailable
from car_grpc.v1 import options_pb2
from car_grpc.wire import api
from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    DEADLINE_EXCEEDED,
    HANDSHAKE_REQUIRED,
    INTERNAL,
    METHOD_NOT_FOUND,
    CarError,
    invalid_params,
    permission_denied,
    unavailable,
)

if TYPE_CHECKING:
    from car_grpc.core.session import ClientSession

log = logging.getLogger(__name__)

#: `gate(session, method, request)`: returns when the request may run, raises CarError
#: when it may not (the approval gate).
Gate = Callable[["ClientSession", str, Message], Awaitable[None]]


def store_unavailable(method: str, error: StoreUnavailable) -> CarError:
    """What a request that met an unreachable store answers: -32603 (UNAVAILABLE on typed
    RPCs), naming no part of the store's address; the log has the store's own message."""
    log.warning("%s failed: %s", method, error)
    return unavailable(f"{method} failed: the store is unavailable, try again later")


class AuthRequired(CarError):
    """A request before auth: answered with -32001, then the stream is closed."""

    def __init__(self) -> None:
        super().__init__(AUTH_REQUIRED, "auth required: call session.auth first")


_ROLE_NAMES = {
    options_pb2.CALLER_ROLE_DAEMON: "the daemon token",
    options_pb2.CALLER_ROLE_HOST: "the host role",
    options_pb2.CALLER_ROLE_AGENT: "an attached agent",
}


def admits(access: options_pb2.Access, role: options_pb2.CallerRole.ValueType) -> bool:
    """Whether a declared rule admits a caller of `role` (auth on)."""
    return role in access.roles


class Dispatcher:
    def __init__(
        self,
        router: Router,
        *,
        gate: Gate,
        gated_methods: frozenset[str],
        handler_timeout: float,
        auth_enabled: bool,
        metrics: Metrics,
    ) -> None:
        self.router = router
        self.auth_enabled = auth_enabled
        self._gate = gate
        self._gated = gated_methods
        self._handler_timeout = handler_timeout
        self._deadlines = Deadlines(handler_timeout)
        self._metrics = metrics

    def check_access(self, session: ClientSession, access: options_pb2.Access, method: str) -> None:
        """Raise unless `session`'s role may call `method`: -32001 before auth, a permission
        error for a role the rule does not list. With auth off every session may call
        everything (no role can be proven)."""
        if self.auth_enabled and not admits(access, session.role.value):
            if not session.authenticated:
                raise AuthRequired()
            allowed = " or ".join(_ROLE_NAMES[r] for r in access.roles if r in _ROLE_NAMES)
            raise permission_denied(f"permission denied: {method} needs {allowed}")

    def runs_inline(self, member: str) -> bool:
        """Whether a request never waits: an inline handler, not parked by the gate."""
        return member in self.router.inline and api.CLIENT_MEMBERS[member].method not in self._gated

    async def execute(
        self, session: ClientSession, member: str, request: Message
    ) -> Message | Reply:
        """Run one request of `session`. Raises CarError for every failure."""
        method = api.CLIENT_MEMBERS[member].method
        try:
            result = await self._execute(session, member, method, request)
        except CarError as e:
            self._metrics.request_done(method, e.code, None)
            raise
        reply = result.message if isinstance(result, Reply) else result
        self._metrics.request_done(method, None, reply)
        return result

    async def _execute(
        self, session: ClientSession, member: str, method: str, request: Message
    ) -> Message | Reply:
        access = api.CLIENT_MEMBERS[member].access
        self.check_access(session, access, method)
        if access.needs_handshake and session.protocol_version is None:
            raise CarError(
                HANDSHAKE_REQUIRED,
                f"protocol handshake required: call server.handshake before {method}",
            )
        handler = self.router.requests.get(member)
        if handler is None:
            raise CarError(METHOD_NOT_FOUND, f"unknown method: {method}")
        deadline: Deadline | None = None
        try:
            if self.runs_inline(member):
                # It never waits: no deadline could interrupt it, and no gate parks it
                # (a timer and a coroutine less per request).
                return await handler(session, request)
            deadline = self._deadlines.start()
            try:
                if method in self._gated:  # the rest would pass the gate at once: no call
                    await self._gate(session, method, request)
                return await handler(session, request)
            except asyncio.CancelledError:
                if self._deadlines.end(deadline):
                    raise TimeoutError from None  # as asyncio.timeout raises it
                raise
            finally:
                self._deadlines.end(deadline)
        except CarError:
            raise
        except StoreUnavailable as e:
            raise store_unavailable(method, e) from None
        except StoreRefused as e:
            raise invalid_params(f"invalid params: {e}") from None
        except TimeoutError as e:
            if deadline is not None and deadline.timed_out:
                limit = self._handler_timeout
                raise CarError(
                    DEADLINE_EXCEEDED, f"handler deadline exceeded: {method} ran past {limit:g}s"
                ) from None
            log.exception("handler for %s timed out", method)
            raise CarError(INTERNAL, f"{method} failed: timed out") from e
        except Exception as e:
            log.exception("handler for %s failed", method)
            raise CarError(INTERNAL, f"{method} failed: {e}") from e
