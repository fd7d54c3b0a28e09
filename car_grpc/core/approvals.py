"""Approvals: the durable ledger, its three methods, and the approval gate (docs/protocol.md §6).

An approval is pending until someone resolves it, it times out, or whoever waited on it
is gone. Each change is committed to the store before anyone hears of it, and then
announced as a host event (`approval.requested`, `approval.resolved`). Pending approvals
are also held in memory with the future a parked call waits on; approvals that a stopped
server left pending (one server owns a state root) are marked expired at start-up.

Who may resolve: an approval raised with host.request_approval belongs to the session
that raised it; a system approval (raised by the gate, no `client_id`) is resolved by a
host-role session or an unattached one, never by a session attached as an agent and never
by the session whose call it parks: nobody approves what they asked for. Who may read: an
attached agent sees only the approvals it raised and those parking its own calls; host
and unattached sessions see all.

The gate parks requests for the methods of Config.gated_methods that this server serves
(dispatch.execute calls it, after auth and before the handler, on the session stream and
on the typed RPCs alike; an unknown method is answered -32601 before it gets here). It
raises a system approval with action `ws.method:<method>` and a truncated preview of the
params, and waits up to Config.approval_timeout: approved, the request runs; denied or
timed out, -32003 and the connection stays open. Only the parked request waits: the
session's other requests run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import TypeAlias

from google.protobuf.message import Message

from car_grpc.clock import now_ms
from car_grpc.core.host import HostEvents
from car_grpc.core.metrics import Metrics
from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession, Role
from car_grpc.store.repositories import ApprovalStore
from car_grpc.v1 import host_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import (
    APPROVAL_DENIED,
    INVALID_PARAMS,
    CarError,
    failed_precondition,
    internal,
    invalid_params,
    not_found,
    permission_denied,
    require,
)

log = logging.getLogger(__name__)

HostApproval = host_pb2.HostApproval
Status: TypeAlias = host_pb2.ApprovalStatus.ValueType
PENDING = host_pb2.APPROVAL_STATUS_PENDING
APPROVED = host_pb2.APPROVAL_STATUS_APPROVED
DENIED = host_pb2.APPROVAL_STATUS_DENIED
EXPIRED = host_pb2.APPROVAL_STATUS_EXPIRED

OPTIONS = ("approve", "deny")
#: Longest params preview of a system approval, in characters.
PREVIEW_CHARS = 256
#: Resolved approvals host.approvals lists after the pending ones (the newest).
HISTORY_LIMIT = 200
#: Approvals one session may have pending at a time (host.request_approval).
MAX_PENDING_PER_SESSION = 256
#: Approvals pending on other cores of a cluster this core keeps for snapshots at most.
MAX_HEARD = 4096
#: Methods the gate refuses to wrap: session.auth runs before the session is anyone, and
#: a parked host.resolve_approval would leave nothing able to resolve it.
UNGATEABLE = frozenset({"session.auth", "host.resolve_approval"})


def params_preview(request: Message) -> str:
    """The request's params as compact JSON, cut to PREVIEW_CHARS."""
    text = json.dumps(
        codec.message_to_json(request), ensure_ascii=False, separators=(",", ":"), sort_keys=True
    )
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def status_name(status: Status) -> str:
    return codec.enum_to_json(host_pb2.ApprovalStatus.DESCRIPTOR, status)


class Approvals:
    """The ledger (`ledger`), host.request_approval / approvals / resolve_approval, and the
    gate over `gated_methods` (empty: the gate is off). Changes are announced as host
    events through `events`."""

    def __init__(
        self,
        ledger: ApprovalStore,
        events: HostEvents,
        metrics: Metrics,
        *,
        gated_methods: frozenset[str],
        timeout: float,
        clustered: bool = False,
    ) -> None:
        if refused := sorted(gated_methods & UNGATEABLE):
            raise ValueError(f"these methods cannot be gated: {', '.join(refused)}")
        self.ledger = ledger
        self._events = events
        self._metrics = metrics
        self._gated = gated_methods
        self._timeout = timeout
        self._pending: dict[str, HostApproval] = {}
        #: approval id -> the future a parked request waits on (its final row).
        self._waiters: dict[str, asyncio.Future[HostApproval]] = {}
        #: approval id -> the session whose request it parks (system approvals).
        self._parked: dict[str, ClientSession] = {}
        #: Sessions whose close hook is installed.
        self._hooked: set[str] = set()
        self._closed = False
        #: Several cores share the ledger: pending approvals of other cores are listed and
        #: may be resolved here (the core parking the call hears of it through
        #: `resolved_elsewhere`, told by `tell_resolved`).
        self._clustered = clustered
        self.tell_resolved: Callable[[str], None] | None = None
        #: Approvals pending on other cores, as heard from their host events (bounded).
        self._elsewhere: dict[str, HostApproval] = {}

    async def start(self) -> None:
        """Expire the approvals a previous server left pending (in a cluster, joining
        released this core's own: the others' are theirs)."""
        if self._clustered:
            return

        stale = await self.ledger.pending()
        expired = [_resolved(a, EXPIRED, "the server stopped") for a in stale]
        if count := await self.ledger.finish_all(expired):
            log.info("expired %d approvals left pending by a previous server", count)

    async def close(self) -> None:
        """At shutdown: whatever is still pending expires."""
        self._closed = True
        for approval_id in list(self._pending):
            await self._finish(approval_id, EXPIRED, "the server stopped")

    # ------------------------------------------------------------ the ledger

    def pending(self, session: ClientSession | None = None) -> list[HostApproval]:
        """Every pending approval, or those `session` may see (with `session`, in a
        cluster, also those pending on other cores that this core has heard of)."""
        held = self._pending.values()
        if session is None:
            return list(held)
        mine = [a for a in held if may_read(session, a)]
        return mine + [a for a in self._elsewhere.values() if may_read(session, a)]

    def heard_elsewhere(self, kind: str, approval: HostApproval) -> None:
        """A host event of another core about an approval: pending ones are kept for
        host.subscribe's snapshot until their `approval.resolved` is heard."""
        if kind == "approval.requested" and approval.status == PENDING:
            if len(self._elsewhere) < MAX_HEARD:
                self._elsewhere[approval.id] = approval
        elif kind == "approval.resolved":
            self._elsewhere.pop(approval.id, None)

    async def pending_count(self) -> int:
        """Approvals pending now: every core's in a cluster, else this core's."""
        return len(await self.ledger.pending()) if self._clustered else len(self._pending)

    async def listing(self, session: ClientSession) -> list[HostApproval]:
        """What `session` may see: pending approvals first (oldest first), then the newest
        resolved ones."""
        if self._clustered:  # every core's
            pending = [a for a in await self.ledger.pending() if may_read(session, a)]
        else:
            pending = self.pending(session)
        history = await self.ledger.history(HISTORY_LIMIT)
        resolved = {a.id for a in history}  # resolved while the history was read
        mine = (a for a in history if may_read(session, a))
        return [*(a for a in pending if a.id not in resolved), *mine]

    async def request(
        self, session: ClientSession, req: host_pb2.RequestApprovalRequest
    ) -> HostApproval:
        title = require(req.title, "title")
        mine = sum(1 for a in self._pending.values() if a.client_id == session.id)
        if mine >= MAX_PENDING_PER_SESSION:
            raise internal(f"too many pending approvals: at most {MAX_PENDING_PER_SESSION}")
        if session.role is Role.AGENT and req.agent_id not in ("", session.agent_id):
            raise invalid_params("invalid params: agent_id does not match the attached agent")
        approval = _new(title, req.agent_id or session.agent_id)
        approval.client_id = session.id
        if req.HasField("description"):
            approval.details.fields["description"].string_value = req.description
        if req.HasField("context"):
            approval.details.fields["context"].struct_value.CopyFrom(req.context)
        if session.id not in self._hooked:
            self._hooked.add(session.id)
            session.on_close(self._session_closed)
        await self._open(approval)
        return approval

    async def resolve(
        self, session: ClientSession, req: host_pb2.ResolveApprovalRequest
    ) -> HostApproval:
        approval_id = require(req.approval_id, "approval_id")
        approval = self._pending.get(approval_id)
        if approval is None:
            row = await self.ledger.get(approval_id)
            if row is None or not may_read(session, row):
                raise not_found(INVALID_PARAMS, f"invalid params: unknown approval: {approval_id}")
            if row.status != PENDING or not self._clustered:
                raise _already(row)
            return await self._resolve_elsewhere_pending(session, row, req)
        if not self._may_resolve(session, approval):
            raise permission_denied(f"approval '{approval_id}' may not be resolved by this session")
        notes = req.notes if req.HasField("notes") else None
        row, won = await self._finish(approval_id, APPROVED if req.approved else DENIED, notes)
        if not won:
            raise _already(row)
        return row

    async def _resolve_elsewhere_pending(
        self, session: ClientSession, approval: HostApproval, req: host_pb2.ResolveApprovalRequest
    ) -> HostApproval:
        """Resolve an approval pending on another core of the cluster: in the ledger (the
        first resolution wins there), then that core is told and wakes its parked call.
        Raised by a session: only that session may, and it lives on the other core. A
        system approval: the same rule as here (its parked session is not this one)."""
        if approval.HasField("client_id") or session.role is Role.AGENT:
            raise permission_denied(f"approval '{approval.id}' may not be resolved by this session")
        notes = req.notes if req.HasField("notes") else None
        resolved = _resolved(approval, APPROVED if req.approved else DENIED, notes)
        row, won = await self.ledger.finish(resolved)
        assert row is not None, approval.id
        if not won:
            raise _already(row)
        self._metrics.approvals.inc(status_name(row.status))
        if self.tell_resolved is not None:
            self.tell_resolved(row.id)
        self._elsewhere.pop(row.id, None)
        self._announce("approval.resolved", row)
        return row

    async def resolved_elsewhere(self, approval_id: str) -> None:
        """Another core resolved `approval_id`: if it parks a call here, wake it with the
        outcome the ledger has."""
        if approval_id not in self._pending:
            return
        row = await self.ledger.get(approval_id)
        if row is None or row.status == PENDING or approval_id not in self._pending:
            return
        del self._pending[approval_id]
        waiter = self._waiters.get(approval_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(row)

    async def lost_hold(self) -> None:
        """This core lost its lease and a peer expired its pending approvals: their parked
        calls get that outcome now instead of at their timeout."""
        for approval_id in list(self._pending):
            await self.resolved_elsewhere(approval_id)

    def announce_released(self, approvals: list[HostApproval]) -> None:
        """Approvals a dead core left pending, expired by this core: announced here."""
        for approval in approvals:
            self._elsewhere.pop(approval.id, None)
            self._announce("approval.resolved", approval)

    def _may_resolve(self, session: ClientSession, approval: HostApproval) -> bool:
        if approval.HasField("client_id"):  # raised by a session: that session's
            return approval.client_id == session.id
        return session.role is not Role.AGENT and self._parked.get(approval.id) is not session

    async def _open(self, approval: HostApproval) -> None:
        await self.ledger.insert(approval)
        self._pending[approval.id] = approval
        self._announce("approval.requested", approval)

    async def _finish(
        self, approval_id: str, status: Status, notes: str | None
    ) -> tuple[HostApproval, bool]:
        """Resolve a pending approval durably, then wake its waiter and announce it.

        Returns the approval as the ledger now has it, and whether this call resolved it
        (False when someone else got there first: their outcome stands).
        """
        approval = self._pending.get(approval_id)
        if approval is None:
            row = await self.ledger.get(approval_id)
            assert row is not None, approval_id
            return row, False
        resolved = _resolved(approval, status, notes)
        row, won = await self.ledger.finish(resolved)
        assert row is not None, approval_id
        # Not won: another core of the cluster resolved it first, and its outcome stands.
        self._pending.pop(approval_id, None)
        waiter = self._waiters.get(approval_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(row)
        if won:
            self._metrics.approvals.inc(status_name(row.status))
            self._announce("approval.resolved", row)
        return row, won

    def _announce(self, kind: str, approval: HostApproval) -> None:
        self._events.publish(
            kind,
            agent_id=approval.agent_id,
            message=approval.action,
            payload=codec.message_to_json(approval),
        )

    async def _session_closed(self, session: ClientSession) -> None:
        """Approvals only this session could resolve can no longer be resolved."""
        self._hooked.discard(session.id)
        for approval in [a for a in self._pending.values() if a.client_id == session.id]:
            await self._finish(approval.id, EXPIRED, "the session that raised it closed")

    # ------------------------------------------------------------ the gate

    async def gate(self, session: ClientSession, method: str, request: Message) -> None:
        """Return when `method` may run; raise -32003 when it may not."""
        if method not in self._gated:
            return
        approval = _new(f"ws.method:{method}", session.agent_id)
        approval.details.fields["method"].string_value = method
        approval.details.fields["params_preview"].string_value = params_preview(request)
        waiter: asyncio.Future[HostApproval] = asyncio.get_running_loop().create_future()
        self._waiters[approval.id] = waiter
        self._parked[approval.id] = session
        timeout = self._timeout
        try:
            await self._open(approval)
            try:
                async with asyncio.timeout(timeout):
                    outcome = await waiter
            except TimeoutError:
                outcome, _ = await self._finish(approval.id, EXPIRED, f"no answer in {timeout:g}s")
        finally:
            self._waiters.pop(approval.id, None)
            self._parked.pop(approval.id, None)
            if approval.id in self._pending and not self._closed:
                # The request ended while parked (its session closed, or its deadline).
                await self._finish(approval.id, EXPIRED, "the request ended while waiting")
        if outcome.status == APPROVED:
            return
        if outcome.status == DENIED:
            reason = f": {outcome.notes}" if outcome.HasField("notes") else ""
            raise CarError(APPROVAL_DENIED, f"approval denied: {method}{reason}")
        raise CarError(
            APPROVAL_DENIED, f"approval timed out: {method} was not approved within {timeout:g}s"
        )

    # ------------------------------------------------------------ handlers

    @handles("host_request_approval")
    async def host_request_approval(
        self, session: ClientSession, req: host_pb2.RequestApprovalRequest
    ) -> host_pb2.RequestApprovalResponse:
        approval = await self.request(session, req)
        return host_pb2.RequestApprovalResponse(approval=approval)

    @handles("host_approvals")
    async def host_approvals(
        self, session: ClientSession, req: host_pb2.ListApprovalsRequest
    ) -> host_pb2.ListApprovalsResponse:
        approvals = await self.listing(session)
        return host_pb2.ListApprovalsResponse(approvals=approvals)

    @handles("host_resolve_approval")
    async def host_resolve_approval(
        self, session: ClientSession, req: host_pb2.ResolveApprovalRequest
    ) -> host_pb2.ResolveApprovalResponse:
        approval = await self.resolve(session, req)
        return host_pb2.ResolveApprovalResponse(approval=approval)


def may_read(session: ClientSession, approval: HostApproval) -> bool:
    """An attached agent reads the approvals it raised and those parking its own calls;
    every other session reads all."""
    if session.role is not Role.AGENT:
        return True
    if approval.HasField("client_id"):
        return approval.client_id == session.id
    return approval.agent_id == session.agent_id


def _new(action: str, agent_id: str | None) -> HostApproval:
    approval = HostApproval(
        id=uuid.uuid4().hex,
        action=action,
        options=OPTIONS,
        status=PENDING,
        created_at=now_ms(),
    )
    approval.details.SetInParent()
    if agent_id:
        approval.agent_id = agent_id
    return approval


def _resolved(approval: HostApproval, status: Status, notes: str | None) -> HostApproval:
    resolved = HostApproval()
    resolved.CopyFrom(approval)
    resolved.status = status
    resolved.resolved_at = now_ms()
    if notes is not None:
        resolved.notes = notes
    return resolved


def expired(approval: HostApproval, notes: str) -> HostApproval:
    """`approval` as it is once it expired with `notes` (as it would on its own core)."""
    return _resolved(approval, EXPIRED, notes)


def _already(approval: HostApproval) -> CarError:
    return failed_precondition(
        INVALID_PARAMS, f"approval '{approval.id}' is already {status_name(approval.status)}"
    )
