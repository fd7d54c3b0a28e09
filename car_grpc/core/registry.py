"""The live sessions of a core and which session each agent is attached as.

A session is opened by the gRPC layer (a Connect stream, or one typed call) and closed
when it ends; an agent is attached by session.auth with an agent token. A newer attachment
of the same agent replaces the older one (docs/protocol.md §2): the domains that route to
agents (chats) hear of it through their detach hooks, as they do when the session closes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from car_grpc.core.metrics import Metrics
from car_grpc.core.session import ClientSession, Role, SessionLimits
from car_grpc.wire.errors import resource_exhausted

log = logging.getLogger(__name__)

#: Called with (agent_id, old session) when an attachment is replaced or ends.
DetachHook = Callable[[str, ClientSession], Awaitable[None]]
#: Called with (agent_id, session) before an attachment takes effect; raising refuses it.
AttachHook = Callable[[str, ClientSession], Awaitable[None]]


class SessionRegistry:
    def __init__(
        self,
        limits: SessionLimits,
        metrics: Metrics,
        *,
        auth_enabled: bool,
        max_sessions: int = 65_536,
    ) -> None:
        self._limits = limits
        self._metrics = metrics
        self.auth_enabled = auth_enabled
        self.sessions: dict[str, ClientSession] = {}
        #: Sessions of session streams and long-lived typed streams (`holding_stream`)
        #: held at most (CoreConfig.max_sessions), and now.
        self.max_sessions = max_sessions
        self.streamed = 0
        self._refusing = False  # said in the log since a session last opened
        #: agent_id -> the live session attached as that agent.
        self.attached: dict[str, ClientSession] = {}
        self._detach_hooks: list[DetachHook] = []
        self._attach_hooks: list[AttachHook] = []

    def on_attach(self, hook: AttachHook) -> None:
        self._attach_hooks.append(hook)

    def on_detach(self, hook: DetachHook) -> None:
        self._detach_hooks.append(hook)

    def check_room(self, *, stream: bool = False) -> None:
        """Raise RESOURCE_EXHAUSTED, naming the limit, when the core holds max_sessions
        sessions and streams already (a stream is refused before it is answered);
        `stream`: the refusal is of a typed stream, not a session."""
        if self.streamed >= self.max_sessions:
            most = self.max_sessions
            refused = (
                f"too many streams: the core holds at most {most} sessions and streams"
                " (max_sessions)"
                if stream
                else f"too many sessions: the core holds at most {most} (max_sessions)"
            )
            if not self._refusing:  # once until one opens again: a flood floods no log
                self._refusing = True
                log.warning("refusing sessions: %s", refused)
            raise resource_exhausted(refused)
        self._refusing = False

    @contextlib.contextmanager
    def holding_stream(self) -> Iterator[None]:
        """A long-lived typed stream (a subscription, a chat, a tool host's or a voice
        engine's stream) counted with the sessions under max_sessions while it lasts,
        however it ends; refused (`check_room`) when there is no room. Taken once the
        caller is authenticated and allowed, so no one else ever holds a slot."""
        self.check_room(stream=True)
        self.streamed += 1
        try:
            yield
        finally:
            self.streamed -= 1

    def open(self, *, streaming: bool, peer: str = "") -> ClientSession:
        """A new session; a streaming one only while there is room (`check_room`)."""
        if streaming:
            self.check_room()
        session = ClientSession(
            self._limits,
            self._metrics,
            auth_enabled=self.auth_enabled,
            streaming=streaming,
            peer=peer,
        )
        self.sessions[session.id] = session
        if streaming:
            self.streamed += 1
            self._metrics.sessions_opened.inc()
        return session

    async def close(self, session: ClientSession) -> None:
        if self.sessions.pop(session.id, None) is not None and session.streaming:
            self.streamed -= 1
        if session.agent_id and self.attached.get(session.agent_id) is session:
            del self.attached[session.agent_id]
            await self._detached(session.agent_id, session)
        await session.close()

    async def attach(self, session: ClientSession, agent_id: str) -> None:
        """Bind `session` to `agent_id`; a previous live attachment is replaced."""
        for hook in self._attach_hooks:
            await hook(agent_id, session)
        old = self.attached.get(agent_id)
        session.role = Role.AGENT
        session.agent_id = agent_id
        self.attached[agent_id] = session
        if old is not None and old is not session:
            log.info("agent %s re-attached; replacing session %s", agent_id, old.id[:8])
            await self._detached(agent_id, old)

    async def release(self, agent_id: str) -> None:
        """The agent attached on another core: this core's attachment of it ends (its
        session stays open, as when it is replaced here)."""
        old = self.attached.pop(agent_id, None)
        if old is not None:
            log.info("agent %s attached on another core; releasing %s", agent_id, old.id[:8])
            await self._detached(agent_id, old)

    async def _detached(self, agent_id: str, session: ClientSession) -> None:
        for hook in self._detach_hooks:
            try:
                await hook(agent_id, session)
            except Exception:
                log.exception("detach hook failed for agent %s", agent_id)

    async def close_all(self) -> None:
        for session in list(self.sessions.values()):
            await self.close(session)
