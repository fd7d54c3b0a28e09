"""Host events and the host's agent registry (docs/protocol.md §6).

Every change a host cares about becomes a HostEvent with a strictly increasing
`sequence`; the newest `Config.host_event_history` events are kept for snapshots and for
WatchHostEvents to resume from. Events fan out to listeners (sessions that called
host.subscribe, and WatchHostEvents streams), each with its own bounded queue. Publishing
never waits: when a listener's queue is full its oldest queued event is dropped for the
new one, so a stalled subscriber slows neither the publisher (the approval gate, a
registering agent) nor any other subscriber, and once it reads again it gets the newest
events after a visible gap in `sequence`.

Agents in the registry belong to the session that registered them: only that session may
change or remove them, and they leave the registry when it closes.

A session attached as an agent hears only the events about itself (`agent_id` its own):
its listener filters them, and its snapshots are filtered the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from car_grpc.clock import now_ms
from car_grpc.core.metrics import Metrics
from car_grpc.core.router import Reply, handles, streams
from car_grpc.core.session import ClientSession, Role, SessionClosed
from car_grpc.v1 import host_pb2, session_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import CarError, invalid_params, require
from car_grpc.wire.twins import fill_out

#: Events a host.subscribe snapshot carries (the newest ones).
SNAPSHOT_EVENTS = 100
#: Agents one session may have registered at a time.
MAX_AGENTS_PER_SESSION = 256


class Listener:
    """One consumer of host events, with its own bounded queue; with `agent_id`, only of
    the events about that agent."""

    def __init__(self, size: int, metrics: Metrics, agent_id: str | None = None) -> None:
        self.agent_id = agent_id
        self.queue: asyncio.Queue[host_pb2.HostEvent] = asyncio.Queue(size)
        #: Events missed because the queue was full.
        self.dropped = 0
        self._metrics = metrics
        #: The task forwarding events to a host.subscribe session, once started.
        self.pump: asyncio.Task[None] | None = None

    def hears(self, event: host_pb2.HostEvent) -> bool:
        return self.agent_id is None or event.agent_id == self.agent_id

    def offer(self, event: host_pb2.HostEvent) -> None:
        """Queue `event` without waiting, dropping the oldest queued one if full."""
        if not self.hears(event):
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            self._metrics.queue_drops.inc("host_events")
        self.queue.put_nowait(event)

    async def next(self) -> host_pb2.HostEvent:
        return await self.queue.get()

    def end(self) -> None:
        if self.pump is not None:
            self.pump.cancel()


@dataclass
class _Registered:
    agent: host_pb2.HostAgent
    owner: str  # id of the session that registered it


def ownership_error(agent_id: str) -> CarError:
    return invalid_params(f"agent '{agent_id}' is owned by another session")


class HostEvents:
    """The host event log: strictly increasing sequences, the newest `history` events
    kept, and listeners that each get every later event through a bounded queue."""

    def __init__(self, history: int, queue_size: int, metrics: Metrics | None = None) -> None:
        if history < 1 or queue_size < 1:
            raise ValueError("host_event_history and host_event_queue must be at least 1")
        self.history: deque[host_pb2.HostEvent] = deque(maxlen=history)
        self._last_sequence = 0
        self._queue_size = queue_size
        #: Counts the events listeners drop (the core's; a private one when standalone).
        self._metrics = metrics or Metrics()
        self._listeners: set[Listener] = set()
        #: `host_event` notifications by sequence, serialized once for every subscriber
        #: (the newest `queue_size`: what a listener's queue can hold).
        self._notifications: dict[int, bytes] = {}
        #: Gets every event published here (the cluster sends them to the other cores).
        self.forward: Callable[[host_pb2.HostEvent], None] | None = None

    @property
    def last_sequence(self) -> int:
        """The sequence of the newest event (0 before the first)."""
        return self._last_sequence

    def publish(
        self,
        kind: str,
        *,
        agent_id: str | None = None,
        message: str | None = None,
        payload: codec.JSON = None,
    ) -> host_pb2.HostEvent:
        """Record an event and offer it to every listener, without waiting."""
        self._last_sequence += 1
        event = host_pb2.HostEvent(
            id=uuid.uuid4().hex, sequence=self._last_sequence, timestamp=now_ms(), kind=kind
        )
        if agent_id:
            event.agent_id = agent_id
        if message is not None:
            event.message = message
        if payload is not None:
            event.payload.CopyFrom(codec.to_value(payload))
        self._record(event)
        if self.forward is not None:
            self.forward(event)
        return event

    def publish_from_elsewhere(self, event: host_pb2.HostEvent) -> None:
        """An event another core of the cluster published: recorded here under this log's
        next sequence (its id, time and content kept), so every core's events come in one
        order per origin and resume works as for this core's own."""
        self._last_sequence += 1
        event.sequence = self._last_sequence
        self._record(event)

    def _record(self, event: host_pb2.HostEvent) -> None:
        self.history.append(event)
        for listener in self._listeners:
            listener.offer(event)

    def notification(self, event: host_pb2.HostEvent) -> bytes:
        """`event` as a serialized `host_event` ServerFrame, made once for all listeners."""
        cached = self._notifications.get(event.sequence)
        if cached is None:
            cached = fill_out(session_pb2.ServerFrame(host_event=event)).SerializeToString()
            self._notifications[event.sequence] = cached
            if len(self._notifications) > self._queue_size:
                del self._notifications[next(iter(self._notifications))]  # the oldest made
        return cached

    def listen(self, session: ClientSession | None = None) -> Listener:
        """A new listener: it receives every event published from now on that `session`
        may hear (an attached agent: the events about itself)."""
        agent_id = session.agent_id if session and session.role is Role.AGENT else None
        listener = Listener(self._queue_size, self._metrics, agent_id)
        self._listeners.add(listener)
        return listener

    def unlisten(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        listener.end()


class Host:
    """host.subscribe (a snapshot, then `host.event` notifications), WatchHostEvents, and
    the host's agent registry. `pending_approvals` gives the approvals a session may see,
    for the snapshot."""

    def __init__(
        self,
        events: HostEvents,
        pending_approvals: Callable[[ClientSession], list[host_pb2.HostApproval]],
    ) -> None:
        self.events = events
        self._pending_approvals = pending_approvals
        #: session id -> the listener of its host.subscribe.
        self._subscriptions: dict[str, Listener] = {}
        self._agents: dict[str, _Registered] = {}
        #: Sessions whose close hook is installed.
        self._hooked: set[str] = set()

    def subscribe(self, session: ClientSession) -> Listener:
        """The host.subscribe listener of `session`, replacing an earlier one."""
        if old := self._subscriptions.pop(session.id, None):
            self.events.unlisten(old)
        self._hook(session)
        listener = self._subscriptions[session.id] = self.events.listen(session)
        return listener

    def start_pump(self, session: ClientSession, listener: Listener) -> None:
        """Forward the listener's events to the session (after its snapshot is queued)."""
        if self._subscriptions.get(session.id) is listener and listener.pump is None:
            listener.pump = asyncio.create_task(_pump(session, listener, self.events))

    # ------------------------------------------------------------ agent registry

    def agents(self) -> list[host_pb2.HostAgent]:
        return [r.agent for r in self._agents.values()]

    def _owned(self, session: ClientSession, agent_id: str) -> _Registered | None:
        """The registration of `agent_id` if `session` owns it; None if unknown."""
        registered = self._agents.get(agent_id)
        if registered is not None and registered.owner != session.id:
            raise ownership_error(agent_id)
        return registered

    def register(
        self, session: ClientSession, req: host_pb2.RegisterAgentRequest
    ) -> host_pb2.HostAgent:
        name, kind = require(req.name, "name"), require(req.kind, "kind")
        agent_id = req.id or uuid.uuid4().hex
        now = now_ms()
        existing = self._owned(session, agent_id)
        if existing is None:
            owned = sum(1 for r in self._agents.values() if r.owner == session.id)
            if owned >= MAX_AGENTS_PER_SESSION:
                raise invalid_params(
                    f"invalid params: a session may register at most "
                    f"{MAX_AGENTS_PER_SESSION} agents"
                )
        agent = host_pb2.HostAgent(
            id=agent_id,
            name=name,
            kind=kind,
            capabilities=req.capabilities,
            status=existing.agent.status if existing else "registered",
            registered_at=existing.agent.registered_at if existing else now,
            updated_at=now,
        )
        if req.HasField("metadata"):
            agent.metadata.CopyFrom(req.metadata)
        self._hook(session)
        self._agents[agent_id] = _Registered(agent, session.id)
        self._announce("agent.registered", agent)
        return agent

    def unregister(self, session: ClientSession, agent_id: str) -> bool:
        if self._owned(session, require(agent_id, "agent_id")) is None:
            return False
        self._remove(agent_id)
        return True

    def set_status(
        self, session: ClientSession, req: host_pb2.SetAgentStatusRequest
    ) -> host_pb2.HostAgent:
        agent_id = require(req.agent_id, "agent_id")
        status = require(req.status, "status")
        registered = self._owned(session, agent_id)
        if registered is None:
            raise invalid_params(f"invalid params: unknown agent: {agent_id}")
        agent = registered.agent
        agent.status = status
        agent.updated_at = now_ms()
        for key, value in req.extra.fields.items():
            agent.metadata.fields[key].CopyFrom(value)
        self._announce(
            "agent.status_changed", agent, req.message if req.HasField("message") else None
        )
        return agent

    def _remove(self, agent_id: str) -> None:
        registered = self._agents.pop(agent_id)
        self._announce("agent.unregistered", registered.agent)

    def _announce(self, kind: str, agent: host_pb2.HostAgent, message: str | None = None) -> None:
        self.events.publish(
            kind, agent_id=agent.id, message=message, payload=codec.message_to_json(agent)
        )

    # ------------------------------------------------------------ session lifecycle

    def _hook(self, session: ClientSession) -> None:
        if session.id not in self._hooked:
            self._hooked.add(session.id)
            session.on_close(self._session_closed)

    def _session_closed(self, session: ClientSession) -> None:
        self._hooked.discard(session.id)
        if listener := self._subscriptions.pop(session.id, None):
            self.events.unlisten(listener)
        for agent_id in [i for i, r in self._agents.items() if r.owner == session.id]:
            self._remove(agent_id)

    # ------------------------------------------------------------ handlers

    @handles("host_subscribe")
    async def host_subscribe(
        self, session: ClientSession, req: host_pb2.SubscribeHostRequest
    ) -> Reply:
        # Listener and snapshot are taken at one instant (no await in between), and events
        # flow only once the snapshot is queued: nothing is missed, nothing overtakes it.
        listener = self.subscribe(session)
        snapshot = host_pb2.SubscribeHostResponse(
            subscribed=True,
            agents=self.agents(),
            approvals=self._pending_approvals(session),
            events=[e for e in self.events.history if listener.hears(e)][-SNAPSHOT_EVENTS:],
        )
        return Reply(snapshot, then=lambda: self.start_pump(session, listener))

    @handles("host_register_agent", inline=True)
    async def host_register_agent(
        self, session: ClientSession, req: host_pb2.RegisterAgentRequest
    ) -> host_pb2.RegisterAgentResponse:
        return host_pb2.RegisterAgentResponse(agent=self.register(session, req))

    @handles("host_unregister_agent", inline=True)
    async def host_unregister_agent(
        self, session: ClientSession, req: host_pb2.UnregisterAgentRequest
    ) -> host_pb2.UnregisterAgentResponse:
        return host_pb2.UnregisterAgentResponse(ok=self.unregister(session, req.agent_id))

    @handles("host_set_status", inline=True)
    async def host_set_status(
        self, session: ClientSession, req: host_pb2.SetAgentStatusRequest
    ) -> host_pb2.SetAgentStatusResponse:
        return host_pb2.SetAgentStatusResponse(agent=self.set_status(session, req))

    @handles("host_agents", inline=True)
    async def host_agents(
        self, session: ClientSession, req: host_pb2.ListAgentsRequest
    ) -> host_pb2.ListAgentsResponse:
        return host_pb2.ListAgentsResponse(agents=self.agents())

    @streams("WatchHostEvents")
    async def watch_host_events(
        self, session: ClientSession, req: host_pb2.WatchHostEventsRequest
    ) -> AsyncIterator[host_pb2.WatchHostEventsResponse]:
        """Retained events after `after_sequence`, then live ones.

        When the resume point is older than the retained history, the stream starts at the
        oldest retained event: the client sees the gap in `sequence` (and can re-read the
        registry and the approvals). A resume point beyond the newest event belongs to an
        earlier server life (sequences restart at 1) and is refused.
        """
        events = self.events
        after = req.after_sequence
        if after > events.last_sequence:
            raise invalid_params(
                f"invalid params: after_sequence {after} is ahead of the newest host event "
                f"({events.last_sequence}); sequences restart at 1 when the server restarts"
            )
        listener = events.listen(session)  # before the replay: the two meet without a gap
        replay = [e for e in events.history if e.sequence > after and listener.hears(e)]
        try:
            for event in replay:
                yield host_pb2.WatchHostEventsResponse(event=event)
            while True:
                yield host_pb2.WatchHostEventsResponse(event=await listener.next())
        finally:
            events.unlisten(listener)


async def _pump(session: ClientSession, listener: Listener, events: HostEvents) -> None:
    with contextlib.suppress(SessionClosed):
        while True:
            await session.send(events.notification(await listener.next()))
