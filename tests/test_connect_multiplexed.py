"""SessionService.ConnectMultiplexed: many sessions over one stream, on a real core over
gRPC, spoken as a gateway speaks it (wire/multiplex.py). Each session behaves as a
ConnectBatched stream of its own; credits keep a session that is not read from holding
up the others. (Every WebSocket test runs through it too: tests/ws_helpers.running.)"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc import stepping
from car_grpc.config import Config
from car_grpc.core.grpc_service import SessionStream
from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2
from car_grpc.wire import batch, multiplex
from car_grpc.wire.codec import json_to_message
from tests.bounded import stopped, until
from tests.conftest import make_config
from tests.ws_helpers import daemon_token, running_core

PATH = "/car.v1.SessionService/ConnectMultiplexed"


def _frame(frame_id: str, member: str, **fields: Any) -> bytes:
    frame = session_pb2.ClientFrame(id=frame_id)
    getattr(frame, member).SetInParent()
    for name, value in fields.items():
        setattr(getattr(frame, member), name, value)
    return frame.SerializeToString()


class Gateway:
    """The gateway's side of one ConnectMultiplexed stream, by hand."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        open_stream = channel.stream_stream(
            PATH,
            request_serializer=batch.serialize,
            response_deserializer=session_pb2.ConnectMultiplexedResponse.FromString,
        )
        self.call: Any = open_stream(metadata=(("authorization", f"Bearer {token}"),))
        #: By session: the frames received, the batches not yet acknowledged, the end.
        self.frames: dict[int, list[session_pb2.ServerFrame]] = defaultdict(list)
        self.unacked: dict[int, list[int]] = defaultdict(list)
        self.ends: dict[int, session_pb2.MultiplexedServerSession] = {}
        self.acks: dict[int, int] = defaultdict(int)
        #: By session: each record received, as (carries a batch, batches acknowledged).
        self.records: dict[int, list[tuple[bool, int]]] = defaultdict(list)
        self.arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            async with self.arrived:
                for part in message.sessions:
                    if part.batch:
                        decoded = session_pb2.ConnectBatchedResponse.FromString(part.batch)
                        self.frames[part.session] += decoded.frames
                        self.unacked[part.session].append(len(part.batch))
                    self.acks[part.session] += part.ack_batches
                    self.records[part.session].append((bool(part.batch), part.ack_batches))
                    if part.end:
                        self.ends[part.session] = part
                self.arrived.notify_all()

    async def send(self, *records: bytes) -> None:
        await self.call.write(b"".join(records))

    async def request(self, key: int, *frames: bytes) -> None:
        await self.send(multiplex.record(key, batch.encode(frames)))

    async def ack(self, key: int) -> None:
        sizes, self.unacked[key] = self.unacked[key], []
        await self.send(multiplex.record(key, ack=(len(sizes), sum(sizes))))

    async def until(self, done: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(done)

    def ids(self, key: int) -> list[str]:
        return [f.id for f in self.frames[key]]

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await stopped(asyncio.gather(self._reader, return_exceptions=True), "the gateway's reader")


@pytest.fixture
async def gateway(core: Core, channel: grpc.aio.Channel) -> Any:
    gw = Gateway(channel, daemon_token(core))
    yield gw
    await gw.close()


async def test_each_session_authenticates_and_ends_on_its_own(core: Core, gateway: Gateway) -> None:
    """Three sessions on one stream: one authenticates, one sends a request before auth
    (-32001, then it ends UNAUTHENTICATED as its Connect stream would), one a wrong token
    (-32603, and it stays open, unauthenticated). The first is unaffected."""
    token = daemon_token(core)
    await gateway.request(1, _frame("a", "session_auth", token=token), _frame("b", "tools_list"))
    await gateway.request(2, _frame("c", "tools_list"))
    await gateway.request(3, _frame("d", "session_auth", token="wrong"))
    await gateway.until(lambda: len(gateway.ids(1)) == 2 and 2 in gateway.ends and gateway.ids(3))
    assert [f.WhichOneof("body") for f in gateway.frames[1]] == ["session_auth", "tools_list"]
    assert [(f.id, f.error.code) for f in gateway.frames[2]] == [("c", -32001)]
    assert gateway.ends[2].code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert gateway.ends[2].message == "auth required"
    assert [(f.id, f.error.code) for f in gateway.frames[3]] == [("d", -32603)]
    assert "token mismatch" in gateway.frames[3][0].error.message
    assert 1 not in gateway.ends and 3 not in gateway.ends
    await gateway.request(1, _frame("e", "tools_list"))
    await gateway.until(lambda: "e" in gateway.ids(1))
    # Records of a session that ended are ignored; a new id opens a new session.
    await gateway.request(2, _frame("f", "session_auth", token=token))
    await gateway.request(4, _frame("g", "session_auth", token=token))
    await gateway.until(lambda: gateway.ids(4) == ["g"])
    assert gateway.ids(2) == ["c"]


async def test_a_session_not_read_holds_back_only_itself(core: Core, gateway: Gateway) -> None:
    """The core sends a session at most its credits (16 batches) until the gateway
    acknowledges them; meanwhile every other session is served; acknowledged, the rest
    follows."""
    token = daemon_token(core)
    await gateway.request(1, _frame("auth", "session_auth", token=token))
    await gateway.request(2, _frame("auth", "session_auth", token=token))
    await gateway.until(lambda: gateway.ids(1) and gateway.ids(2))
    await gateway.ack(1)
    n = multiplex.WINDOW_BATCHES + 4
    for i in range(n):  # one message each: the core answers each in a batch of its own
        # The core acknowledges what session 1 has read: send within those credits too
        # (the auth and i requests sent so far).
        await gateway.until(lambda i=i: 1 + i - gateway.acks[1] < multiplex.WINDOW_BATCHES)
        await gateway.request(1, _frame(str(i), "tools_list"))
    await gateway.request(2, _frame("x", "tools_list"))
    await gateway.until(lambda: "x" in gateway.ids(2))
    assert len(gateway.unacked[1]) <= multiplex.WINDOW_BATCHES
    assert len(gateway.ids(1)) < 1 + n
    while len(gateway.ids(1)) < 1 + n:
        await gateway.ack(1)
        await gateway.until(lambda: bool(gateway.unacked[1]) or len(gateway.ids(1)) == 1 + n)
    assert gateway.ids(1) == ["auth", *(str(i) for i in range(n))]


async def test_answers_the_credits_hold_back_go_as_one_batch_in_order(
    core: Core, gateway: Gateway
) -> None:
    """A session's answers past its credits wait in its queue (the stream takes them: no
    writer task); once acknowledged, the stream takes every one queued, in order, as one
    batch."""
    token = daemon_token(core)
    await gateway.request(1, _frame("auth", "session_auth", token=token))
    await gateway.until(lambda: gateway.ids(1) == ["auth"])
    await gateway.ack(1)
    assert core.parts is not None
    [session] = core.parts.registry.sessions.values()
    queued, pull = asyncio.Event(), session.outbound.on_put
    assert pull is not None

    def on_put() -> None:  # the core queues a frame for the session: seen here too
        pull()
        queued.set()

    session.outbound.on_put = on_put
    n = multiplex.WINDOW_BATCHES + 4
    for i in range(n):  # one message each, within the credits the core acknowledges
        await gateway.until(lambda i=i: 1 + i - gateway.acks[1] < multiplex.WINDOW_BATCHES)
        await gateway.request(1, _frame(str(i), "tools_list"))
    await gateway.until(lambda: len(gateway.unacked[1]) == multiplex.WINDOW_BATCHES)
    async with asyncio.timeout(10):  # the core reads the last requests on its own time
        while len(session.outbound) < 4:
            queued.clear()
            await queued.wait()
    assert len(gateway.unacked[1]) == multiplex.WINDOW_BATCHES
    await gateway.ack(1)
    await gateway.until(lambda: len(gateway.ids(1)) == 1 + n)
    assert gateway.ids(1) == ["auth", *(str(i) for i in range(n))]
    assert len(gateway.unacked[1]) == 1  # the four held back: one batch
    assert session.outbound.empty()


async def test_answers_held_back_past_one_batch_follow_in_the_next(
    core: Core, gateway: Gateway
) -> None:
    """Held-back answers larger together than one batch may be (batch.MAX_BYTES) go in
    as many batches as they need, in order, none left behind."""
    await gateway.request(1, _frame("auth", "session_auth", token=daemon_token(core)))
    await gateway.until(lambda: gateway.ids(1) == ["auth"])
    value = session_pb2.ClientFrame(id="set")
    value.state_set.key = "k"
    value.state_set.value.string_value = "x" * 100_000
    await gateway.request(1, value.SerializeToString())
    await gateway.until(lambda: gateway.ids(1) == ["auth", "set"])
    await gateway.ack(1)
    small = multiplex.WINDOW_BATCHES  # answers that take every credit
    big = batch.MAX_BYTES // 100_000 + 2  # answers of 100 KB held back: past one batch
    for i in range(small + big):  # one message each, within the credits the core acknowledges
        await gateway.until(lambda i=i: 2 + i - gateway.acks[1] < multiplex.WINDOW_BATCHES)
        member = "tools_list" if i < small else "state_get"
        await gateway.request(1, _frame(str(i), member, **({} if i < small else {"key": "k"})))
    await gateway.until(lambda: len(gateway.ids(1)) == 2 + small)
    while len(gateway.ids(1)) < 2 + small + big:
        await gateway.ack(1)
        await gateway.until(lambda: bool(gateway.unacked[1]))
    assert gateway.ids(1) == ["auth", "set", *(str(i) for i in range(small + big))]
    assert all(f.state_get.value.string_value == "x" * 100_000 for f in gateway.frames[1][-big:])


async def test_an_answer_carries_the_acknowledgement_of_its_request(
    core: Core, gateway: Gateway
) -> None:
    """A request and its answer are one record each way: the record of the answer
    acknowledges the batch it answers, with no record of its own for it."""
    token = daemon_token(core)
    await gateway.request(1, _frame("auth", "session_auth", token=token))
    await gateway.until(lambda: gateway.ids(1) == ["auth"])
    await gateway.request(1, _frame("a", "tools_list"), _frame("b", "tools_list"))
    await gateway.until(lambda: gateway.ids(1) == ["auth", "a", "b"])
    assert gateway.records[1] == [(True, 1), (True, 1)]


async def test_batches_without_answers_are_acknowledged_once_half_a_window_is_owed(
    core: Core, gateway: Gateway
) -> None:
    """What a session reads and does not answer (notifications) is acknowledged on its own
    once half a window is owed (not batch by batch): a gateway that filled the window is
    never left waiting."""
    notice = batch.encode([_frame("", "agent_chat_event")])
    for _ in range(multiplex.WINDOW_BATCHES):
        await gateway.send(multiplex.record(5, notice))
    await gateway.until(lambda: gateway.acks[5] >= multiplex.WINDOW_BATCHES // 2)
    assert gateway.records[5]
    assert not any(carries_batch for carries_batch, _ in gateway.records[5])
    assert all(n >= multiplex.WINDOW_BATCHES // 2 for _, n in gateway.records[5])


async def test_a_batch_past_the_credits_ends_the_stream(core: Core, gateway: Gateway) -> None:
    """A gateway that sends a session more than its credits breaks the protocol: the
    stream ends INVALID_ARGUMENT (the core holds no more than the credits per session)."""
    one = batch.encode([_frame("1", "tools_list")])
    await gateway.send(*(multiplex.record(7, one) for _ in range(multiplex.WINDOW_BATCHES + 1)))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(asyncio.shield(gateway._reader), 10)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "past its credits" in (ended.value.details() or "")


async def test_only_the_daemon_token_opens_it(core: Core, channel: grpc.aio.Channel) -> None:
    """A host token is refused (PERMISSION_DENIED), no token too (UNAUTHENTICATED): the
    caller carries other clients' sessions. (The role matrix: tests/test_access_e2e.py.)"""
    assert core.parts is not None and core.parts.tokens is not None
    for token, code in (
        (core.parts.tokens.host, grpc.StatusCode.PERMISSION_DENIED),
        ("", grpc.StatusCode.UNAUTHENTICATED),
    ):
        gw = Gateway(channel, token)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(asyncio.shield(gw._reader), 10)
        assert refused.value.code() == code
        await gw.close()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Two in-flight requests per session."""
    return make_config(tmp_path, max_inflight_per_session=2)


def _proposal(frame_id: str) -> bytes:
    frame = session_pb2.ClientFrame(id=frame_id)
    proposal = {"id": frame_id, "actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}
    json_to_message({"proposal": proposal}, frame.proposal_submit)
    return frame.SerializeToString()


def _tool_answer(frame_id: str) -> bytes:
    frame = session_pb2.ClientFrame(id=frame_id)
    frame.tools_execute.output.string_value = "done"
    return frame.SerializeToString()


async def test_requests_and_call_answers_run_as_their_batch_arrives(
    core: Core, gateway: Gateway
) -> None:
    """A batch that need not wait (requests that run in tasks, as many as there are free
    in-flight slots, and answers to the core's calls) is taken as it arrives: two
    proposals in one batch both run and call their tool; the answers, one batch,
    resolve both; a third proposal then runs in a slot they freed."""
    handshake = session_pb2.HandshakeRequest(client_version="test")
    handshake.protocol_version.number_value = 3
    hello = session_pb2.ClientFrame(id="hs", server_handshake=handshake).SerializeToString()
    await gateway.request(1, _frame("auth", "session_auth", token=daemon_token(core)), hello)
    await gateway.until(lambda: gateway.ids(1) == ["auth", "hs"])

    def calls() -> list[str]:
        return [f.id for f in gateway.frames[1] if f.WhichOneof("body") == "tools_execute"]

    def results() -> dict[str, str]:
        return {
            f.id: f.proposal_submit.result.results[0].output.string_value
            for f in gateway.frames[1]
            if f.WhichOneof("body") == "proposal_submit"
        }

    await gateway.request(1, _proposal("p1"), _proposal("p2"))
    await gateway.until(lambda: len(calls()) == 2)
    assert not results()
    await gateway.request(1, *(_tool_answer(i) for i in calls()))
    await gateway.until(lambda: len(results()) == 2)
    await gateway.ack(1)
    await gateway.request(1, _proposal("p3"))
    await gateway.until(lambda: len(calls()) == 3)
    await gateway.request(1, _tool_answer(calls()[2]))
    await gateway.until(lambda: len(results()) == 3)
    assert results() == {"p1": "done", "p2": "done", "p3": "done"}


async def test_an_inline_request_alone_in_its_batch_is_answered_where_it_arrives(
    core: Core, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of one inline request (a client's `tools.list`, `state.get`) is answered in
    the stream's read loop: the session's reader handles none of them (one task hop less
    a request), the answers come in order, and each answer's record acknowledges the
    batch it answers. A batch of two still goes through the reader."""
    handled: list[str] = []
    handle = SessionStream._handle

    async def spy(self: SessionStream, frame: session_pb2.ClientFrame, *, last: bool) -> bool:
        handled.append(frame.id)
        return await handle(self, frame, last=last)

    monkeypatch.setattr(SessionStream, "_handle", spy)
    await gateway.request(1, _frame("auth", "session_auth", token=daemon_token(core)))
    await gateway.until(lambda: gateway.ids(1) == ["auth"])
    assert handled == ["auth"]  # not authenticated yet: the reader's
    ids = ["a", "b", "c", "d"]
    members = ("tools_list", "state_get", "tools_list", "state_get")
    for frame_id, member in zip(ids, members, strict=True):
        fields = {"key": "k"} if member == "state_get" else {}
        await gateway.request(1, _frame(frame_id, member, **fields))
        await gateway.until(lambda frame_id=frame_id: gateway.ids(1)[-1] == frame_id)
    assert gateway.ids(1) == ["auth", *ids]
    assert tuple(f.WhichOneof("body") for f in gateway.frames[1][1:]) == members
    assert handled == ["auth"]
    assert gateway.records[1] == [(True, 1)] * 5
    await gateway.request(1, _frame("e", "tools_list"), _frame("f", "tools_list"))
    await gateway.until(lambda: gateway.ids(1)[-2:] == ["e", "f"])
    assert handled == ["auth", "e", "f"]


async def test_an_inline_request_that_waits_after_all_is_finished_before_what_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline request answered where it arrives whose answer finds the session's credits
    spent and its queue full waits after all: a task finishes it (stepping.finish), the
    batches after it go to the session's reader, which lets it finish first; once the
    gateway acknowledges, every answer comes, in order."""
    handled: list[str] = []
    taken: list[tuple[str, bool]] = []
    finished: list[object] = []
    handle, take_batch, finish = SessionStream._handle, SessionStream._take_batch, stepping.finish

    async def spy(self: SessionStream, frame: session_pb2.ClientFrame, *, last: bool) -> bool:
        handled.append(frame.id)
        return await handle(self, frame, last=last)

    streams: list[SessionStream] = []

    def spy_take(self: SessionStream, message: session_pb2.ConnectBatchedRequest) -> Any:
        take = take_batch(self, message)
        taken.append((message.frames[0].id, take is not None))
        streams.append(self)
        return take

    def spy_finish(coroutine: Any, waiting: object) -> Any:
        finished.append(waiting)
        return finish(coroutine, waiting)

    monkeypatch.setattr(SessionStream, "_handle", spy)
    monkeypatch.setattr(SessionStream, "_take_batch", spy_take)
    monkeypatch.setattr(stepping, "finish", spy_finish)
    config = make_config(tmp_path, session_outbound_queue=1)
    async with (
        running_core(config.core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        gateway = Gateway(channel, daemon_token(core))
        try:
            await gateway.request(1, _frame("auth", "session_auth", token=daemon_token(core)))
            await gateway.until(lambda: gateway.ids(1) == ["auth"])
            await gateway.ack(1)
            # The credits' 16 answers go, then the queue fills and one waits for room.
            n = multiplex.WINDOW_BATCHES + 3
            for i in range(n):
                await gateway.request(1, _frame(str(i), "tools_list"))
            await until(lambda: len(taken) == n, "every batch arrived")
            assert len(finished) == 1
            # The one left waiting holds no in-flight slot (the reader waits for it, as
            # for an inline request it runs itself): none taken, none past the limit.
            assert streams[-1]._slots == config.core.max_inflight_per_session
            assert len(gateway.ids(1)) <= 1 + multiplex.WINDOW_BATCHES
            waited = [frame_id for frame_id, took in taken if took][-1]
            behind = [frame_id for frame_id, took in taken if not took]
            assert [frame_id for frame_id, _ in taken] == [str(i) for i in range(n)]
            assert behind == [str(i) for i in range(int(waited) + 1, n)] and behind
            assert handled == ["auth"]  # the reader waits for the one left waiting
            while len(gateway.ids(1)) < 1 + n:
                await gateway.ack(1)
                await gateway.until(
                    lambda: bool(gateway.unacked[1]) or len(gateway.ids(1)) == 1 + n
                )
            assert gateway.ids(1) == ["auth", *(str(i) for i in range(n))]
            assert handled == ["auth", *behind]
        finally:
            await gateway.close()


async def test_an_inline_request_that_fails_where_it_arrives_ends_its_session_alone(
    core: Core, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline request answered where it arrives (the stream's read loop) fails as it
    would in its session's reader: a handler's error is answered (-32603); what escapes
    the request (a cancellation at its first step) ends that session alone, with the end
    the reader's path gives it (a batch of two goes through the reader), while the other
    sessions on the stream go on."""
    assert core.parts is not None
    failure: list[BaseException] = []

    async def failing(session: Any, request: Any) -> Any:
        raise failure[0]

    monkeypatch.setitem(core.parts.router.requests, "tools_list", failing)
    token = daemon_token(core)
    for key in (1, 2, 3):
        await gateway.request(key, _frame("auth", "session_auth", token=token))
    await gateway.until(lambda: all(gateway.ids(key) == ["auth"] for key in (1, 2, 3)))
    failure.append(RuntimeError("boom"))
    await gateway.request(1, _frame("a", "tools_list"))
    await gateway.until(lambda: gateway.ids(1) == ["auth", "a"])
    assert gateway.frames[1][1].error.code == -32603
    failure[0] = asyncio.CancelledError()
    await gateway.request(1, _frame("b", "tools_list"))  # where it arrives
    await gateway.request(3, _frame("c", "tools_list"), _frame("d", "state_get", key="k"))
    await gateway.until(lambda: 1 in gateway.ends and 3 in gateway.ends)
    assert gateway.ids(1) == ["auth", "a"] and gateway.ids(3) == ["auth"]
    ends = [(gateway.ends[key].code, gateway.ends[key].message) for key in (1, 3)]
    assert ends == [(grpc.StatusCode.CANCELLED.value[0], "cancelled")] * 2
    await gateway.request(2, _frame("e", "state_get", key="k"))
    await gateway.until(lambda: gateway.ids(2) == ["auth", "e"])
    assert 2 not in gateway.ends
