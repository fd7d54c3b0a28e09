"""Fuzzing SessionService.ConnectBatched on a real core: the frames of test_fuzz_grpc's
Connect fuzzer (random, mutated, or bytes that are no ClientFrame), sent many to a
message. The same oracle holds: each request member gets exactly one answer under its
id, whatever message it comes back in; a message that does not decode ends the stream
with a status, and nothing sent in it is run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from car_grpc.v1 import session_pb2, state_pb2
from car_grpc.wire import api, batch
from tests.fuzz_rig import EXAMPLE_TIMEOUT, Rig, rig
from tests.fuzz_strategies import FUZZ
from tests.test_fuzz_grpc import (
    ROLES,
    ConnectOracle,
    auth_request,
    connect_frames,
    own_frame,
    server_request_answer,
)

CONNECT_BATCHED = "/car.v1.SessionService/ConnectBatched"


@pytest.fixture
async def fuzzed(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path) as the_rig:
        yield the_rig


@settings(FUZZ, max_examples=100)
@given(data=st.data())
async def test_batches_of_frames_of_any_shape(fuzzed: Rig, data: st.DataObject) -> None:
    connect: Any = fuzzed.channel.stream_stream(
        CONNECT_BATCHED,
        request_serializer=None,
        response_deserializer=session_pb2.ConnectBatchedResponse.FromString,
    )
    call = connect()
    try:
        auth = own_frame("#auth", "session_auth", auth_request(fuzzed, data.draw(ROLES)))
        await call.write(batch.encode([auth]))
        [answer] = (await call.read()).frames
        assert answer.WhichOneof("body") == "session_auth"
        oracle = ConnectOracle()
        frames = connect_frames(data)
        corrupt = False
        for raw in frames:
            try:
                oracle.sent(session_pb2.ClientFrame.FromString(raw))
            except DecodeError:
                corrupt = True  # the whole message fails: nothing in it is run
                oracle = ConnectOracle()
                break
        if not corrupt:
            sentinel = own_frame("#sentinel", "state_keys", state_pb2.ListStateKeysRequest())
            frames = [*frames, sentinel]
            oracle.due["#sentinel"] = ["state_keys"]
        await call.write(batch.encode(frames))
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            await _read(call, oracle, data, corrupt)
    finally:
        call.cancel()
    await fuzzed.settle()


async def _read(call: Any, oracle: ConnectOracle, data: st.DataObject, corrupt: bool) -> None:
    while corrupt or not oracle.done:
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as e:
            assert corrupt, f"the stream failed: {e.code()} {e.details()}"
            assert e.code() != grpc.StatusCode.OK
            return
        assert message is not grpc.aio.EOF, "the core ended the stream"
        for frame in message.frames:
            member = frame.WhichOneof("body")
            assert member is not None, f"a frame without a body: {frame}"
            kind = api.RESPONSE if member == "error" else api.SERVER_MEMBERS[member].kind
            if kind == api.REQUEST:
                with contextlib.suppress(grpc.aio.UsageError, asyncio.InvalidStateError):
                    await call.write(batch.encode([server_request_answer(frame, data)]))
            elif kind == api.RESPONSE:
                oracle.answer(frame)
