"""ServerState: the one owner of everything the core holds.

Sessions, agent attachments, tokens and the store live here; each domain (tools and
proposals, runs, chats, host events and approvals) keeps its state in an object that
hangs off this one. Nothing about WebSocket or JSON is known here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from car_grpc.clock import now_ms
from car_grpc.config import Config
from car_grpc.core.auth import AgentTokens, ServerTokens
from car_grpc.core.metrics import Metrics
from car_grpc.core.session import ClientSession, Role
from car_grpc.store.repositories import Store

if TYPE_CHECKING:
    from car_grpc.core.approvals import Approvals
    from car_grpc.core.chats import Chats
    from car_grpc.core.host import Host
    from car_grpc.core.meetings import Meetings
    from car_grpc.core.runs import Runs
    from car_grpc.core.voice import Voice

log = logging.getLogger(__name__)

#: `gate(session, method, request)`: returns when the request may run, raises CarError
#: when it may not (the approval gate).
Gate = Callable[[ClientSession, str, Message], Awaitable[None]]
#: Called with (agent_id, old session) when an attachment is replaced or ends.
DetachHook = Callable[[str, ClientSession], Awaitable[None]]
#: Called once at shutdown, after every session has closed and before the store closes.
ShutdownHook = Callable[[], Awaitable[None]]


async def _open_gate(session: ClientSession, method: str, request: Message) -> None:
    return None


class ServerState:
    #: Host events and the host's agent registry (set by domains.install).
    host: Host
    #: The approval ledger and the approval gate (set by domains.install).
    approvals: Approvals
    #: Chats between hosts and attached agents, and standing goals (set by domains.install).
    chats: Chats
    #: Agent runs and their live readers (set by domains.install).
    runs: Runs
    #: Speech engines and the voice sessions they serve (set by domains.install).
    voice: Voice
    #: Meetings and their transcripts (set by domains.install).
    meetings: Meetings

    def __init__(self, config: Config, store: Store, tokens: ServerTokens | None) -> None:
        self.config = config
        self.store = store
        #: None when auth is off.
        self.tokens = tokens
        self.agent_tokens = AgentTokens(store.agent_tokens)
        self.sessions: dict[str, ClientSession] = {}
        #: agent_id -> the live session attached as that agent.
        self.attached: dict[str, ClientSession] = {}
        self.detach_hooks: list[DetachHook] = []
        self.gate: Gate = _open_gate
        self.shutdown_hooks: list[ShutdownHook] = []
        self.metrics = Metrics()
        #: Unix ms when this core started (uptime).
        self.started_at = now_ms()

    @property
    def auth_enabled(self) -> bool:
        return self.tokens is not None

    def open_session(self, *, streaming: bool, peer: str = "") -> ClientSession:
        session = ClientSession(self, streaming=streaming, peer=peer)
        self.sessions[session.id] = session
        if streaming:
            self.metrics.sessions_opened.inc()
        return session

    async def close_session(self, session: ClientSession) -> None:
        self.sessions.pop(session.id, None)
        if session.agent_id and self.attached.get(session.agent_id) is session:
            del self.attached[session.agent_id]
            await self._run_detach_hooks(session.agent_id, session)
        await session.close()

    async def attach(self, session: ClientSession, agent_id: str) -> None:
        """Bind `session` to `agent_id`; a previous live attachment is replaced."""
        old = self.attached.get(agent_id)
        session.role = Role.AGENT
        session.agent_id = agent_id
        self.attached[agent_id] = session
        if old is not None and old is not session:
            log.info("agent %s re-attached; replacing session %s", agent_id, old.id[:8])
            await self._run_detach_hooks(agent_id, old)

    async def _run_detach_hooks(self, agent_id: str, session: ClientSession) -> None:
        for hook in self.detach_hooks:
            try:
                await hook(agent_id, session)
            except Exception:
                log.exception("detach hook failed for agent %s", agent_id)

    async def shutdown(self) -> None:
        for session in list(self.sessions.values()):
            await self.close_session(session)
        for hook in self.shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
