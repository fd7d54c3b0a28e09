"""The gRPC services anyone may call, credentials or not: grpc.health.v1.Health (load
balancers) and server reflection (grpcurl). No token or role bounds who opens their
long-lived streams, so each kind is capped for the whole core (CoreConfig
max_health_watches, max_reflection_streams); the library servicers do the work.

grpcio-health-checking keeps, per service name being watched, a condition and a count
(an entry of two dicts, whatever the name, known or not), dropped when that name's last
watch ends: the cap on watches bounds those entries, and MAX_WATCHED_NAME each key. It
serves no Health/List (UNIMPLEMENTED there, as of 1.85): CappedHealth answers it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from car_grpc.core.registry import StreamCap
from car_grpc.wire.errors import CarError, field_error

#: Longest service name a Health.Watch may name (the core's are under 64 characters):
#: the request, its name with it, is held as long as the watch.
MAX_WATCHED_NAME = 256


class CappedHealth:
    """The library's asyncio health servicer (`library`), its Watch streams capped by
    `watches`. Registered in its place (add_HealthServicer_to_server)."""

    def __init__(self, library: Any, watches: StreamCap) -> None:
        self.library = library
        self.watches = watches
        # Check, unary and not counted, as the library serves it.
        self.Check = library.Check

    async def List(
        self, _request: Any, _context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        """Every service the core has, with the status Check answers for it (the names are
        the core's own, a few dozen: the answer is bounded). The library keeps the
        statuses and offers no getter, so they are read where it keeps them."""
        statuses: dict[str, int] = self.library._server_status
        return health_pb2.HealthListResponse(
            statuses={n: health_pb2.HealthCheckResponse(status=s) for n, s in statuses.items()}
        )

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            if len(request.service) > MAX_WATCHED_NAME:
                raise field_error("service", f"longer than {MAX_WATCHED_NAME} characters")
            with self.watches.holding():
                await self.library.Watch(request, context)
        except CarError as e:
            await e.abort(context)


Handler = Callable[[AsyncIterable[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def capped_stream(handler: Handler, cap: StreamCap) -> Handler:
    """A bidi streaming handler (an async generator) held under `cap`."""

    async def capped(
        requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            with cap.holding():
                async for reply in handler(requests, context):
                    yield reply
        except CarError as e:
            await e.abort(context)

    return capped
