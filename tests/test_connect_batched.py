"""SessionService.ConnectBatched: the session stream with many frames per message, on a
real core over gRPC (the gateway's way in; Connect stays one frame per message)."""

from __future__ import annotations

from collections import deque
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2, session_pb2_grpc, voice_pb2
from car_grpc.wire import batch
from tests.ws_helpers import daemon_token


def _frame(frame_id: str, member: str, **fields: Any) -> session_pb2.ClientFrame:
    frame = session_pb2.ClientFrame(id=frame_id)
    getattr(frame, member).SetInParent()
    for name, value in fields.items():
        setattr(getattr(frame, member), name, value)
    return frame


def test_a_batch_is_its_frames_as_field_one() -> None:
    frames = [session_pb2.ServerFrame(id=str(i)).SerializeToString() for i in range(3)] + [
        session_pb2.ServerFrame(id="x" * 300).SerializeToString(),
        b"",
    ]  # a 2-byte length
    decoded = session_pb2.ConnectBatchedResponse.FromString(batch.encode(frames))
    assert [f.SerializeToString() for f in decoded.frames] == frames
    assert batch.encode([]) == b""


def test_a_batch_takes_frames_within_its_bounds_and_a_larger_one_alone() -> None:
    queued = deque([b"a" * 40, b"b" * 40, b"c" * 21, b"d"])
    assert batch.take(queued, 8, 100) == ([b"a" * 40, b"b" * 40], 80)  # c: 101 bytes
    assert batch.take(queued, 1, 100) == ([b"c" * 21], 21)  # at most one frame
    queued.extendleft([b"x" * 500])
    assert batch.take(queued, 8, 100) == ([b"x" * 500], 500)  # first, so alone
    assert batch.take(queued, 8, 100) == ([b"d"], 1)
    assert batch.take(queued, 8, 100) == ([], 0) and not queued
    # After a frame taken before (`held` bytes), the rest fits beside it, or waits.
    queued.extend([b"e" * 60, b"f" * 30])
    assert batch.take(queued, 8, 100, held=500) == ([], 0)  # no company for a larger one
    assert batch.take(queued, 8, 100, held=60) == ([], 0)  # e would make 120
    assert batch.take(queued, 8, 100, held=40) == ([b"e" * 60], 60)


async def test_a_burst_in_one_message_is_answered_in_order_and_in_few(
    core: Core, channel: grpc.aio.Channel
) -> None:
    call: Any = session_pb2_grpc.SessionServiceStub(channel).ConnectBatched()
    try:
        auth = _frame("auth", "session_auth", token=daemon_token(core))
        listings = [_frame(str(i), "tools_list") for i in range(100)]
        await call.write(session_pb2.ConnectBatchedRequest(frames=[auth, *listings]))
        answers: list[session_pb2.ServerFrame] = []
        messages = 0
        while len(answers) < 101:
            message = await call.read()
            assert message is not grpc.aio.EOF
            messages += 1
            answers += message.frames
        assert [a.id for a in answers] == ["auth", *(str(i) for i in range(100))]
        assert [a.WhichOneof("body") for a in answers[1:]] == ["tools_list"] * 100
        # Answered as they were handled, inline: queued behind the first, sent together.
        assert messages <= 3, messages
    finally:
        call.cancel()


async def test_requests_before_auth_are_refused_as_on_connect(
    core: Core, channel: grpc.aio.Channel
) -> None:
    """The access rule of each request holds inside a batch: a request before auth gets
    -32001 and the stream ends, and the frames after it are not run."""
    call: Any = session_pb2_grpc.SessionServiceStub(channel).ConnectBatched()
    try:
        put = _frame("1", "state_set", key="k")
        put.state_set.value.string_value = "v"
        await call.write(session_pb2.ConnectBatchedRequest(frames=[_frame("0", "tools_list"), put]))
        message = await call.read()
        assert [(f.id, f.error.code) for f in message.frames] == [("0", -32001)]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        call.cancel()


def test_varint_is_the_protobuf_encoding_at_every_length() -> None:
    # One to five bytes, at each boundary: a batch's length, a long session's seq.
    for value in (1, 0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 2**28, 2**32):
        serialized = voice_pb2.VoiceAudio(seq=value).SerializeToString()  # tag, then varint
        assert batch.varint(value) == serialized[1:], value
    assert batch.varint(0) == b"\x00"


async def test_a_batch_stays_within_its_bytes_after_its_first_frame(
    core: Core, channel: grpc.aio.Channel
) -> None:
    """Answers of 0.6 MiB queued one behind another go one a message: the frame behind the
    one the writer took first does not fit in what is left of the batch's bytes, so it
    waits for the next (taken along, two frames near gRPC's message bound would make one
    message past it)."""
    call: Any = session_pb2_grpc.SessionServiceStub(channel).ConnectBatched()
    try:
        put = _frame("set", "state_set", key="k")
        put.state_set.value.string_value = "x" * (batch.MAX_BYTES * 6 // 10)
        auth = _frame("auth", "session_auth", token=daemon_token(core))
        await call.write(session_pb2.ConnectBatchedRequest(frames=[auth, put]))
        gets = [_frame(str(i), "state_get", key="k") for i in range(3)]
        await call.write(session_pb2.ConnectBatchedRequest(frames=gets))
        answers: list[session_pb2.ServerFrame] = []
        while len(answers) < 5:
            message = await call.read()
            assert message is not grpc.aio.EOF
            answers += message.frames
            sizes = [f.ByteSize() for f in message.frames]
            assert len(sizes) == 1 or sum(sizes) <= batch.MAX_BYTES, sizes
        assert [a.id for a in answers] == ["auth", "set", "0", "1", "2"]
        assert all(a.HasField("state_get") for a in answers[2:])
    finally:
        call.cancel()
