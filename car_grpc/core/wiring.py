"""The one place where the core is put together.

`wire` builds every domain from exactly what it needs (its repository, the host-event
log, the session registry, metrics, its own limits), in dependency order, then one router
from the domains' declared handlers and one dispatcher over it. Nothing registers itself
by being imported and no domain reaches another through a shared state object: to see
what a domain depends on, read its constructor call here.

Where a new operation goes: its proto (a ClientFrame member with `json_rpc` and
`access`, and a typed RPC if it has one), then a method marked `@handles(member)` on the
domain that owns it. Nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from car_grpc.a2a.server import A2aLimits, A2aServer
from car_grpc.a2a.sessions import A2aSessions
from car_grpc.config import CoreConfig
from car_grpc.core.a2a_client import A2aClient
from car_grpc.core.a2ui import A2ui, A2uiLimits
from car_grpc.core.approvals import Approvals, expired
from car_grpc.core.authentication import Authentication
from car_grpc.core.chats import ChatLimits, Chats
from car_grpc.core.cluster import (
    Cluster,
    ClusterAttachments,
    Message,
    event_of,
    from_elsewhere,
)
from car_grpc.core.dispatch import Dispatcher
from car_grpc.core.grpc_service import GrpcService
from car_grpc.core.host import Host, HostEvents
from car_grpc.core.key_value import KeyValue
from car_grpc.core.kv import StateBudget
from car_grpc.core.meetings import Meetings
from car_grpc.core.metrics import Metrics
from car_grpc.core.peers import Peers, PeerService
from car_grpc.core.policies import Policies
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.route_auth import RouteSealer
from car_grpc.core.router import Router
from car_grpc.core.runs import INCOMPLETE, Runs, ended_record
from car_grpc.core.session import SessionLimits
from car_grpc.core.status import Status
from car_grpc.core.tokens import AgentTokens, ServerTokens
from car_grpc.core.tool_hosts import ToolHostLimits, ToolHosts
from car_grpc.core.tools import Tools
from car_grpc.core.voice import Voice, VoiceLimits
from car_grpc.store.repositories import CoreRow, Store
from car_grpc.v1 import host_pb2
from car_grpc.wire import codec


@dataclass
class CoreParts:
    """A wired core: what the gRPC server serves, and the parts an embedder (or a test)
    may look at. The domains hold no reference to this object."""

    config: CoreConfig
    store: Store
    metrics: Metrics
    #: None when auth is off.
    tokens: ServerTokens | None
    agent_tokens: AgentTokens
    registry: SessionRegistry
    events: HostEvents
    approvals: Approvals
    host: Host
    runs: Runs
    chats: Chats
    tool_hosts: ToolHosts
    voice: Voice
    meetings: Meetings
    a2ui: A2ui
    status: Status
    router: Router
    grpc: GrpcService
    #: None when A2A is off (--no-a2a).
    a2a: A2aServer | None
    #: In a cluster (a PostgreSQL store): membership and messages, the core-to-core
    #: service other cores call, and the client side of it. None for a core of its own.
    cluster: Cluster | None = None
    peer_service: PeerService | None = None
    peers: Peers | None = None
    _keep: list[object] = field(default_factory=list)

    async def shutdown(self) -> None:
        """Close every session, then let the domains finish what they write (pending
        approvals expire, open runs end incomplete, goal and meeting writes land)
        before the store closes."""
        if self.a2a is not None:
            await self.a2a.close()
        await self.registry.close_all()
        await self.approvals.close()
        await self.runs.shutdown()
        await self.chats.drain()
        await self.voice.shutdown()
        await self.a2ui.shutdown()
        if self.peers is not None:
            await self.peers.close()
        if self.cluster is not None:
            await self.cluster.leave()


async def wire(
    config: CoreConfig,
    store: Store,
    tokens: ServerTokens | None,
    *,
    advertise: str = "",
    cluster_secret: str = "",
) -> CoreParts:
    """Build and start the domains of one core over `store`. On a store shared by several
    cores (PostgreSQL), the core first joins the cluster, advertising `advertise` to its
    peers, which prove `cluster_secret`."""
    auth_enabled = tokens is not None
    cluster: Cluster | None = None
    if store.cluster is not None:
        cluster = Cluster(
            store.cluster,
            lease=config.cluster_lease,
            ended=lambda: ended_record(INCOMPLETE),
            expire=expired,
        )
        if tokens is not None:
            cluster.tokens = tokens.digests
            server_tokens = tokens

            def accept_peers(members: list[CoreRow]) -> None:
                others = [m for m in members if m.alive and m.core_id != cluster_id]
                server_tokens.peer_daemons = tuple(m.tokens[0] for m in others if m.tokens)
                server_tokens.peer_hosts = tuple(m.tokens[1] for m in others if m.tokens)

            cluster_id = cluster.core_id
            cluster.on_members(accept_peers)
        await cluster.join(advertise)  # before anything below reads or repairs the store
    metrics = Metrics()
    registry = SessionRegistry(
        SessionLimits(
            outbound_frames=config.session_outbound_queue,
            outbound_bytes=config.session_outbound_queue_bytes,
            state=StateBudget(
                config.state_value_max_bytes, config.state_max_bytes, config.state_max_keys
            ),
            max_pending_calls=config.max_pending_calls_per_session,
        ),
        metrics,
        auth_enabled=auth_enabled,
        max_sessions=config.max_sessions,
    )
    agent_tokens = AgentTokens(store.agent_tokens)
    authentication = Authentication(tokens, agent_tokens, registry)
    events = HostEvents(config.host_event_history, config.host_event_queue, metrics)
    gated = config.gated_methods if config.approvals else frozenset()
    approvals = Approvals(
        store.approvals,
        events,
        metrics,
        gated_methods=gated,
        timeout=config.approval_timeout,
        clustered=cluster is not None,
    )
    await approvals.start()
    host = Host(events, approvals.pending)
    runs = Runs(
        store.runs,
        metrics,
        subscriber_queue=config.run_subscriber_queue,
        subscriptions_per_session=config.run_subscriptions_per_session,
        complete_grace=config.run_complete_grace,
        auth_enabled=auth_enabled,
    )
    await runs.recover()
    chats = Chats(
        registry,
        store.goals,
        ChatLimits(
            config.chat_ack_timeout,
            config.chat_buffer,
            config.chat_stall_timeout,
            buffer_bytes=config.chat_buffer_bytes,
        ),
    )
    await chats.start()
    tool_hosts = ToolHosts(
        ToolHostLimits(
            max_hosts=config.tool_hosts_max,
            max_tools=config.tool_host_max_tools,
            max_pending=config.tool_host_max_pending,
            max_pending_bytes=config.tool_host_max_pending_bytes,
            stall_timeout=config.tool_host_stall_timeout,
            register_timeout=config.tool_host_register_timeout,
        ),
        metrics,
        tool_timeout=config.tool_timeout,
        callback_grace=config.callback_grace,
        auth_enabled=auth_enabled,
    )
    voice = Voice(
        VoiceLimits(
            audio_queue=config.voice_audio_queue,
            event_queue=config.voice_event_queue,
            audio_queue_bytes=config.voice_audio_queue_bytes,
            event_queue_bytes=config.voice_event_queue_bytes,
            stall_timeout=config.voice_stall_timeout,
            ack_timeout=config.voice_ack_timeout,
            max_chunk_bytes=config.voice_max_chunk_bytes,
            sessions_per_client=config.voice_sessions_per_client,
        ),
        metrics,
    )
    meetings = Meetings(store.meetings, voice, max_segments=config.meeting_max_segments)
    await meetings.recover()
    a2ui = A2ui(
        store.a2ui,
        events,
        metrics,
        RouteSealer.beside_tokens(config.token_dir),
        A2aClient(timeout=config.a2a_send_timeout, max_response_bytes=config.a2a_send_max_bytes),
        A2uiLimits(
            max_components=config.a2ui_max_components,
            max_surface_bytes=config.a2ui_max_surface_bytes,
            max_surfaces_per_owner=config.a2ui_max_surfaces_per_owner,
            max_surfaces=config.a2ui_max_surfaces,
            surface_ttl=config.a2ui_surface_ttl,
            max_peers=config.a2a_max_peers,
        ),
        reap_interval=config.a2ui_reap_interval,
    )
    await a2ui.start()
    status = Status(
        registry,
        chats,
        store.runs,
        approvals,
        store,
        metrics,
        approvals_enabled=config.approvals,
        cluster=cluster,
    )
    a2a_sessions = A2aSessions()
    router = Router(
        [
            authentication,
            Tools(tool_hosts, config.tool_timeout, config.callback_grace),
            tool_hosts,
            Policies(),
            KeyValue(),
            runs,
            chats,
            host,
            approvals,
            voice,
            meetings,
            a2ui,
            status,
            a2a_sessions,
        ]
    )
    dispatcher = Dispatcher(
        router,
        gate=approvals.gate,
        gated_methods=gated,
        handler_timeout=config.handler_timeout,
        auth_enabled=auth_enabled,
        metrics=metrics,
    )
    grpc = GrpcService(
        registry,
        authentication,
        dispatcher,
        max_inflight=config.max_inflight_per_session,
        multiplex_stream_bytes=config.multiplex_stream_bytes,
        multiplex_stall_timeout=config.multiplex_stall_timeout,
        auth_timeout=config.auth_timeout,
    )
    a2a = None
    if config.a2a:
        a2a = A2aServer(
            chats=chats,
            registry=registry,
            host=host,
            clients=store.a2a_clients,
            tasks=store.a2a_tasks,
            limits=A2aLimits(
                max_body_bytes=config.a2a_max_body_bytes,
                task_timeout=config.a2a_task_timeout,
                reply_max_bytes=config.a2a_reply_max_bytes,
                tasks_per_caller=config.a2a_tasks_per_caller,
                stored_tasks_per_caller=config.a2a_stored_tasks_per_caller,
            ),
        )
        await a2a.start()
        a2a_sessions.server = a2a
    peer_service = peers = None
    keep: list[object] = []
    if cluster is not None:
        assert store.cluster is not None
        peers = Peers(store.cluster, cluster_secret, ack_timeout=config.chat_ack_timeout)
        chats.peers = peers
        peer_service = PeerService(cluster_secret, registry, chats)
        grpc.locate_session = peers.locate_session
        keep.append(ClusterAttachments(cluster, registry))
        if tokens is not None:
            authentication.refresh_peers = cluster.refresh_members
        _connect(cluster, events, runs, approvals, registry, chats, keep)
    return CoreParts(
        config=config,
        store=store,
        metrics=metrics,
        tokens=tokens,
        agent_tokens=agent_tokens,
        registry=registry,
        events=events,
        approvals=approvals,
        host=host,
        runs=runs,
        chats=chats,
        tool_hosts=tool_hosts,
        voice=voice,
        meetings=meetings,
        a2ui=a2ui,
        status=status,
        router=router,
        grpc=grpc,
        a2a=a2a,
        cluster=cluster,
        peer_service=peer_service,
        peers=peers,
        _keep=keep,
    )


def _connect(
    cluster: Cluster,
    events: HostEvents,
    runs: Runs,
    approvals: Approvals,
    registry: SessionRegistry,
    chats: Chats,
    keep: list[object],
) -> None:
    """What crosses cores through the cluster's messages (core/cluster.py), both ways."""
    tasks: set[asyncio.Task[None]] = set()
    keep.append(tasks)

    def event_from_elsewhere(message: Message) -> None:
        if not from_elsewhere(cluster, message):
            return
        event = event_of(message)
        if event.kind.startswith("approval.") and event.HasField("payload"):
            approval = host_pb2.HostApproval()
            with contextlib.suppress(codec.CodecError):
                codec.json_to_message(codec.value_to_json(event.payload), approval)
                approvals.heard_elsewhere(event.kind, approval)
        events.publish_from_elsewhere(event)

    def spawn(work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def approval_from_elsewhere(message: Message) -> None:
        if from_elsewhere(cluster, message):
            spawn(approvals.resolved_elsewhere(str(message["id"])))

    events.forward = cluster.publish_event
    cluster.on("event", event_from_elsewhere)
    runs.committed = lambda run_id: cluster.publish("run", run=run_id)
    cluster.on("run", lambda message: runs.appended_elsewhere(str(message["run"])))
    cluster.on_connected(runs.catch_up_all)
    cluster.on_lost(runs.lost_hold)
    cluster.on_lost(lambda: spawn(approvals.lost_hold()))
    approvals.tell_resolved = lambda approval_id: cluster.publish("approval", id=approval_id)
    cluster.on("approval", approval_from_elsewhere)
    cluster.on_released(lambda released: approvals.announce_released(released.approvals))
    cluster.stats = lambda: {
        "sessions": sum(1 for s in registry.sessions.values() if s.streaming),
        "agents": len(registry.attached),
        "chats": len(chats.open),
        "runs": len(runs.live),
        "approvals": len(approvals.pending()),
    }
