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


class StreamCap:
    """At most `most` streams of one kind held at once (the sessions and typed streams of
    the registry; health watches; reflection streams); one more is refused with
    RESOURCE_EXHAUSTED naming `limit` (the config field), said once in the log until one
    is let in again."""

    def __init__(self, most: int, what: str, limit: str) -> None:
        self.most = most
        self.what = what
        self.limit = limit
        self.held = 0
        self._refusing = False  # said in the log since one was last let in

    def check(self, refused: str = "") -> None:
        """Raise the refusal (`refused`, else "too many <what>: ...") when it is full."""
        if self.held < self.most:
            self._refusing = False
            return
        refused = (
            refused or f"too many {self.what}: the core holds at most {self.most} ({self.limit})"
        )
        if not self._refusing:  # once until one is let in again: a flood floods no log
            self._refusing = True
            log.warning("refusing %s: %s", self.what, refused)
        raise resource_exhausted(refused)

    @contextlib.contextmanager
    def holding(self, refused: str = "") -> Iterator[None]:
        """A slot while the stream lasts, freed however it ends."""
        self.check(refused)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1


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
        #: Sessions of session streams and long-lived typed streams (`holding_stream`),
        #: at most CoreConfig.max_sessions together.
        self.room = StreamCap(max_sessions, "sessions", "max_sessions")
        #: agent_id -> the live session attached as that agent.
        self.attached: dict[str, ClientSession] = {}
        self._detach_hooks: list[DetachHook] = []
        self._attach_hooks: list[AttachHook] = []

    def on_attach(self, hook: AttachHook) -> None:
        self._attach_hooks.append(hook)

    def on_detach(self, hook: DetachHook) -> None:
        self._detach_hooks.append(hook)

    @property
    def streamed(self) -> int:
        """Sessions and typed streams held now (`room`)."""
        return self.room.held

    def check_room(self) -> None:
        """Raise RESOURCE_EXHAUSTED, naming the limit, when the core holds max_sessions
        sessions and streams already (a stream is refused before it is answered)."""
        self.room.check()

    def holding_stream(self) -> contextlib.AbstractContextManager[None]:
        """A long-lived typed stream (a subscription, a chat, a tool host's or a voice
        engine's stream) counted with the sessions under max_sessions while it lasts,
        however it ends; refused when there is no room. Taken once the caller is
        authenticated and allowed, so no one else ever holds a slot."""
        most = self.room.most
        return self.room.holding(
            f"too many streams: the core holds at most {most} sessions and streams (max_sessions)"
        )

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
            self.room.held += 1
            self._metrics.sessions_opened.inc()
        return session

    async def close(self, session: ClientSession) -> None:
        if self.sessions.pop(session.id, None) is not None and session.streaming:
            self.room.held -= 1
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
