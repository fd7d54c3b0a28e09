"""Operator status (status.proto): a read-only snapshot of the core, and its metrics.

`server.status` and `server.metrics` are for host-role sessions only (declared in
session.proto): they show every connection, chat and agent of the core. Gauges are read
off the state here, at the call; counters live in car_grpc.core.metrics.
"""

from __future__ import annotations

from car_grpc import codec
from car_grpc.clock import now_ms
from car_grpc.config import SERVER_VERSION
from car_grpc.core.dispatch import handles
from car_grpc.core.metrics import Gauge
from car_grpc.core.server_state import ServerState
from car_grpc.core.session import ClientSession, Role
from car_grpc.v1 import status_pb2

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


def _connections(state: ServerState) -> list[ClientSession]:
    """Live session streams, newest first (one-call sessions of typed RPCs are not)."""
    live = [s for s in state.sessions.values() if s.streaming and not s.closed.is_set()]
    return sorted(live, key=lambda s: s.connected_at, reverse=True)


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


def gauges(state: ServerState, store_bytes: int) -> list[Gauge]:
    """The values `server.metrics` reads off the state; the store's size is asked of the
    store by the caller (an await)."""
    by_role = dict.fromkeys(_ROLE_LABELS.values(), 0)
    for session in _connections(state):
        by_role[_ROLE_LABELS[session.role]] += 1
    return [
        Gauge(
            "car_sessions",
            "Live session streams (client connections), by role.",
            ("role",),
            [((role,), n) for role, n in by_role.items()],
        ),
        Gauge("car_attached_agents", "Agents attached now.", (), [((), len(state.attached))]),
        Gauge(
            "car_chats_in_flight", "Chats routed and not ended.", (), [((), len(state.chats.open))]
        ),
        Gauge(
            "car_approvals_pending",
            "Approvals waiting for a decision.",
            (),
            [((), len(state.approvals.pending()))],
        ),
        Gauge(
            "car_uptime_seconds",
            "Seconds since the core started.",
            (),
            [((), (now_ms() - state.started_at) / 1000)],
        ),
        Gauge(
            "car_store_bytes",
            "Bytes of the store on disk (database and write-ahead log).",
            (),
            [((), store_bytes)],
        ),
    ]


@handles("server_status")
async def server_status(
    session: ClientSession, req: status_pb2.GetStatusRequest
) -> status_pb2.GetStatusResponse:
    state = session.server
    connections = _connections(state)
    run_agents = await state.runs.store.agents(MAX_RUN_AGENTS)
    now = now_ms()
    return status_pb2.GetStatusResponse(
        server_version=SERVER_VERSION,
        started_at=state.started_at,
        uptime_ms=max(0, now - state.started_at),
        session_count=len(connections),
        sessions=[_describe(s) for s in connections[:MAX_LISTED_SESSIONS]],
        chats=[
            status_pb2.ChatInFlight(
                session_id=chat.session_id,
                agent_id=chat.agent_id,
                host_session_id=chat.host.id,
                accepted=chat.accepted,
            )
            for chat in state.chats.open.values()
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
        pending_approvals=len(state.approvals.pending()),
        store_bytes=await state.store.size_bytes(),
        auth_enabled=state.auth_enabled,
        approvals_enabled=state.config.approvals,
    )


@handles("server_metrics")
async def server_metrics(
    session: ClientSession, req: status_pb2.GetMetricsRequest
) -> status_pb2.GetMetricsResponse:
    state = session.server
    store_bytes = await state.store.size_bytes()
    return status_pb2.GetMetricsResponse(text=state.metrics.render(gauges(state, store_bytes)))
