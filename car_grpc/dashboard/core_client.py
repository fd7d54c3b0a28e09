"""The dashboard's way into the core: the typed gRPC API, as a host-role client.

Every call carries the host token (`authorization: Bearer`), so the dashboard works the
same beside a core in its own process (`car-grpc serve`) or another one, and sees exactly
what any host tool would: StatusService for connections, chats and metrics,
ApprovalService for the ledger, RunService for runs, HostService.WatchHostEvents and
RunService.WatchRun for what changes. Answers are returned as the JSON shape of the
wire protocol (car_grpc.wire.codec), which is what the page renders.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from car_grpc import tls
from car_grpc.v1 import (
    a2ui_pb2,
    a2ui_pb2_grpc,
    host_pb2,
    host_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)
from car_grpc.wire import codec
from car_grpc.wire.errors import INTERNAL, CarError
from car_grpc.wire.limits import MESSAGE_SIZE_OPTIONS

JSON = Any
#: Deadline of one unary call to the core.
CALL_TIMEOUT = 5.0
#: Deadline of an A2UI action: it may wait for the A2A task it continues (the core bounds
#: that wait by its own a2a_send_timeout; this is the backstop).
ACTION_TIMEOUT = 30.0
#: Largest message the dashboard accepts from the core (a page of run records).


def car_error(e: grpc.aio.AioRpcError) -> CarError:
    """The core's exact error (from the `car-error-bin` trailer), or the bare status."""
    return CarError.of_call(e) or CarError(
        INTERNAL, f"core unavailable: {e.code().name}: {e.details()}"
    )


class CoreClient:
    def __init__(self, address: str, host_token: str | None, core_ca: Path | None) -> None:
        self._channel = tls.core_channel(  # TLS when there is a CA to trust
            address,
            core_ca,
            options=[
                *MESSAGE_SIZE_OPTIONS,
            ],
        )
        self._metadata = (("authorization", f"Bearer {host_token}"),) if host_token else ()
        self._status = status_pb2_grpc.StatusServiceStub(self._channel)
        self._approvals = host_pb2_grpc.ApprovalServiceStub(self._channel)
        self._host = host_pb2_grpc.HostServiceStub(self._channel)
        self._runs = runs_pb2_grpc.RunServiceStub(self._channel)
        self._a2ui = a2ui_pb2_grpc.A2uiServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _call(self, rpc: Any, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        try:
            return await rpc(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise car_error(e) from None

    async def status(self) -> JSON:
        reply = await self._call(self._status.GetStatus, status_pb2.GetStatusRequest())
        return codec.message_to_json(reply)

    async def metrics(self) -> str:
        reply = await self._call(self._status.GetMetrics, status_pb2.GetMetricsRequest())
        return str(reply.text)

    async def approvals(self) -> JSON:
        reply = await self._call(self._approvals.ListApprovals, host_pb2.ListApprovalsRequest())
        return codec.message_to_json(reply)

    async def resolve(self, approval_id: str, approved: bool) -> JSON:
        request = host_pb2.ResolveApprovalRequest(
            approval_id=approval_id, approved=approved, notes="from the dashboard"
        )
        reply = await self._call(self._approvals.ResolveApproval, request)
        return codec.message_to_json(reply.approval)

    async def runs(self, agent_id: str) -> JSON:
        reply = await self._call(self._runs.ListRuns, runs_pb2.ListRunsRequest(agent_id=agent_id))
        return codec.message_to_json(reply)

    async def surfaces(self) -> JSON:
        reply = await self._call(self._a2ui.A2uiSurfaces, a2ui_pb2.A2uiSurfacesRequest())
        return codec.message_to_json(reply)

    async def action(self, params: JSON) -> JSON:
        """A user action on a surface (`a2ui.action` params as JSON): `{event, route}`."""
        request = a2ui_pb2.A2uiActionRequest()
        codec.json_to_message(params, request)
        reply = await self._call(self._a2ui.A2uiAction, request, ACTION_TIMEOUT)
        return codec.message_to_json(reply)

    async def watch_run(self, run_id: str, cursor: int) -> AsyncIterator[JSON]:
        """Records of a run from `cursor` (each with the cursor to resume after it)."""
        call = self._runs.WatchRun(
            runs_pb2.WatchRunRequest(run_id=run_id, cursor=cursor), metadata=self._metadata
        )
        try:
            async for item in call:
                yield codec.message_to_json(item)
        except grpc.aio.AioRpcError as e:
            raise car_error(e) from None
        finally:
            call.cancel()

    async def watch_host_events(self, after_sequence: int) -> AsyncIterator[JSON]:
        call = self._host.WatchHostEvents(
            host_pb2.WatchHostEventsRequest(after_sequence=after_sequence),
            metadata=self._metadata,
        )
        try:
            async for item in call:
                yield codec.message_to_json(item.event)
        except grpc.aio.AioRpcError as e:
            raise car_error(e) from None
        finally:
            call.cancel()
