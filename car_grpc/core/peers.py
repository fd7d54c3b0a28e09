"""Core to core over gRPC: chats from a host on this core to an agent attached on another
one, and where a session lives.

The core the agent is on serves `car.cluster.v1.ClusterService` (never to clients: every
call must carry the cluster secret, compared in constant time, and the service is not in
the public API, its method table or reflection). Its two methods carry the public
messages unchanged:

- `Chat(car.v1.ChatRequest) returns (stream car.v1.ChatResponse)`: exactly
  ChatService.Chat run there for a stand-in host session of the calling core: `accepted`
  once the agent has acknowledged, then the chat's events up to the terminal one. The
  call's lifetime is the chat's routing: the calling core cancels it when its host goes
  away or cancels (the agent gets `agent.chat.cancel`); the agent's side ending the chat
  (its own terminal event, or the agent gone: an `error` event) ends the stream; a
  core that dies breaks it, and the host's core makes up the terminal `error` event.
- `ApproveChat(car.v1.ApproveChatRequest) returns (car.v1.ApproveChatResponse)`:
  agents.chat.approve on a chat routed there.
- `HasSession(google.protobuf.StringValue) returns (google.protobuf.BoolValue)`: whether
  a live session stream of that id is there. A typed call bound (car-session-id) to a
  session of another core is answered FAILED_PRECONDITION naming that core, not forwarded:
  the session's stream, its tools and its callbacks live there, and a call forwarded
  would cost two hops for what the client can send to the right address in one.

The host's core checks who may steer the chat (its own host session, or a host-role
session of its own); the agent's core trusts the calling core, which proved the secret.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from car_grpc.core.chats import Chats, GoalScope
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.session import Role
from car_grpc.store.repositories import ClusterStore, StoreUnavailable
from car_grpc.v1 import chats_pb2
from car_grpc.wire.errors import INTERNAL, INVALID_REQUEST, CarError, failed_precondition
from car_grpc.wire.limits import MESSAGE_SIZE_OPTIONS

log = logging.getLogger(__name__)

SERVICE = "car.cluster.v1.ClusterService"
CHAT = f"/{SERVICE}/Chat"
APPROVE_CHAT = f"/{SERVICE}/ApproveChat"
HAS_SESSION = f"/{SERVICE}/HasSession"
#: Seconds a core waits for each peer's answer to HasSession, and lookups at a time.
_LOCATE_TIMEOUT = 1.0
_LOCATES = 8
#: Metadata key of the cluster secret.
SECRET_KEY = "car-cluster-secret"
#: Whose stored goals the calling core's host may see: "<owner>" or "*<owner>" (every
#: goal), as GoalScope (the host's identity stays on its own core).
GOAL_SCOPE_KEY = "car-goal-scope"
#: Seconds beyond the agent's ack timeout the calling core waits for `accepted`.
_ACK_MARGIN = 2.0


class PeerService:
    """The agent side: serves ClusterService to the other cores of the cluster."""

    def __init__(self, secret: str, registry: SessionRegistry, chats: Chats) -> None:
        self._secret = secret.encode()
        self._registry = registry
        self._chats = chats

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Chat": grpc.unary_stream_rpc_method_handler(
                    self._chat,
                    request_deserializer=chats_pb2.ChatRequest.FromString,
                    response_serializer=chats_pb2.ChatResponse.SerializeToString,
                ),
                "ApproveChat": grpc.unary_unary_rpc_method_handler(
                    self._approve,
                    request_deserializer=chats_pb2.ApproveChatRequest.FromString,
                    response_serializer=chats_pb2.ApproveChatResponse.SerializeToString,
                ),
                "HasSession": grpc.unary_unary_rpc_method_handler(
                    self._has_session,
                    request_deserializer=wrappers_pb2.StringValue.FromString,
                    response_serializer=wrappers_pb2.BoolValue.SerializeToString,
                ),
            },
        )

    @staticmethod
    def _goal_scope(context: grpc.aio.ServicerContext[Any, Any]) -> GoalScope:
        """The calling host's GoalScope (no goal of anyone's when the caller sent none)."""
        for key, value in context.invocation_metadata() or ():
            if key == GOAL_SCOPE_KEY and isinstance(value, str):
                return GoalScope(value.removeprefix("*"), value.startswith("*"))
        return GoalScope("", sees_all=False)

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == SECRET_KEY and isinstance(value, str):
                given = value
        if not hmac.compare_digest(given.encode(), self._secret):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a core of this cluster")

    async def _chat(
        self, req: chats_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[chats_pb2.ChatResponse]:
        await self._check(context)
        # The calling core's host, as a session of this core: a host-role one-call session.
        stand_in = self._registry.open(streaming=False, peer=f"cluster {context.peer()}")
        stand_in.role = Role.HOST
        try:
            try:
                goals = self._goal_scope(context)
                chat = await self._chats.open_chat(stand_in, req, local_only=True, goals=goals)
            except CarError as e:
                await e.abort(context)
            try:
                accepted = chats_pb2.ChatAccepted(accepted=True, session_id=chat.session_id)
                yield chats_pb2.ChatResponse(accepted=accepted)
                while (notice := await self._chats.next_notice(chat)) is not None:
                    yield chats_pb2.ChatResponse(event=notice)
            finally:
                self._chats.end(
                    chat,
                    "the host's core ended the chat",
                    cancel_agent=True,
                    tell_host=False,
                    kind=None,
                )
        finally:
            await asyncio.shield(self._registry.close(stand_in))

    async def _has_session(
        self, req: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wrappers_pb2.BoolValue:
        await self._check(context)
        live = self._registry.sessions.get(req.value)
        return wrappers_pb2.BoolValue(value=live is not None and live.streaming)

    async def _approve(
        self, req: chats_pb2.ApproveChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chats_pb2.ApproveChatResponse:
        await self._check(context)
        stand_in = self._registry.open(streaming=False, peer=f"cluster {context.peer()}")
        stand_in.role = Role.HOST
        try:
            return await self._chats.agents_chat_approve(stand_in, req)
        except CarError as e:
            await e.abort(context)
        finally:
            await asyncio.shield(self._registry.close(stand_in))


class RemoteChat:
    """A chat routed to an agent on another core: its events, cancel and approve."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[Any, chats_pb2.ChatResponse],
        peers: Peers,
        channel: grpc.aio.Channel,
        core_id: str,
    ) -> None:
        self._call = call
        self._peers = peers
        self._channel = channel
        self.core_id = core_id

    async def events(self) -> AsyncIterator[chats_pb2.ChatEventNotice]:
        """The chat's events; CarError when the other core went away mid-chat."""
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                assert isinstance(response, chats_pb2.ChatResponse)
                if response.HasField("event"):
                    yield response.event
        except grpc.aio.AioRpcError as e:
            raise CarError(INTERNAL, f"core {self.core_id} went away: {e.details()}") from None

    def cancel(self) -> None:
        self._call.cancel()

    async def approve(self, req: chats_pb2.ApproveChatRequest) -> chats_pb2.ApproveChatResponse:
        call = self._channel.unary_unary(
            APPROVE_CHAT,
            request_serializer=chats_pb2.ApproveChatRequest.SerializeToString,
            response_deserializer=chats_pb2.ApproveChatResponse.FromString,
        )
        try:
            answer = await call(
                req, metadata=self._peers.metadata, timeout=self._peers.ack_timeout + _ACK_MARGIN
            )
        except grpc.aio.AioRpcError as e:
            raise CarError.of_call(e) or CarError(
                INTERNAL, e.details() or f"core {self.core_id}: {e.code()}"
            ) from None
        assert isinstance(answer, chats_pb2.ApproveChatResponse)
        return answer


class Peers:
    """The host side: finds the core an agent is attached on and opens chats there."""

    def __init__(self, store: ClusterStore, secret: str, *, ack_timeout: float) -> None:
        self._store = store
        self.metadata = ((SECRET_KEY, secret),)
        self.ack_timeout = ack_timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._locating = asyncio.Semaphore(_LOCATES)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=MESSAGE_SIZE_OPTIONS)
            self._channels[address] = channel
        return channel

    async def open_chat(self, req: chats_pb2.ChatRequest, goals: GoalScope) -> RemoteChat | None:
        """The chat, accepted by the agent on the core it is attached on; None when it is
        attached on no other live core. CarError as agents.chat answers it there. The
        stored goal of its session_id is used there when it is within `goals`."""
        try:
            where = await self._store.locate_agent(req.agent_id)
        except StoreUnavailable:
            raise
        if where is None or where[0] == self._store.core_id:
            return None
        core_id, address = where
        channel = self._channel(address)
        scope = ("*" if goals.sees_all else "") + goals.owner
        call = channel.unary_stream(
            CHAT,
            request_serializer=chats_pb2.ChatRequest.SerializeToString,
            response_deserializer=chats_pb2.ChatResponse.FromString,
        )(req, metadata=(*self.metadata, (GOAL_SCOPE_KEY, scope)))
        try:
            async with asyncio.timeout(self.ack_timeout + _ACK_MARGIN):
                first = await call.read()
        except TimeoutError:
            call.cancel()
            raise CarError(
                INTERNAL, f"agent '{req.agent_id}' on core {core_id} did not answer in time"
            ) from None
        except grpc.aio.AioRpcError as e:
            # The agent's core refused the chat: its error as it gave it. The agent went
            # from there after the store said it was there: FAILED_PRECONDITION "not
            # attached", as when it is attached nowhere, not INTERNAL.
            if (refused := CarError.of_call(e)) is not None:
                raise refused from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise CarError(
                    INTERNAL, f"agent '{req.agent_id}' is on core {core_id}, unreachable"
                ) from None
            raise CarError(INTERNAL, e.details() or str(e.code())) from None
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            raise CarError(INTERNAL, f"core {core_id} ended the chat before accepting it")
        return RemoteChat(call, self, channel, core_id)

    async def locate_session(self, session_id: str) -> None:
        """Raise FAILED_PRECONDITION naming the core (and its address) where the live session
        `session_id` is, when that is another core of the cluster; return otherwise (it is
        nowhere). A typed call bound to a session is not forwarded: its stream lives on that
        core, and so should the calls bound to it (dial the address, or let the load
        balancer keep the client on one core)."""
        async with self._locating:  # bounded: an unknown id costs a call to every peer
            members = await self._store.members()
            others = [m for m in members if m.alive and m.core_id != self._store.core_id]

            async def has(address: str) -> bool:
                call = self._channel(address).unary_unary(
                    HAS_SESSION,
                    request_serializer=wrappers_pb2.StringValue.SerializeToString,
                    response_deserializer=wrappers_pb2.BoolValue.FromString,
                )
                try:
                    answer = await call(
                        wrappers_pb2.StringValue(value=session_id),
                        metadata=self.metadata,
                        timeout=_LOCATE_TIMEOUT,
                    )
                except grpc.aio.AioRpcError:
                    return False
                return isinstance(answer, wrappers_pb2.BoolValue) and answer.value

            found = await asyncio.gather(*(has(m.advertise) for m in others))
        for member, here in zip(others, found, strict=True):
            if here:
                raise failed_precondition(
                    INVALID_REQUEST,
                    f"session {session_id} lives on core {member.core_id} ({member.advertise}):"
                    " send the calls bound to it there",
                )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
