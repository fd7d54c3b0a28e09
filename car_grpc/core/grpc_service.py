"""The gRPC face of the core: SessionService.Connect, the typed per-domain RPCs, health
and reflection. Every request ends in `Dispatcher.execute`, so the session stream and the
typed RPCs share their handlers; server streams and gRPC-only RPCs take theirs from the
router, behind the same access rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from car_grpc import stepping
from car_grpc.core.authentication import Authentication
from car_grpc.core.dispatch import AuthRequired, Dispatcher, store_unavailable
from car_grpc.core.multiplex import MultiplexedStream, SessionChannel
from car_grpc.core.open_services import CappedHealth
from car_grpc.core.reflection import add_reflection
from car_grpc.core.registry import SessionRegistry, StreamCap
from car_grpc.core.router import GrpcOnlyHandler, Reply
from car_grpc.core.session import ClientSession, Role, SessionClosed, answer_bytes
from car_grpc.store import StoreUnavailable
from car_grpc.v1 import session_pb2
from car_grpc.wire import api, batch, limits, multiplex
from car_grpc.wire.errors import INVALID_REQUEST, CarError, auth_timeout, invalid_params
from car_grpc.wire.metadata import AGENT_ID_KEY, AUTH_KEY, SESSION_ID_KEY
from car_grpc.wire.twins import fill_in, fill_out

log = logging.getLogger(__name__)


def _error_frame(frame_id: str, error: CarError) -> session_pb2.ServerFrame:
    return session_pb2.ServerFrame(id=frame_id, error=error.to_proto())


class SessionStream:
    """One Connect call: reads client frames, runs requests concurrently, writes frames.

    The hot path is kept short: a request whose handler never waits (`inline`) is
    answered in the read loop, and an answer is written straight onto the stream when
    nothing waits before it, so neither takes a hop through another task.

    On a batched stream (ConnectBatched) each message carries many frames both ways: the
    frames read are handled one by one as on Connect, and the writer sends every frame
    queued when it gets to write in one message (wire/batch.py). An answer to a frame
    that is not the last of its message is queued rather than written at once, so the
    answers to a burst leave together.
    """

    def __init__(
        self,
        service: GrpcService,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        batched: bool = False,
    ) -> None:
        self.batched = batched
        self.registry = service.registry
        self.dispatcher = service.dispatcher
        self.at_once = service.dispatcher.router.at_once
        self.context = context
        self.session = service.registry.open(streaming=True, peer=context.peer())
        #: A multiplexed session's channel: the stream takes its frames (no writer task).
        self._channel = context if isinstance(context, SessionChannel) else None
        if self._channel is not None:
            self._channel.attach(self.session.outbound)
            self._channel.take_batch = self._take_batch
            self.session.write_now = self._write_now
        else:
            self.session.write_now = self._start_write
        #: In-flight slots free (max_inflight at most), and set when one is freed.
        self._slots = service.max_inflight
        self._slot_freed = asyncio.Event()
        #: Each holds an in-flight slot: tasks, and the futures of notifications that wait
        #: without a task (_park).
        self.tasks: set[asyncio.Future[Any]] = set()
        #: The notifications among them: what the client sent before it half-closed is
        #: still handled (an agent's last chat tokens), not cancelled with the requests.
        self.notifying: set[asyncio.Future[Any]] = set()
        #: Held around every write to the stream (the writer task's and the direct ones).
        self.write_lock = asyncio.Lock()
        #: More frames of the message being read follow: answers queue up for one write.
        self._more = False
        #: When the session must be authenticated by (loop time; None: no deadline): a
        #: stream of its own while auth is on. A multiplexed session's gateway keeps its
        #: own deadline (ws_auth_timeout), which also answers the WebSocket client.
        self._auth_timeout = service.auth_timeout
        self._auth_by = (
            None
            if self.session.authenticated or self._channel is not None
            else asyncio.get_running_loop().time() + self._auth_timeout
        )
        self._auth_deadline = asyncio.timeout(None)
        #: Requests and notifications read and handed to a task that has not started yet:
        #: while there are any, a notification handled at once goes in a task behind them
        #: (so it does not overtake them: e.g. a JSON audio push before a binary frame).
        self._unstarted = 0
        #: An inline request _take_batch began that waited after all (it should not), or
        #: its failure: the reader lets it finish (or raises the failure) before it
        #: handles anything more, and _take_batch waits too.
        self._unfinished: asyncio.Future[object] | None = None

    async def run(self) -> None:
        # A multiplexed session has no writer: its stream takes its frames.
        writer = asyncio.create_task(self._write_loop()) if self._channel is None else None
        try:
            try:
                async with asyncio.timeout_at(self._auth_by) as self._auth_deadline:
                    await self._read_loop()
            except TimeoutError:
                if not self._auth_deadline.expired():
                    raise
            if self.notifying:  # each bounded by its handler; the client may cancel
                await asyncio.wait(set(self.notifying))
        finally:
            for task in self.tasks:
                task.cancel()
            if writer is not None:
                writer.cancel()
            # Shielded: the RPC may be cancelled again while the session closes, and the
            # close hooks (some write to the store) must still run to the end.
            await asyncio.shield(self.registry.close(self.session))
            if writer is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        if self._auth_deadline.expired():
            await self.context.abort(
                grpc.StatusCode.UNAUTHENTICATED, auth_timeout(self._auth_timeout)
            )

    async def _write_loop(self) -> None:
        queue, lock = self.session.outbound, self.write_lock
        while True:
            frames = [await queue.get()]
            try:
                # Taken from the queue and the lock acquired in one step (no await in
                # between when the lock is free): a direct write cannot overtake it.
                async with lock:
                    if not self.batched:
                        await self.context.write(frames[0])
                        continue
                    # What else is queued by now goes along (a direct write may have
                    # held the lock meanwhile).
                    frames += queue.take_ready(
                        batch.MAX_FRAMES - 1, batch.MAX_BYTES, len(frames[0])
                    )
                    await self.context.write(batch.encode(frames))
            finally:
                for _ in frames:
                    queue.task_done()

    def _write_now(self, data: bytes) -> bool:
        """A frame onto a multiplexed session's channel at once, when nothing is queued
        before it and the credits take it: no await, so nothing a cancellation could
        leave halfway. False: not written."""
        assert self._channel is not None
        return self._channel.try_write(batch.encode((data,)))

    def _start_write(self, data: bytes) -> bool:
        """A frame (a call's request) onto the gRPC stream at once, when nothing is queued
        or being written before it: the write is started here and finished by callbacks,
        not awaited by the caller, so that no cancellation of the caller (the request's
        deadline, an aborted proposal's action) can leave it halfway (grpc.aio does not
        survive a write abandoned halfway); the write lock is held until it has finished.
        No hop through the writer task, and no wakeup of the caller once it is written
        (it waits for the answer anyway). False: not written (the frame goes through the
        queue)."""
        lock = self.write_lock
        if self._more or not self.session.outbound.empty() or not stepping.try_lock(lock):
            return False
        # Written, or the stream is gone (its read loop ends it): the lock is released.
        stepping.start(
            self.context.write(batch.encode((data,)) if self.batched else data), lock.release
        )
        return True

    def _take_batch(self, message: session_pb2.ConnectBatchedRequest) -> Callable[[], None] | None:
        """What handles a batch of a multiplexed session as it arrives, in the stream's
        read loop, with no hop through this session's reader, when nothing in it need
        wait: answers to the session's calls (resolved) and, once authenticated, requests
        that run in a task (each started, an in-flight slot free for it) or a batch of
        one inline request (answered there: _answer_now). None for any other batch: the
        reader handles it, in order."""
        if (unfinished := self._unfinished) is not None:
            if not unfinished.done() or unfinished.cancelled() or unfinished.exception():
                return None  # the reader waits for it, or raises what it failed with
            self._unfinished = None
        frames = message.frames
        if len(frames) == 1 and self.session.authenticated:
            only = frames[0].WhichOneof("body") or ""
            if only in api.CLIENT_MEMBERS and self.dispatcher.runs_inline(only):
                return functools.partial(self._answer_now, frames[0], only)
        requests = 0
        for frame in frames:
            member = frame.WhichOneof("body")
            if member == "error":
                continue
            binding = api.CLIENT_MEMBERS.get(member or "")
            if binding is None:
                return None
            if binding.kind == api.REQUEST:
                if not self.session.authenticated or self.dispatcher.runs_inline(binding.field):
                    return None
                requests += 1
            elif binding.kind != api.RESPONSE:
                return None
        if requests > self._slots:
            return None
        return functools.partial(self._start_all, frames)

    def _start_all(self, frames: Iterable[session_pb2.ClientFrame]) -> None:
        """A batch's answers resolved and its requests started, each in a task (_take_batch)."""
        self._more = False
        for frame in frames:
            member = frame.WhichOneof("body")
            binding = api.CLIENT_MEMBERS.get(member or "")
            if binding is not None and binding.kind == api.REQUEST:
                self._unstarted += 1
                self._start(self._request_task(frame, binding.field))
            else:
                self.session.resolve(frame)  # late or unknown answers are ignored

    def _answer_now(self, frame: session_pb2.ClientFrame, member: str) -> None:
        """An inline request run here up to its first wait, which it has none of (its
        handler never waits; its answer is written at once, or queued where there is
        room): answered with no task and no hop through the reader. Should it wait after
        all, a task finishes it (`_unfinished`), in no in-flight slot: the reader waits
        for it, as for an inline request it runs itself. A failure is the reader's to
        raise, as if it had run the request (_handle): it ends this session alone, never
        the stream's read loop (this) and every session on it."""
        self._more = False
        request = self._request(frame, member)
        try:
            waiting = request.send(None)
        except StopIteration:
            return
        except (Exception, asyncio.CancelledError) as e:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            self._unfinished = failed
            assert self._channel is not None  # only a multiplexed session's batches
            self._channel.finish_input()  # the reader reads no more: it raises `e`
            return
        task = self._unfinished = asyncio.create_task(stepping.finish(request, waiting))
        self.tasks.add(task)  # cancelled if the session ends first
        task.add_done_callback(self.tasks.discard)

    async def _read_loop(self) -> None:
        read = self.context.read
        while True:
            message = await read()
            if (unfinished := self._unfinished) is not None:
                await asyncio.wait((unfinished,))  # what _answer_now left goes first
                self._unfinished = None
                unfinished.result()  # its failure ends the session, as in _handle
            if message is grpc.aio.EOF:
                return
            if not self.batched:
                assert isinstance(message, session_pb2.ClientFrame)
                if not await self._handle(message, last=True):
                    return
                continue
            assert isinstance(message, session_pb2.ConnectBatchedRequest)
            frames = message.frames
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                if not await self._handle(frame, last=i == last):
                    return

    async def _handle(self, frame: session_pb2.ClientFrame, *, last: bool) -> bool:
        """Handle one client frame; False when the stream is to end. `last`: no frame
        follows in the same message (so an answer may be written at once)."""
        self._more = not last
        member = frame.WhichOneof("body")
        binding = api.CLIENT_MEMBERS.get(member or "")
        if member == "error" or (binding and binding.kind == api.RESPONSE):
            self.session.resolve(frame)  # late or unknown answers are ignored
        elif binding is None:
            err = CarError(INVALID_REQUEST, "invalid request: frame has no body")
            await self.session.send(_error_frame(frame.id, err))
        elif binding.kind in (api.NOTIFICATION, api.BINARY):
            if binding.field in self.at_once and not self._unstarted:
                rest = self._notify_at_once(binding.field, frame)
                if isinstance(rest, asyncio.Future):
                    await self._park(rest)
                elif rest is not None:
                    self.notifying.add(
                        await self._spawn(self._finish_notification, binding.field, rest)
                    )
            else:
                self._unstarted += 1
                self.notifying.add(await self._spawn(self._notification, binding.field, frame))
        elif not self.session.authenticated:
            # Until auth succeeds, requests run one at a time, in order; the auth deadline
            # does not cut one short (each is bounded by its handler's own timeout).
            deadline, by = self._auth_deadline, self._auth_by
            deadline.reschedule(None)
            if not await self._request(frame, binding.field):
                await self._end_unauthenticated()
                return False
            deadline.reschedule(None if self.session.authenticated else by)
        elif self.dispatcher.runs_inline(binding.field):
            # It never waits: answered here, without the cost of a task.
            await self._request(frame, binding.field)
        else:
            self._unstarted += 1
            await self._spawn(self._request_task, frame, binding.field)
        return True

    async def _spawn(
        self, work: Callable[..., Coroutine[Any, Any, object]], *args: Any
    ) -> asyncio.Task[object]:
        await self._slot()  # backpressure: stop reading while saturated
        return self._start(work(*args))

    def _start(self, work: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        """`work` in a task of its own, in the in-flight slot taken for it."""
        self._slots -= 1
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def _park(self, waiting: asyncio.Future[Any]) -> None:
        """A notification left waiting on a future (its handler acts on the outcome): it
        holds an in-flight slot until done, as a task would, without the cost of one."""
        await self._slot()  # backpressure: stop reading while saturated
        self._slots -= 1
        self.tasks.add(waiting)
        self.notifying.add(waiting)
        waiting.add_done_callback(self._done)

    async def _slot(self) -> None:
        """Until an in-flight slot is free (the caller takes it)."""
        while self._slots <= 0:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    def _done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        self.notifying.discard(task)
        self._slots += 1
        self._slot_freed.set()

    async def _request_task(self, frame: session_pb2.ClientFrame, member: str) -> None:
        self._unstarted -= 1
        await self._request(frame, member)

    async def _request(self, frame: session_pb2.ClientFrame, member: str) -> bool:
        """Run one request and answer it. False when it failed for lack of auth."""
        request = getattr(frame, member)
        try:
            result = await self.dispatcher.execute(self.session, member, request)
        except AuthRequired as e:
            await self._send(_error_frame(frame.id, e))
            return False
        except CarError as e:
            if e.answer is None:
                await self._send(_error_frame(frame.id, e))
                return True
            result = e.answer  # the wire's answer to this refusal is a result
        reply = result if isinstance(result, Reply) else None
        message = result.message if isinstance(result, Reply) else result
        answer: session_pb2.ServerFrame | bytes
        answer = answer_bytes(frame.id, member, message, twins=not self.session.bridged)
        if len(answer) > limits.MAX_FRAME_BYTES:  # it would end the stream: fail the request
            error = invalid_params(f"invalid params: {limits.frame_too_large(len(answer))}")
            answer = _error_frame(frame.id, error)
        try:
            await self._send(answer)
        except BaseException:
            if reply is not None and reply.after_written:
                reply.then()  # what waits for the answer must not wait for one never sent
            raise
        if reply is not None:
            if reply.after_written and self._channel is not None:
                self._channel.after_written(reply.then)
            else:
                reply.then()
        return True

    async def _send(self, frame: session_pb2.ServerFrame | bytes) -> None:
        """Answer a request: straight onto the stream when nothing is queued or being
        written (no hop through the writer task), else behind what waits. A request task
        is cancelled only when the stream ends, so no write is abandoned halfway."""
        session = self.session
        if self._channel is not None:
            # Never waits but for room in the session's queue (the stream takes it).
            if not self._more and not session.closed.is_set():
                data = frame if isinstance(frame, bytes) else _write(frame)
                if self._channel.try_write(batch.encode((data,))):
                    return
        elif session.outbound.empty() and not self.write_lock.locked() and not self._more:
            if session.closed.is_set():
                return
            async with self.write_lock:
                data = frame if isinstance(frame, bytes) else _write(frame)
                await self.context.write(batch.encode((data,)) if self.batched else data)
            return
        with contextlib.suppress(SessionClosed):
            await session.send(frame)

    async def _notification(self, member: str, frame: session_pb2.ClientFrame) -> None:
        self._unstarted -= 1
        if member in self.at_once and (rest := self._notify_at_once(member, frame)) is not None:
            await self._finish_notification(member, rest)

    def _notify_at_once(
        self, member: str, frame: session_pb2.ClientFrame
    ) -> Awaitable[None] | None:
        """Run a notification's handler now; what it returns to wait for."""
        if not self.session.authenticated:
            return None
        try:
            return self.at_once[member](self.session, getattr(frame, member))
        except Exception:
            log.exception("notification handler %s failed", member)
            return None

    async def _finish_notification(self, member: str, rest: Awaitable[None]) -> None:
        try:
            await rest
        except Exception:
            log.exception("notification handler %s failed", member)

    async def _end_unauthenticated(self) -> None:
        """Flush the -32001 answer, then end the stream."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.session.outbound.join()
        await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, "auth required")


# ------------------------------------------------------------------ typed RPCs


class _CallSession:
    """The session a typed RPC runs as: a live one (car-session-id) or a one-call session."""

    def __init__(self, service: GrpcService, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.registry = service.registry
        self.authentication = service.authentication
        self.locate_session = service.locate_session
        self.context = context
        self.session: ClientSession | None = None
        self.ephemeral = False

    async def __aenter__(self) -> ClientSession:
        meta = {k: v for k, v in self.context.invocation_metadata() or () if isinstance(v, str)}
        token = meta.get("authorization", "").removeprefix("Bearer ").strip()
        agent_id = meta.get(AGENT_ID_KEY, "")
        if session_id := meta.get(SESSION_ID_KEY):
            live = self.registry.sessions.get(session_id)
            if live is None and self.locate_session is not None:
                await self.locate_session(session_id)  # raises when another core has it
            if live is None or not self._same_credential(live, token, agent_id):
                raise CarError(
                    AuthRequired().code, "auth required: unknown session or wrong credentials"
                )
            self.session = live
            return live
        session = self.registry.open(streaming=False, peer=self.context.peer())
        self.session, self.ephemeral = session, True
        try:
            await self._authenticate(session, token, agent_id)
        except BaseException:
            # `async with` runs no __aexit__ when __aenter__ raises: end the session here,
            # or every refused call would leave one behind.
            await self.__aexit__()
            raise
        return session

    async def _authenticate(self, session: ClientSession, token: str, agent_id: str) -> None:
        authentication = self.authentication
        if authentication.enabled and not token:
            raise AuthRequired()
        tokens = authentication.tokens
        is_host = tokens is not None and bool(token) and tokens.is_host(token)
        try:
            if agent_id and not is_host:
                # Agent credentials on a one-call session: the identity, not an attachment
                # (the agent's live session keeps its chats).
                if authentication.enabled and not await authentication.agent_tokens.verify(
                    agent_id, token
                ):
                    raise CarError(AuthRequired().code, "auth failed: token mismatch")
                session.role, session.agent_id = Role.AGENT, agent_id
            else:
                await authentication.authenticate(
                    session, host_token=token if is_host else "", token="" if is_host else token
                )
        except CarError as e:
            raise CarError(AuthRequired().code, e.message) from None

    def _same_credential(self, live: ClientSession, token: str, agent_id: str) -> bool:
        if not self.authentication.enabled:
            return True
        kind, secret = live.credential
        expected = f"agent:{agent_id}" if agent_id else kind
        if agent_id and kind != expected:
            return False
        return bool(secret) and hmac.compare_digest(secret.encode(), token.encode())

    async def __aexit__(self, *exc: object) -> None:
        if self.ephemeral and self.session is not None:
            await asyncio.shield(self.registry.close(self.session))


class GrpcService:
    """The gRPC handlers of a wired core: the session registry they open sessions in, the
    authentication of typed calls, the dispatcher (and its router) they run requests
    through, and the in-flight bound of one session stream."""

    def __init__(
        self,
        registry: SessionRegistry,
        authentication: Authentication,
        dispatcher: Dispatcher,
        *,
        max_inflight: int,
        multiplex_stream_bytes: int,
        multiplex_stall_timeout: float,
        auth_timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        self.authentication = authentication
        self.dispatcher = dispatcher
        self.max_inflight = max_inflight
        #: How long a session stream may stay unauthenticated (CoreConfig.auth_timeout).
        self.auth_timeout = auth_timeout
        #: Bytes a ConnectMultiplexed stream may leave unacknowledged across its sessions.
        self.multiplex_stream_bytes = multiplex_stream_bytes
        #: How long one may wait for its gateway to read what is held for it.
        self.multiplex_stall_timeout = multiplex_stall_timeout
        #: In a cluster: raises FAILED_PRECONDITION naming the core a session id lives on,
        #: when another core has it (a typed call bound to it must go there).
        self.locate_session: Callable[[str], Awaitable[None]] | None = None

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The handlers of SessionService.Connect, of every typed RPC and of the gRPC-only
        RPCs."""

        auth = "required" if self.authentication.enabled else "off"

        async def session_stream(
            context: grpc.aio.ServicerContext[Any, Any], *, batched: bool
        ) -> None:
            # Refused (RESOURCE_EXHAUSTED, rich details) when the core holds max_sessions:
            # before its initial metadata if so already, else when it would be one more.
            try:
                self.registry.check_room()
                await context.send_initial_metadata(((AUTH_KEY, auth),))
                stream = SessionStream(self, context, batched=batched)
            except CarError as e:
                await e.abort(context)
                return
            await stream.run()

        async def connect(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await session_stream(context, batched=False)

        async def connect_batched(
            _requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            await session_stream(context, batched=True)

        multiplexed_access = api.rpc_access(
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].methods_by_name[
                "ConnectMultiplexed"
            ]
        )

        async def connect_multiplexed(
            _requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            # The caller (a gateway) proves its own role first; its sessions then
            # authenticate themselves, each as on Connect.
            try:
                async with _CallSession(self, context) as caller:
                    self.dispatcher.check_access(
                        caller, multiplexed_access, "car.v1.SessionService.ConnectMultiplexed"
                    )
            except CarError as e:
                await e.abort(context)
                return
            except StoreUnavailable as e:
                await store_unavailable("ConnectMultiplexed", e).abort(context)
                return
            stream_bytes = (multiplex.STREAM_BYTES_KEY, str(self.multiplex_stream_bytes))
            await context.send_initial_metadata(((AUTH_KEY, auth), stream_bytes))
            await MultiplexedStream(self, context).run()

        by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {
            "car.v1.SessionService": {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    connect,
                    request_deserializer=_reader(session_pb2.ClientFrame),
                    response_serializer=_serialize_frame,
                ),
                "ConnectBatched": grpc.stream_stream_rpc_method_handler(
                    connect_batched,
                    request_deserializer=_reader(session_pb2.ConnectBatchedRequest),
                    response_serializer=batch.serialize,
                ),
                # Each session's batches are parsed (and twins filled in) when it reads them.
                "ConnectMultiplexed": grpc.stream_stream_rpc_method_handler(
                    connect_multiplexed,
                    request_deserializer=session_pb2.ConnectMultiplexedRequest.FromString,
                    response_serializer=batch.serialize,
                ),
            }
        }
        for rpc in api.TYPED_RPCS:
            req_cls = _message_class(rpc.request)
            table = by_service.setdefault(rpc.service.full_name, {})
            if rpc.server_streaming:
                table[rpc.name] = grpc.unary_stream_rpc_method_handler(
                    self._server_stream(rpc),
                    request_deserializer=_reader(req_cls),
                    response_serializer=_write,
                )
                continue
            member = api.request_member_for(rpc.request)
            if member is None:
                raise RuntimeError(f"{rpc.service.name}/{rpc.name}: no ClientFrame member")
            table[rpc.name] = grpc.unary_unary_rpc_method_handler(
                self._unary(member.field),
                request_deserializer=_reader(req_cls),
                response_serializer=_write,
            )
        for full_name, handler in self.dispatcher.router.grpc_only.items():
            method = descriptor_pool.Default().FindMethodByName(full_name)
            assert method.containing_service is not None
            table = by_service.setdefault(method.containing_service.full_name, {})
            fills_in = full_name in self.dispatcher.router.fills_in
            table[method.name] = self._grpc_only(method, handler, fills_in=fills_in)
        return [grpc.method_handlers_generic_handler(name, t) for name, t in by_service.items()]

    def _unary(self, member: str) -> Callable[..., Any]:
        async def call(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            try:
                async with _CallSession(self, context) as session:
                    result = await self.dispatcher.execute(session, member, request)
            except CarError as e:
                await e.abort(context)
            except StoreUnavailable as e:  # authenticating the call (an agent's token)
                await store_unavailable(api.CLIENT_MEMBERS[member].method, e).abort(context)
            if isinstance(result, Reply):
                result.then()  # the answer travels apart from any session stream: start now
                return result.message
            return result

        return call

    def _server_stream(self, rpc: api.TypedRpc) -> Callable[..., Any]:
        handler = self.dispatcher.router.streams.get(rpc.name)
        access = api.CLIENT_REQUESTS[rpc.method].access

        async def call(
            request: Message, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Message]:
            try:
                if handler is None:
                    raise CarError(-32601, f"unknown method: {rpc.service.name}/{rpc.name}")
                async with _CallSession(self, context) as session:
                    self.dispatcher.check_access(session, access, rpc.method)
                    with self.registry.holding_stream():
                        async for item in handler(session, request):
                            yield item
            except CarError as e:
                await e.abort(context)
            except StoreUnavailable as e:
                await store_unavailable(rpc.method, e).abort(context)

        return call

    def _grpc_only(
        self, method: MethodDescriptor, handler: GrpcOnlyHandler, *, fills_in: bool = False
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`fills_in`: the handler fills in its requests' twins (router.grpc_only)."""
        req_cls = _message_class(method.input_type)
        access = api.rpc_access(method)

        async def unary(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                async with _CallSession(self, context) as session:
                    self.dispatcher.check_access(session, access, method.full_name)
                    return await handler(session, request)
            except CarError as e:
                await e.abort(context)
            except StoreUnavailable as e:
                await store_unavailable(method.full_name, e).abort(context)

        async def bidi(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            try:
                async with _CallSession(self, context) as session:
                    self.dispatcher.check_access(session, access, method.full_name)
                    with self.registry.holding_stream():
                        await handler(session, _ContextStream(context))
            except CarError as e:
                await e.abort(context)
            except StoreUnavailable as e:
                await store_unavailable(method.full_name, e).abort(context)

        if not method.client_streaming and not method.server_streaming:
            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_reader(req_cls), response_serializer=_write
            )
        if method.client_streaming and method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(
                bidi,
                request_deserializer=req_cls.FromString if fills_in else _reader(req_cls),
                response_serializer=_serialize_frame,
            )
        raise RuntimeError(f"{method.full_name}: only unary and bidi gRPC-only RPCs are supported")


class _ContextStream:
    """The MessageStream of a bidi call, for a domain that must not see gRPC."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def read(self) -> Message | None:
        message = await self._context.read()
        return None if message is grpc.aio.EOF else message

    async def write(self, message: Message | bytes) -> None:
        await self._context.write(message)


def _message_class(desc: Any) -> Any:
    return message_factory.GetMessageClass(desc)


def _reader(cls: Any) -> Callable[[bytes], Message]:
    """The request deserializer of `cls`: typed twins filled in (wire/twins.py)."""

    def read(data: bytes) -> Message:
        message: Message = cls.FromString(data)
        return fill_in(message)

    return read


def _write(message: Message) -> bytes:
    """The response serializer: typed twins derived (wire/twins.py)."""
    return fill_out(message).SerializeToString()


def _serialize_frame(frame: Message | bytes) -> bytes:
    """A message for the wire, unless it is bytes already: frames from a session's queue,
    a voice engine's batch of audio (serialized by the domain, its twins derived)."""
    return frame if isinstance(frame, bytes) else _write(frame)


async def add_health_and_reflection(
    server: grpc.aio.Server,
    extra: Iterable[str],
    *,
    watches: StreamCap,
    reflection_streams: StreamCap,
) -> Any:
    """Standard gRPC health (all services SERVING) and server reflection (v1 and
    v1alpha), open to anyone, their streams capped (`watches`, `reflection_streams`:
    core/open_services.py). Returns the asyncio health servicer
    (`enter_graceful_shutdown()` on stop): its Watch streams end when the server stops,
    where the thread of the synchronous one would keep the process from exiting.
    `extra`: other services the server has (the A2A service)."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(CappedHealth(health_servicer, watches), server)
    names = sorted(
        {"car.v1.SessionService", *(r.service.full_name for r in api.TYPED_RPCS), *extra}
    )
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    add_reflection(server, [*names, health.SERVICE_NAME], reflection_streams)
    return health_servicer
