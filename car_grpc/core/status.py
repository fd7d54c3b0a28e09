"""Operator status (status.proto): a read-only snapshot of the core, and its metrics.

`server.status` and `server.metrics` are for host-role sessions only (declared in
session.proto): they show every connection, chat and agent of the core. Gauges are read
off the state here, at the call; counters live in car_grpc.core.metrics.
"""

from __future__ import annotations

import json

from car_grpc.clock import now_ms
from car_grpc.config import SERVER_VERSION
from car_grpc.core.approvals import Approvals
from car_grpc.core.chats import Chats
from car_grpc.core.cluster import Cluster
from car_grpc.core.metrics import Gauge, Metrics
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession, Role
from car_grpc.store.repositories import RunStore, Store
from car_grpc.v1 import status_pb2
from car_grpc.wire import codec

#: Sessions a status snapshot lists (the newest); `session_count` counts them all.
MAX_LISTED_SESSIONS = 256
#: Agents with runs a status snapshot lists.
MAX_RUN_AGENTS = 256

_ROLES = {
    Role.NONE: status_pb2.SESSION_ROLE_UNAUTHENTICATED,
    Role.DAEMON: status_pb2.SESSION_ROLE_ORDINARY,
    Role.HOST: status_pb2.SESSION_ROLE_HOST,
    Role.AGENT: status_pb2.SESSION_ROLE_AGENT,
}


#: The `role` label of car_sessions (the JSON names of SessionRole).
_ROLE_LABELS = {
    role: codec.enum_to_json(status_pb2.SessionRole.DESCRIPTOR, v) for role, v in _ROLES.items()
}


def _describe(session: ClientSession) -> status_pb2.ConnectedSession:
    out = status_pb2.ConnectedSession(
        session_id=session.id,
        role=_ROLES[session.role],
        peer=session.peer,
        connected_at=session.connected_at,
        tools=len(session.tools),
        halted=session.halted,
    )
    if session.agent_id:
        out.agent_id = session.agent_id
    if session.protocol_version is not None:
        out.protocol_version = session.protocol_version
    if session.current_run:
        out.current_run = session.current_run
    return out


class Status:
    """server.status and server.metrics: what the core holds now, read off the domains."""

    def __init__(
        self,
        registry: SessionRegistry,
        chats: Chats,
        runs: RunStore,
        approvals: Approvals,
        store: Store,
        metrics: Metrics,
        *,
        approvals_enabled: bool,
        cluster: Cluster | None = None,
    ) -> None:
        self._registry = registry
        self._chats = chats
        self._runs = runs
        self._approvals = approvals
        self._store = store
        self._metrics = metrics
        self._approvals_enabled = approvals_enabled
        self._cluster = cluster
        #: Unix ms when this core started (uptime).
        self.started_at = now_ms()

    def _connections(self) -> list[ClientSession]:
        """Live session streams, newest first (one-call sessions of typed RPCs are not)."""
        sessions = self._registry.sessions.values()
        live = [s for s in sessions if s.streaming and not s.closed.is_set()]
        return sorted(live, key=lambda s: s.connected_at, reverse=True)

    def gauges(self, store_bytes: int) -> list[Gauge]:
        """The values `server.metrics` reads off the domains; the store's size is asked of
        the store by the caller (an await)."""
        by_role = dict.fromkeys(_ROLE_LABELS.values(), 0)
        for session in self._connections():
            by_role[_ROLE_LABELS[session.role]] += 1
        return [
            Gauge(
                "car_sessions",
                "Live session streams (client connections), by role.",
                ("role",),
                [((role,), n) for role, n in by_role.items()],
            ),
            Gauge(
                "car_attached_agents",
                "Agents attached now.",
                (),
                [((), len(self._registry.attached))],
            ),
            Gauge(
                "car_chats_in_flight",
                "Chats routed and not ended.",
                (),
                [((), len(self._chats.open))],
            ),
            Gauge(
                "car_approvals_pending",
                "Approvals waiting for a decision.",
                (),
                [((), len(self._approvals.pending()))],
            ),
            Gauge(
                "car_uptime_seconds",
                "Seconds since the core started.",
                (),
                [((), (now_ms() - self.started_at) / 1000)],
            ),
            Gauge(
                "car_store_bytes",
                "Bytes of the store on disk (database and write-ahead log).",
                (),
                [((), store_bytes)],
            ),
        ]

    # ------------------------------------------------------------ handlers

    @handles("server_status")
    async def server_status(
        self, session: ClientSession, req: status_pb2.GetStatusRequest
    ) -> status_pb2.GetStatusResponse:
        connections = self._connections()
        run_agents = await self._runs.agents(MAX_RUN_AGENTS)
        now = now_ms()
        return status_pb2.GetStatusResponse(
            server_version=SERVER_VERSION,
            started_at=self.started_at,
            uptime_ms=max(0, now - self.started_at),
            session_count=len(connections),
            sessions=[_describe(s) for s in connections[:MAX_LISTED_SESSIONS]],
            chats=[
                status_pb2.ChatInFlight(
                    session_id=chat.session_id,
                    agent_id=chat.agent_id,
                    host_session_id=chat.host.id,
                    accepted=chat.accepted,
                )
                for chat in self._chats.open.values()
            ],
            run_agents=[
                status_pb2.RunAgent(
                    agent_id=row.agent_id,
                    runs=row.runs,
                    in_progress=row.in_progress,
                    last_started_at=row.last_started_at,
                )
                for row in run_agents
            ],
            pending_approvals=await self._approvals.pending_count(),
            store_bytes=await self._store.size_bytes(),
            auth_enabled=self._registry.auth_enabled,
            approvals_enabled=self._approvals_enabled,
            core_id=self._cluster.core_id if self._cluster else "",
            cluster=await self._cluster_cores(),
        )

    async def _cluster_cores(self) -> list[status_pb2.ClusterCore]:
        if self._cluster is None:
            return []
        cores = []
        for row in await self._cluster.members():
            core = status_pb2.ClusterCore(
                core_id=row.core_id,
                advertise=row.advertise,
                joined_at=row.joined_at,
                alive=row.alive,
                this_core=row.core_id == self._cluster.core_id,
            )
            try:  # this core's now, the others' as of their last renewal
                said = self._cluster.stats() if core.this_core else json.loads(row.stats)
            except ValueError:
                said = {}
            for name in ("sessions", "agents", "chats", "runs", "approvals"):
                value = said.get(name) if isinstance(said, dict) else None
                if isinstance(value, int) and value >= 0:
                    setattr(core, name, value)
            cores.append(core)
        return cores

    @handles("server_metrics")
    async def server_metrics(
        self, session: ClientSession, req: status_pb2.GetMetricsRequest
    ) -> status_pb2.GetMetricsResponse:
        store_bytes = await self._store.size_bytes()
        return status_pb2.GetMetricsResponse(text=self._metrics.render(self.gauges(store_bytes)))
