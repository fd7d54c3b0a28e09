"""Chats between hosts and attached agents, and standing goals (docs/protocol.md §5).

A host asks for a chat with an attached agent; the chat is routed by its session_id to the
agent's connection at that moment. The server reverse-calls `agent.chat` there and answers
the host only once the agent has acknowledged. From then on the agent's `agent.chat.event`
notifications reach the originating host, and only it, as `agents.chat.event`, until a
terminal kind (done, error, auth_required) ends the routing; anything later is dropped.
Every accepted chat a host still listens to ends with exactly one terminal event: the
agent's own, or one the server makes up when the agent goes away, is replaced, the chat is
cancelled, or the host stopped reading for too long.

Each chat's events flow through one bounded EventBuffer (car_grpc.core.event_buffer) to the
host: a pump task for hosts on the session stream, the Chat RPC itself for gRPC hosts. A
full buffer slows the agent down instead of dropping tokens, within `chat_stall_timeout`.

A standing goal (goal.set) belongs to a chat session_id, and to the principal that set it
(GoalScope): a host or agent token sees and changes only its own goals, the daemon token
every goal. Chats of that session whose host may see the goal carry it when the host gives
none, and its status follows their goal_evaluated and terminal events.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import urlsplit

from google.protobuf import struct_pb2

from car_grpc.core.event_buffer import EventBuffer, PutResult
from car_grpc.core.keyed_order import KeyedOrder
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.router import Reply, handles, handles_notification, streams
from car_grpc.core.session import ClientSession, Role, SessionClosed
from car_grpc.store.repositories import GoalStore
from car_grpc.v1 import chats_pb2, session_pb2
from car_grpc.wire import chat_text
from car_grpc.wire.errors import INTERNAL, CarError, failed_precondition, field_error, require

if TYPE_CHECKING:
    from car_grpc.core.peers import Peers, RemoteChat

log = logging.getLogger(__name__)


#: Event kinds that end a chat.
TERMINAL_KINDS = frozenset({"done", "error", "auth_required"})
#: Decisions (besides `true`) that approve in agents.chat.approve.
APPROVING = frozenset({"approve", "approved", "yes"})
IMAGE_MEDIA_TYPES = frozenset({"png", "jpeg", "gif", "webp"})
DEFAULT_MAX_ITERATIONS = 8
MAX_ITERATIONS = 50

GoalStatus: TypeAlias = chats_pb2.GoalStatus.ValueType


@dataclass(frozen=True)
class GoalScope:
    """Whose goals a caller sees and changes: those of `owner` (the principal that sets
    them), or every goal (`sees_all`: the daemon token). Another owner's goal is answered
    as absent, so a caller never learns what it may not see."""

    owner: str
    sees_all: bool

    @classmethod
    def of(cls, session: ClientSession) -> GoalScope:
        return cls(session.principal, session.role is Role.DAEMON)

    @property
    def filter(self) -> str | None:
        """The owner the store is asked about (None: every owner)."""
        return None if self.sees_all else self.owner


# ------------------------------------------------------------------ validation (pure)


def valid_goal(check: str, max_iterations: int | None, field: str) -> chats_pb2.ChatGoal:
    """A goal with its check required and max_iterations defaulted and clamped to 1..50."""
    if not check.strip():
        raise field_error(f"{field}.check" if field else "check")
    n = DEFAULT_MAX_ITERATIONS if max_iterations is None else max_iterations
    return chats_pb2.ChatGoal(check=check, max_iterations=min(max(n, 1), MAX_ITERATIONS))


def _inline_goal(goal: chats_pb2.ChatGoal, field: str) -> chats_pb2.ChatGoal:
    max_iterations = goal.max_iterations if goal.HasField("max_iterations") else None
    return valid_goal(goal.check, max_iterations, field)


def check_attachments(attachments: Iterable[chats_pb2.ChatAttachment]) -> None:
    """-32602 naming the first attachment field that is missing or wrong."""
    for i, a in enumerate(attachments):
        name = f"attachments[{i}]"
        if a.type == chats_pb2.ATTACHMENT_TYPE_IMAGE_BASE64:
            if not a.data:
                raise field_error(f"{name}.data", "image_base64 needs string data")
            if a.media_type.removeprefix("image/") not in IMAGE_MEDIA_TYPES:
                raise field_error(
                    f"{name}.media_type", "media_type must be image/png, jpeg, gif or webp"
                )
        elif a.type == chats_pb2.ATTACHMENT_TYPE_IMAGE_URL:
            url = urlsplit(a.url)
            if url.scheme.lower() not in ("http", "https") or not url.netloc:
                raise field_error(f"{name}.url", "image_url must be an http(s) URL")
        else:
            raise field_error(f"{name}.type", "type must be image_base64 or image_url")


def decision_approves(decision: struct_pb2.Value) -> bool:
    """true, or "approve" / "approved" / "yes", approves; anything else denies."""
    kind = decision.WhichOneof("kind")
    if kind == "bool_value":
        return decision.bool_value
    if kind == "string_value":
        return decision.string_value.strip().lower() in APPROVING
    return False


def goal_status_after(kind: str | None, evaluated: bool, met: bool) -> GoalStatus:
    """A goal's status once the chat running it ends with `kind` (None: cancelled)."""
    if met:
        return chats_pb2.GOAL_STATUS_MET
    if kind in ("error", "auth_required"):
        return chats_pb2.GOAL_STATUS_ERROR
    if kind == "done" and not evaluated:
        return chats_pb2.GOAL_STATUS_UNEVALUATED
    return chats_pb2.GOAL_STATUS_ACTIVE  # the goal still stands; no chat runs it


def _not_attached(agent_id: str) -> CarError:
    """No session is attached as `agent_id` (on any core): -32603 on the JSON wire, as
    car-runtime expects, and FAILED_PRECONDITION for typed clients (a state, not a fault)."""
    return failed_precondition(INTERNAL, f"agent '{agent_id}' is not attached")


def _error_event(message: str) -> chats_pb2.ChatEvent:
    return chats_pb2.ChatEvent(kind="error", message=message)


# ------------------------------------------------------------------ the chat registry


@dataclass(eq=False)
class Chat:
    session_id: str
    agent_id: str
    #: The agent's connection the chat was routed to (only it may emit events); None
    #: for a chat with an agent on another core of the cluster (`remote`).
    agent: ClientSession | None
    #: The originating host's session.
    host: ClientSession
    #: The host's notices, or (for a host behind car-grpc's gateway) their frames written
    #: from the agent's text (chat_text.py).
    events: EventBuffer[chats_pb2.ChatEventNotice | bytes]
    #: The stored goal's status when the chat began (None: no stored goal to follow).
    goal_before: GoalStatus | None
    #: Whose goal it follows (GoalScope.filter of its host; None: the daemon's, any
    #: owner's): its writes leave alone a goal another caller set on the session_id since.
    goal_owner: str | None = None
    accepted: bool = False
    #: Why the chat ended before the agent's ack was in.
    lost: str | None = None
    evaluated: bool = False
    met: bool = False
    #: Delivers events to a session-stream host.
    pump: asyncio.Task[None] | None = None
    #: The chat on the agent's core, when that is another core.
    remote: RemoteChat | None = None
    #: Brings a remote chat's events into `events`.
    relay: asyncio.Task[None] | None = None
    #: Set while the pump delivers to a host of car-grpc's gateway: what its notices'
    #: text starts with (chat_text.notice_head); the agent's text is then spliced in.
    text_head: bytes | None = None


@dataclass(frozen=True)
class ChatLimits:
    """Config's chat fields: how long an agent has to ack, a chat's event buffer, and how
    long a host that stops reading keeps its chat."""

    ack_timeout: float
    buffer: int
    stall_timeout: float
    buffer_bytes: int


class Chats:
    """Open chats by session_id, the chats of each host, and the goal book. Agents are
    found in `registry` (where they are attached)."""

    def __init__(self, registry: SessionRegistry, goals: GoalStore, limits: ChatLimits) -> None:
        self._registry = registry
        self.limits = limits
        self.goals = goals
        #: Goal store calls take effect in the order they are made, per chat session.
        self._goal_order = KeyedOrder()
        #: Routed chats: session_id -> chat. A chat leaves when it ends.
        self.open: dict[str, Chat] = {}
        #: host session id -> its chats still routed or still being delivered. The key
        #: stays while the host lives: it marks the close hook as registered.
        self._by_host: dict[str, set[Chat]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Agents attached on other cores of the cluster (None: a core of its own).
        self.peers: Peers | None = None

    async def start(self) -> None:
        """After a restart no chat of this core runs any goal: its `running` goals become
        `active` (in a cluster the store resets only this core's)."""
        await self._goal_order.run(None, self.goals.reset_running)
        self._registry.on_detach(self._agent_detached)

    async def drain(self) -> None:
        """Wait for background goal writes (at shutdown, before the store closes)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    # -------------------------------------------------------------- store, in order

    def _write_goal(self, session_id: str, call: Callable[[], Awaitable[object]]) -> None:
        task = asyncio.create_task(self._background(session_id, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background(self, session_id: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            await self._goal_order.run(session_id, call)
        except Exception:
            log.exception("goal status update failed")

    # -------------------------------------------------------------- opening a chat

    async def open_chat(
        self,
        host: ClientSession,
        req: chats_pb2.ChatRequest,
        *,
        local_only: bool = False,
        goals: GoalScope | None = None,
        pumped: bool = False,
    ) -> Chat:
        """Validate, route to the attached agent and wait for its ack.

        Returns the accepted chat; raises CarError (-32602 for bad params, -32603 when the
        agent is not attached (FAILED_PRECONDITION on typed RPCs), refuses, disconnects or
        does not ack in time). An agent
        attached on another core of the cluster is chatted with there (`local_only`: the
        request came from another core, which looked already). The stored goal of the
        session_id is used only when it is within `goals` (default: the host's scope).
        `pumped`: the events go to the host by `start_pump`.
        """
        goals = goals or GoalScope.of(host)
        agent_id = require(req.agent_id, "agent_id")
        require(req.prompt, "prompt")
        check_attachments(req.attachments)
        goal = _inline_goal(req.goal, "goal") if req.HasField("goal") else None
        if goal is not None and req.attachments:
            raise field_error("goal", "goal and attachments are mutually exclusive")
        session_id = req.session_id or f"chat-{uuid.uuid4()}"
        owner = goals.filter
        # A session_id drawn here is new to every store and core: no goal can be stored
        # for it yet (nobody knew it), so there is nothing to read.
        stored = (
            await self._goal_order.run(session_id, lambda: self.goals.get(session_id, owner))
            if req.session_id
            else None
        )
        # From here to the reverse call nothing awaits: routing is set up atomically.
        if session_id in self.open:
            raise field_error("session_id", "a chat with this session_id is already open")
        agent = self._registry.attached.get(agent_id)
        if agent is None:
            if self.peers is None or local_only:
                raise _not_attached(agent_id)
            return await self._open_remote(host, req, session_id, goals)
        if goal is None and stored is not None:
            goal = chats_pb2.ChatGoal(check=stored.check, max_iterations=stored.max_iterations)
        limit, stall = self.limits.buffer, self.limits.stall_timeout
        chat = Chat(
            session_id=session_id,
            agent_id=agent_id,
            agent=agent,
            host=host,
            events=EventBuffer(limit, stall, limit_bytes=self.limits.buffer_bytes),
            goal_before=stored.status if stored is not None else None,
            goal_owner=owner,
        )
        if pumped and host.bridged:
            # Set before the agent is asked: its first events may come with its ack, before
            # the pump starts, and are then written as text too (no notice, no twins walk).
            chat.text_head = chat_text.notice_head(session_id, agent_id)
        self._route(chat)
        if stored is not None:
            self._write_goal(
                session_id,
                lambda: self.goals.set_status(
                    session_id, chats_pb2.GOAL_STATUS_RUNNING, owner=owner
                ),
            )
        # Written straight into the frame that goes out (no request message to copy in).
        frame = session_pb2.ServerFrame(id=agent.next_callback_id())
        request = frame.agent_chat
        request.session_id = session_id
        request.prompt = req.prompt
        request.stream = req.stream if req.HasField("stream") else True
        if req.attachments:
            request.attachments.extend(req.attachments)
        request.context.host_client_id = host.id
        if req.HasField("model"):
            request.model = req.model
        if goal is not None:
            request.goal.CopyFrom(goal)
        await self._await_ack(chat, frame)
        return chat

    async def _open_remote(
        self, host: ClientSession, req: chats_pb2.ChatRequest, session_id: str, goals: GoalScope
    ) -> Chat:
        """The chat with an agent attached on another core: routed here (session_id, the
        host's close), carried there (its goal follows it there). The events come back
        through a relay task into the chat's buffer, as a local agent's would."""
        assert self.peers is not None
        limit, stall = self.limits.buffer, self.limits.stall_timeout
        events: EventBuffer[chats_pb2.ChatEventNotice | bytes] = EventBuffer(
            limit, stall, limit_bytes=self.limits.buffer_bytes
        )
        chat = Chat(session_id, req.agent_id, None, host, events, None)
        self._route(chat)
        forwarded = chats_pb2.ChatRequest()
        forwarded.CopyFrom(req)
        forwarded.session_id = session_id
        try:
            remote = await self.peers.open_chat(forwarded, goals)
        except CarError as e:  # as the agent's core refused it (its status kept)
            self._lost(chat, e.message, cancel_agent=False)
            raise
        except BaseException:
            self._lost(chat, "the host went away", cancel_agent=False)
            raise
        if remote is None:
            self._lost(chat, f"agent '{req.agent_id}' is not attached", cancel_agent=False)
            raise _not_attached(req.agent_id)
        chat.remote = remote
        if chat.lost is not None:  # the host went away meanwhile
            remote.cancel()
            raise CarError(INTERNAL, chat.lost)
        chat.accepted = True
        chat.relay = asyncio.create_task(self._relay_remote(chat, remote))
        return chat

    async def _relay_remote(self, chat: Chat, remote: RemoteChat) -> None:
        reason = f"agent '{chat.agent_id}' on core {remote.core_id} ended the chat"
        try:
            async for notice in remote.events():
                if self.open.get(chat.session_id) is not chat:
                    return  # ended here (cancelled, the host gone)
                terminal = notice.event.kind in TERMINAL_KINDS
                if terminal:
                    self._unroute(chat)
                outcome = await chat.events.put(notice, notice.ByteSize())
                if outcome is PutResult.STALLED:
                    self._stalled(chat)
                    return
                if terminal:
                    chat.events.close()
                    return
        except CarError as e:
            reason = f"agent '{chat.agent_id}' is gone: {e.message}"
        self.end(chat, reason, cancel_agent=False, tell_host=True, kind="error")

    async def _await_ack(self, chat: Chat, frame: session_pb2.ServerFrame) -> None:
        """Ask the agent (`frame`: its agent.chat request) and wait for its ack."""
        timeout = self.limits.ack_timeout
        who = f"agent '{chat.agent_id}'"
        assert chat.agent is not None
        try:
            answer = await chat.agent.call_frame(frame, "agent_chat", timeout)
        except TimeoutError:
            reason = f"{who} did not acknowledge the chat within {timeout:g}s"
            raise self._lost(chat, reason, cancel_agent=True) from None
        except SessionClosed:
            raise self._lost(chat, f"{who} disconnected", cancel_agent=False) from None
        except CarError as e:
            reason = f"{who} refused the chat: {e.message}"
            raise self._lost(chat, reason, cancel_agent=False) from None
        except BaseException:  # the host's request was cancelled: it went away
            self._lost(chat, "the host went away", cancel_agent=True)
            raise
        if chat.lost is not None:  # ended while the ack was on its way
            raise CarError(INTERNAL, chat.lost)
        if answer.WhichOneof("body") != "agent_chat" or not answer.agent_chat.accepted:
            raise self._lost(chat, f"{who} declined the chat", cancel_agent=False)
        chat.accepted = True

    def _lost(self, chat: Chat, reason: str, *, cancel_agent: bool) -> CarError:
        """End a chat that was never accepted; the error the host gets instead."""
        self.end(chat, reason, cancel_agent=cancel_agent, tell_host=False, kind=None)
        return CarError(INTERNAL, chat.lost or reason)

    # -------------------------------------------------------------- routing

    def _route(self, chat: Chat) -> None:
        self.open[chat.session_id] = chat
        host = chat.host
        if host.id not in self._by_host:
            self._by_host[host.id] = set()
            host.on_close(self._host_closed)
        self._by_host[host.id].add(chat)

    def _unroute(self, chat: Chat) -> bool:
        """Stop routing `chat`; False when it was no longer routed."""
        if self.open.get(chat.session_id) is not chat:
            return False
        del self.open[chat.session_id]
        if chat.pump is None or chat.pump.done():
            self._release(chat)
        return True

    def _release(self, chat: Chat) -> None:
        chats = self._by_host.get(chat.host.id)
        if chats is not None:
            chats.discard(chat)

    def _cancel_at_agent(self, chat: Chat) -> None:
        if chat.remote is not None:  # ending the call cancels the chat at the agent's core
            chat.remote.cancel()
            return
        if chat.agent is None:
            return
        notice = session_pb2.ServerFrame()
        notice.agent_chat_cancel.session_id = chat.session_id
        if not chat.agent.try_send(notice):
            log.warning("agent.chat.cancel for %s not delivered", chat.session_id)

    def authorized(self, session: ClientSession, session_id: str) -> Chat | None:
        """The open chat `session_id` if `session` may steer it: its originating host or a
        host-role session, never the agent itself."""
        chat = self.open.get(session_id)
        if chat is None or session is chat.agent or session.agent_id == chat.agent_id:
            return None
        return chat if session is chat.host or session.is_host else None

    # -------------------------------------------------------------- delivery to hosts

    def start_pump(self, chat: Chat) -> None:
        """Deliver the chat's events to its session-stream host as notifications. What the
        buffer holds already is written at once while the host's queue takes it (an agent's
        events often come with its ack): a chat over by then needs no pump task."""
        events, host = chat.events, chat.host
        while (first := events.get_nowait()) is not None:
            if not (isinstance(first, bytes) and host.send_now(first)):
                break
        else:
            if events.closed:  # closed and drained: every event is on its way
                if self.open.get(chat.session_id) is not chat:
                    self._release(chat)
                return
        chat.pump = asyncio.create_task(self._pump(chat, first))

    async def _pump(
        self, chat: Chat, first: chats_pb2.ChatEventNotice | bytes | None = None
    ) -> None:
        host = chat.host
        try:
            notice = first if first is not None else await chat.events.get()
            while notice is not None:
                if isinstance(notice, bytes):
                    if not host.send_now(notice):
                        await host.send(notice)
                else:
                    await host.notify("agents_chat_event", notice)
                notice = await chat.events.get()
        except SessionClosed:
            pass
        finally:
            if self.open.get(chat.session_id) is not chat:
                self._release(chat)

    @staticmethod
    async def next_notice(chat: Chat) -> chats_pb2.ChatEventNotice | None:
        """The chat's next event for a host that takes protobuf (a typed Chat call, another
        core): with no pump, none is written as text. None once the chat is over."""
        notice = await chat.events.get()
        assert not isinstance(notice, bytes), "text for a host without a pump"
        return notice

    def relay(
        self, agent: ClientSession, notice: chats_pb2.AgentChatEventNotice
    ) -> Awaitable[None] | None:
        """An `agent.chat.event` from `agent`: on to the chat's host, in order. Taken at
        once; when the chat's buffer is full, the event takes its place in line and the
        wait for room is returned (None when there is nothing to wait for)."""
        chat = self.open.get(notice.session_id)
        if chat is None or chat.agent is not agent:
            return None  # unknown or over, or not this connection's chat: dropped
        event = notice.event
        terminal = event.kind in TERMINAL_KINDS
        # Everything up to the buffer is synchronous, so events keep their arrival order.
        self._follow_goal(chat, event)
        if terminal:
            self._unroute(chat)
        # The agent's text, trusted from car-grpc's gateway only, for a host behind it.
        head, text = chat.text_head, notice.event_text
        if head is not None and text and agent.bridged:
            frame = chat_text.notice_frame(head, text)
            offered = chat.events.offer(frame, len(frame))
        else:
            out = chats_pb2.ChatEventNotice(session_id=chat.session_id, agent_id=chat.agent_id)
            out.event.CopyFrom(event)
            offered = chat.events.offer(out, out.ByteSize())
        if isinstance(offered, PutResult):
            self._relayed(chat, offered, terminal)
            return None
        return self._relay_when_admitted(chat, offered, terminal)

    async def _relay_when_admitted(
        self, chat: Chat, admitted: asyncio.Future[PutResult], terminal: bool
    ) -> None:
        self._relayed(chat, await chat.events.admitted(admitted), terminal)

    def _relayed(self, chat: Chat, outcome: PutResult, terminal: bool) -> None:
        if outcome is PutResult.STALLED:
            self._stalled(chat)
        elif terminal:
            chat.events.close()

    def _stalled(self, chat: Chat) -> None:
        stall = self.limits.stall_timeout
        reason = f"chat ended: the host read nothing for {stall:g}s"
        if self._unroute(chat):
            self._cancel_at_agent(chat)
            self._settle_goal(chat, "error")
        chat.events.close(self._notice(chat, _error_event(reason)), drop_waiting=True)

    def _notice(self, chat: Chat, event: chats_pb2.ChatEvent) -> chats_pb2.ChatEventNotice:
        return chats_pb2.ChatEventNotice(
            session_id=chat.session_id, agent_id=chat.agent_id, event=event
        )

    # -------------------------------------------------------------- ending chats

    def end(
        self, chat: Chat, reason: str, *, cancel_agent: bool, tell_host: bool, kind: str | None
    ) -> bool:
        """End a routed chat; False when it had already ended.

        `tell_host` gives the host a terminal `error` event with `reason` (after what is
        already buffered); otherwise nobody listens and buffered events are dropped. `kind`
        is the terminal kind the goal follows (None: cancelled).
        """
        if not self._unroute(chat):
            return False
        if cancel_agent:
            self._cancel_at_agent(chat)
        if chat.accepted:
            self._settle_goal(chat, kind)
        else:
            chat.lost = reason
            self._restore_goal(chat)
        if tell_host and chat.accepted:
            chat.events.close(self._notice(chat, _error_event(reason)))
        else:
            chat.events.discard()
        return True

    async def _agent_detached(self, agent_id: str, session: ClientSession) -> None:
        replaced = agent_id in self._registry.attached
        how = "re-attached on another connection" if replaced else "disconnected"
        for chat in [c for c in self.open.values() if c.agent is session]:
            self.end(
                chat, f"agent '{agent_id}' {how}", cancel_agent=False, tell_host=True, kind="error"
            )

    async def _host_closed(self, host: ClientSession) -> None:
        for chat in self._by_host.pop(host.id, set()):
            if chat.pump is not None:
                chat.pump.cancel()
            if not self.end(
                chat, "the host went away", cancel_agent=True, tell_host=False, kind=None
            ):
                chat.events.discard()

    # -------------------------------------------------------------- goals over chats

    def _follow_goal(self, chat: Chat, event: chats_pb2.ChatEvent) -> None:
        if chat.goal_before is None:
            return
        if event.kind == "goal_evaluated":
            chat.evaluated = True
            chat.met = event.met
            status = chats_pb2.GOAL_STATUS_MET if event.met else chats_pb2.GOAL_STATUS_RUNNING
            sid, owner, copy = chat.session_id, chat.goal_owner, chats_pb2.ChatEvent()
            copy.CopyFrom(event)
            self._write_goal(
                sid, lambda: self.goals.record_evaluation(sid, copy, status, owner=owner)
            )
        elif event.kind in TERMINAL_KINDS:
            self._settle_goal(chat, event.kind)

    def _settle_goal(self, chat: Chat, kind: str | None) -> None:
        if chat.goal_before is None:
            return
        status = goal_status_after(kind, chat.evaluated, chat.met)
        sid, owner = chat.session_id, chat.goal_owner
        self._write_goal(sid, lambda: self.goals.set_status(sid, status, kind, owner=owner))

    def _restore_goal(self, chat: Chat) -> None:
        """The chat never started: its goal goes back to the status it had."""
        if chat.goal_before is None:
            return
        before, sid, owner = chat.goal_before, chat.session_id, chat.goal_owner
        self._write_goal(sid, lambda: self.goals.set_status(sid, before, owner=owner))

    # -------------------------------------------------------------- goal book

    async def set_goal(
        self, session_id: str, goal: chats_pb2.ChatGoal, scope: GoalScope
    ) -> chats_pb2.StoredGoal:
        """Store the goal (acknowledged once committed) and return it as stored. The
        session_id of another owner's goal is refused (-32602), unless `scope` sees all."""

        def put() -> Awaitable[chats_pb2.StoredGoal | None]:
            return self.goals.put(
                session_id, goal.check, goal.max_iterations, scope.owner, any_owner=scope.sees_all
            )

        stored = await self._goal_order.run(session_id, put)
        if stored is None:
            raise field_error("session_id", "the session_id is taken by a goal of another caller")
        return stored

    async def goal(self, session_id: str, scope: GoalScope) -> chats_pb2.StoredGoal | None:
        return await self._goal_order.run(
            session_id, lambda: self.goals.get(session_id, scope.filter)
        )

    async def all_goals(self, scope: GoalScope) -> list[chats_pb2.StoredGoal]:
        return await self._goal_order.run(None, lambda: self.goals.list_all(scope.filter))

    async def clear_goal(self, session_id: str, scope: GoalScope) -> bool:
        return await self._goal_order.run(
            session_id, lambda: self.goals.clear(session_id, scope.filter)
        )

    async def clear_goals(self, scope: GoalScope) -> int:
        return await self._goal_order.run(None, lambda: self.goals.clear_all(scope.filter))

    # ------------------------------------------------------------ handlers

    @handles("agents_chat")
    async def agents_chat(self, session: ClientSession, req: chats_pb2.ChatRequest) -> Reply:
        chat = await self.open_chat(session, req, pumped=True)
        # Events wait in the chat's buffer until the host has its `accepted` answer.
        accepted = chats_pb2.ChatAccepted(accepted=True, session_id=chat.session_id)
        return Reply(accepted, lambda: self.start_pump(chat))

    @streams("Chat")
    async def chat_stream(
        self, session: ClientSession, req: chats_pb2.ChatRequest, goals: GoalScope | None = None
    ) -> AsyncIterator[chats_pb2.ChatResponse]:
        """ChatService.Chat: `accepted`, then the chat's events up to its terminal one
        (`goals`: as open_chat's)."""
        chat = await self.open_chat(session, req, goals=goals)
        try:
            accepted = chats_pb2.ChatAccepted(accepted=True, session_id=chat.session_id)
            yield chats_pb2.ChatResponse(accepted=accepted)
            while (notice := await self.next_notice(chat)) is not None:
                yield chats_pb2.ChatResponse(event=notice)
        finally:
            # The caller stopped listening (or the chat is over, and this does nothing).
            self.end(
                chat, "the host cancelled the call", cancel_agent=True, tell_host=False, kind=None
            )

    @handles("agents_chat_cancel")
    async def agents_chat_cancel(
        self, session: ClientSession, req: chats_pb2.CancelChatRequest
    ) -> chats_pb2.CancelChatResponse:
        session_id = require(req.session_id, "session_id")
        chat = self.authorized(session, session_id)
        cancelled = chat is not None and self.end(
            chat, "chat cancelled", cancel_agent=True, tell_host=True, kind=None
        )
        return chats_pb2.CancelChatResponse(cancelled=cancelled, session_id=session_id)

    @handles("agents_chat_approve")
    async def agents_chat_approve(
        self, session: ClientSession, req: chats_pb2.ApproveChatRequest
    ) -> chats_pb2.ApproveChatResponse:
        session_id = require(req.session_id, "session_id")
        approval_id = require(req.approval_id, "approval_id")
        chat = self.authorized(session, session_id)
        if chat is None:
            raise CarError(INTERNAL, f"no open chat '{session_id}' that this session may steer")
        if chat.remote is not None:
            return await chat.remote.approve(req)
        assert chat.agent is not None
        request = chats_pb2.AgentChatApproveRequest(
            session_id=session_id,
            approval_id=approval_id,
            approved=decision_approves(req.decision),
            decision=req.decision,
        )
        timeout = self.limits.ack_timeout
        who = f"agent '{chat.agent_id}'"
        try:
            answer = await chat.agent.call("agent_chat_approve", request, timeout=timeout)
        except TimeoutError:
            raise CarError(
                INTERNAL, f"{who} did not answer the approval within {timeout:g}s"
            ) from None
        except SessionClosed:
            raise CarError(INTERNAL, f"{who} disconnected") from None
        except CarError as e:
            raise CarError(INTERNAL, f"{who} could not resolve the approval: {e.message}") from None
        resolved = (
            answer.WhichOneof("body") == "agent_chat_approve" and answer.agent_chat_approve.resolved
        )
        return chats_pb2.ApproveChatResponse(resolved=resolved, session_id=session_id)

    @handles_notification("agent_chat_event")
    def agent_chat_event(
        self, session: ClientSession, notice: chats_pb2.AgentChatEventNotice
    ) -> Awaitable[None] | None:
        return self.relay(session, notice)

    @handles("goal_set")
    async def goal_set(
        self, session: ClientSession, req: chats_pb2.SetGoalRequest
    ) -> chats_pb2.SetGoalResponse:
        session_id = require(req.session_id, "session_id")
        if req.HasField("goal"):
            goal = _inline_goal(req.goal, "goal")
        else:
            max_iterations = req.max_iterations if req.HasField("max_iterations") else None
            goal = valid_goal(req.check, max_iterations, "")
        stored = await self.set_goal(session_id, goal, GoalScope.of(session))
        return chats_pb2.SetGoalResponse(set=True, goal=stored)

    @handles("goal_status")
    async def goal_status(
        self, session: ClientSession, req: chats_pb2.GetGoalStatusRequest
    ) -> chats_pb2.GetGoalStatusResponse:
        if not req.HasField("session_id"):
            return chats_pb2.GetGoalStatusResponse(
                goals=await self.all_goals(GoalScope.of(session))
            )
        session_id = require(req.session_id, "session_id")
        reply = chats_pb2.GetGoalStatusResponse(session_id=session_id)
        if (stored := await self.goal(session_id, GoalScope.of(session))) is not None:
            reply.goal.CopyFrom(stored)
        return reply

    @handles("goal_clear")
    async def goal_clear(
        self, session: ClientSession, req: chats_pb2.ClearGoalRequest
    ) -> chats_pb2.ClearGoalResponse:
        reply = chats_pb2.ClearGoalResponse()
        if not req.HasField("session_id"):
            reply.cleared.number_value = await self.clear_goals(GoalScope.of(session))
            return reply
        reply.session_id = require(req.session_id, "session_id")
        reply.cleared.bool_value = await self.clear_goal(reply.session_id, GoalScope.of(session))
        return reply
