"""ClientSession: one client session (one Connect stream, or one unbound typed RPC call).

A session owns its auth state and role, negotiated protocol, tools, policies, key-value
state (under its budget, kv.py), current run and halted flag. Frames towards the client
go through one queue, bounded in frames and in bytes (outbound.py), that the stream's
writer drains. Server-initiated requests (`call`) get ids `cb-N` and wait, bounded, for
the client's answer (at most max_pending_calls_per_session at a time); when the session
closes every pending call fails at once and the close hooks registered by the domain
modules run.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache

from google.protobuf.message import Message

from car_grpc.clock import now_ms
from car_grpc.core.kv import KeyValueState, StateBudget
from car_grpc.core.metrics import Metrics
from car_grpc.core.outbound import OutboundQueue
from car_grpc.v1 import options_pb2, session_pb2, state_pb2, tools_pb2
from car_grpc.wire import api, batch, limits
from car_grpc.wire.errors import INTERNAL, CarError, invalid_params
from car_grpc.wire.twins import fill_out

log = logging.getLogger(__name__)

CloseHook = Callable[["ClientSession"], Awaitable[None] | None]


class Role(enum.Enum):
    """What a session authenticated as: the caller roles of options.proto (`Access`)."""

    NONE = options_pb2.CALLER_ROLE_UNAUTHENTICATED  # not authenticated yet
    DAEMON = options_pb2.CALLER_ROLE_DAEMON  # daemon token (or auth off)
    HOST = options_pb2.CALLER_ROLE_HOST  # host token
    AGENT = options_pb2.CALLER_ROLE_AGENT  # an agent token: attached as agent_id


class SessionClosed(Exception):
    """The session ended while something waited on it."""


@dataclass(frozen=True)
class SessionLimits:
    """What every session of a core is bounded by (Config's per-session budgets)."""

    outbound_frames: int
    outbound_bytes: int
    state: StateBudget
    max_pending_calls: int


@cache
def _member_tag(member: str) -> bytes:
    number = session_pb2.ServerFrame.DESCRIPTOR.fields_by_name[member].number
    return batch.varint(number << 3 | 2)


def notification_bytes(member: str, message: Message) -> bytes:
    """The serialized ServerFrame of a notification (member `member`, no id), its twins
    derived: written from the member alone, without building (and copying into) a frame."""
    return batch.member_frame(_member_tag(member), fill_out(message).SerializeToString())


def answer_bytes(request_id: str, member: str, message: Message, *, twins: bool) -> bytes:
    """The serialized ServerFrame answering `request_id` with `message` as member `member`
    (the bytes `ServerFrame(id=..., member=message)` serializes to: the id, field 1, then
    the member), written from its parts: the message is not copied into a frame. `twins`:
    derive its typed twins (not for a bridged session: its gateway reads none)."""
    if twins:
        fill_out(message)
    head = _id_field(request_id) if request_id else b""
    return head + batch.member_frame(_member_tag(member), message.SerializeToString())


def _expire(future: asyncio.Future[session_pb2.ClientFrame]) -> None:
    """A call's answer did not come in time."""
    if not future.done():
        future.set_exception(TimeoutError())


def _id_field(request_id: str) -> bytes:
    return batch.length_delimited(1, request_id.encode())


class ClientSession:
    """What a session is: its identity and role, its outbound channel, its own state and
    budgets. It knows nothing of the domains; they keep what they hold for it and clean
    up through `on_close`."""

    def __init__(
        self,
        limits: SessionLimits,
        metrics: Metrics,
        *,
        auth_enabled: bool,
        streaming: bool,
        peer: str = "",
    ) -> None:
        self._limits = limits
        self._metrics = metrics
        self.id = uuid.uuid4().hex
        self.peer = peer
        #: Unix ms.
        self.connected_at = now_ms()
        #: False for the one-call session of an unbound typed RPC: it cannot be called back.
        self.streaming = streaming
        #: A session of car-grpc's own gateway (on a ConnectMultiplexed stream): the JSON
        #: text its frames carry is trusted, and it is sent JSON text (`json_internal`).
        #: Its frames carry no typed twins either way (wire/twins.py): the gateway
        #: translates JSON, which has none, and reads none.
        self.bridged = False
        # With auth off there is nothing to prove: a session starts out ordinary.
        self.role = Role.NONE if auth_enabled else Role.DAEMON
        self.agent_id: str | None = None
        self.memory_namespace: str | None = None
        #: The credential the session authenticated with (typed RPCs bind only with it).
        self.credential: tuple[str, str] = ("", "")
        self.protocol_version: int | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.tools: dict[str, tools_pb2.ToolDefinition] = {}
        self.policies: dict[str, state_pb2.PolicyDefinition] = {}
        self.kv = KeyValueState(limits.state)
        self.current_run: str | None = None
        self.halted = False
        self.closed = asyncio.Event()
        #: Serialized ServerFrames towards the client, bounded in frames and in bytes.
        self.outbound = OutboundQueue(limits.outbound_frames, limits.outbound_bytes)
        self._callback_ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[session_pb2.ClientFrame]] = {}
        #: Set by a stream that can take a serialized frame (a call's request) at once,
        #: without waiting: writes it when nothing is queued before it; False when it did
        #: not (the frame then goes through the queue).
        self.write_now: Callable[[bytes], bool] | None = None
        self._close_hooks: list[CloseHook] = []

    @property
    def authenticated(self) -> bool:
        return self.role is not Role.NONE

    @property
    def is_host(self) -> bool:
        return self.role is Role.HOST

    @property
    def principal(self) -> str:
        """Who the session is beyond this connection, stable across restarts: "daemon",
        "host" or "agent:<id>" ("" before auth). What owns the goals it sets."""
        if self.role is Role.AGENT:
            return f"agent:{self.agent_id}"
        return "" if self.role is Role.NONE else self.role.name.lower()

    def __repr__(self) -> str:
        return f"<ClientSession {self.id[:8]} {self.role.name.lower()} agent={self.agent_id}>"

    # ------------------------------------------------------------ outbound frames

    async def send(self, frame: session_pb2.ServerFrame | bytes) -> None:
        """Queue a frame for the client, waiting while the queue is full, in frames or in
        bytes (backpressure); SessionClosed when the session ends first, CarError (-32602)
        for a frame past limits.MAX_FRAME_BYTES (it would end the stream). A frame fanned
        out to many sessions comes serialized once (bytes, its twins derived with
        wire/twins.fill_out as for any frame)."""
        if self.closed.is_set():
            raise SessionClosed(self.id)
        if not self.streaming:
            return
        if isinstance(frame, bytes):
            data = frame
        else:
            data = (frame if self.bridged else fill_out(frame)).SerializeToString()
        if len(data) > limits.MAX_FRAME_BYTES:  # it would end the stream, shared or not
            raise invalid_params(f"invalid params: {limits.frame_too_large(len(data))}")
        await self.outbound.put(data)

    def send_now(self, data: bytes) -> bool:
        """`send` of a serialized frame that need not wait, without a coroutine (a chat's
        events, a call's request); False when it would wait, or raise: nothing is queued
        then, `send` it."""
        if self.closed.is_set() or not self.streaming or len(data) > limits.MAX_FRAME_BYTES:
            return False
        try:
            self.outbound.put_nowait(data)
        except asyncio.QueueFull:
            return False
        return True

    def try_send(self, frame: session_pb2.ServerFrame) -> bool:
        """Queue a frame without waiting; False when the queue is full (in frames or in
        bytes) or the session gone.

        For fan-out, where a slow client must not stall the sender: callers count the drop.
        """
        if self.closed.is_set() or not self.streaming:
            return False
        try:
            if self.outbound.full():  # no need to serialize what is dropped anyway
                raise asyncio.QueueFull
            data = (frame if self.bridged else fill_out(frame)).SerializeToString()
            if len(data) > limits.MAX_FRAME_BYTES:  # it would end the stream: dropped
                log.warning("core: %s dropped: %s", repr(self), limits.frame_too_large(len(data)))
                raise asyncio.QueueFull
            self.outbound.put_nowait(data)
        except asyncio.QueueFull:
            self._metrics.queue_drops.inc("session_outbound")
            return False
        return True

    async def notify(self, member: str, message: Message) -> None:
        """Send a notification (ServerFrame member `member`, no id)."""
        await self.send(notification_bytes(member, message))

    # ------------------------------------------------------------ server -> client calls

    def next_callback_id(self) -> str:
        return f"cb-{next(self._callback_ids)}"

    async def call(
        self,
        member: str,
        message: Message,
        timeout: float,
        callback_id: str | None = None,
    ) -> session_pb2.ClientFrame:
        """Send a server-initiated request and wait for the client's answer frame.

        Raises CarError when the client answers with an error, TimeoutError after
        `timeout` seconds, SessionClosed when the session ends first.
        """
        self._check_callable()  # before an id is taken: a refused call takes none
        frame = session_pb2.ServerFrame(id=callback_id or self.next_callback_id())
        getattr(frame, member).CopyFrom(message)
        return await self.call_frame(frame, member, timeout)

    async def call_frame(
        self, frame: session_pb2.ServerFrame, member: str, timeout: float, *, twins: bool = True
    ) -> session_pb2.ClientFrame:
        """`call` with the request frame already built (its id a fresh callback id, its
        member `member` filled in place: nothing copied). `twins` False: the caller wrote
        the frame's typed twins itself."""
        self._check_callable()
        cid = frame.id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[session_pb2.ClientFrame] = loop.create_future()
        self._pending[cid] = future
        sent = time.perf_counter()
        try:
            data = (fill_out(frame) if twins and not self.bridged else frame).SerializeToString()
            if len(data) > limits.MAX_FRAME_BYTES:  # it would end the stream: the call fails
                raise invalid_params(f"invalid params: {limits.frame_too_large(len(data))}")
            if self._write_call_now(data) or self.send_now(data):
                # Only the answer is waited for: a timer on its future is enough (cheaper
                # than a Timeout around the task), and it raises the same TimeoutError.
                expiry = loop.call_later(timeout, _expire, future)
                try:
                    answer = await future
                finally:
                    expiry.cancel()
            else:  # the queue is full: wait for room, within the same timeout
                async with asyncio.timeout(timeout):
                    await self.send(data)
                    answer = await future
        finally:
            self._pending.pop(cid, None)
        method = api.SERVER_MEMBERS[member].method
        self._metrics.callback_seconds.observe(time.perf_counter() - sent, method)
        if answer.WhichOneof("body") == "error":
            raise CarError.from_proto(answer.error)
        return answer

    def _write_call_now(self, data: bytes) -> bool:
        """A call's request written at once when the stream can take it (no hop through
        its writer task; the caller waits for the answer anyway); False: not written."""
        if self.write_now is None or self.closed.is_set():
            return False
        return self.write_now(data)

    def _check_callable(self) -> None:
        """Raise unless the client can be called now (a stream, room among its pending
        calls)."""
        if not self.streaming:
            raise CarError(INTERNAL, "this call has no session stream to call back on")
        limit = self._limits.max_pending_calls
        if len(self._pending) >= limit:
            raise invalid_params(
                f"invalid params: too many calls pending on the client: "
                f"max_pending_calls_per_session ({limit})"
            )

    def resolve(self, frame: session_pb2.ClientFrame) -> bool:
        """Deliver the client's answer to a pending call; False for unknown/late ids."""
        future = self._pending.get(frame.id)
        if future is None or future.done():
            return False
        future.set_result(frame)
        return True

    # ------------------------------------------------------------ lifecycle

    def on_close(self, hook: CloseHook) -> None:
        """Run `hook(session)` when the session ends (domain clean-up)."""
        self._close_hooks.append(hook)

    async def close(self) -> None:
        """End the session: fail pending calls, run close hooks, release everything."""
        if self.closed.is_set():
            return
        self.closed.set()
        self.outbound.close(lambda: SessionClosed(self.id))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SessionClosed(self.id))
        self._pending.clear()
        for hook in reversed(self._close_hooks):
            try:
                result = hook(self)
                if result is not None:
                    await result
            except Exception:
                log.exception("close hook failed for %r", self)
        self._close_hooks.clear()
        self.tools.clear()
        self.policies.clear()
        self.kv.clear()
