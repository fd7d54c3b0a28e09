"""The core's auth deadline (CoreConfig.auth_timeout), on a real core and real sockets: a
session stream of its own that has not authenticated in time ends UNAUTHENTICATED and
frees its room under max_sessions; an authenticated one, or any with auth off, lives on;
through a gateway with a stream per connection the client is closed 1008 with the reason.
(Time is the subject here: the deadlines are short and the waits bounded.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.frames import CloseCode

from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2, session_pb2_grpc
from tests.bounded import stopped, until
from tests.conftest import make_config
from tests.ws_helpers import Rpc, daemon_token, running

DEADLINE = 0.3
EXPIRED = f"auth timeout: not authenticated within {DEADLINE:g}s"


def frame_for(method: str, frame: session_pb2.ClientFrame) -> Any:
    return frame if method == "Connect" else session_pb2.ConnectBatchedRequest(frames=[frame])


def members(method: str, answer: Any) -> list[str | None]:
    frames = [answer] if method == "Connect" else list(answer.frames)
    return [f.WhichOneof("body") for f in frames]


def streams_held(core: Core) -> int:
    assert core.parts is not None
    return core.parts.registry.streamed


async def started(config_overrides: dict[str, Any], tmp_path: Path) -> Core:
    core = Core(make_config(tmp_path, auth_timeout=DEADLINE, **config_overrides).core)
    await core.start()
    return core


@pytest.mark.parametrize("method", ["Connect", "ConnectBatched"])
async def test_a_stream_not_authenticated_in_time_ends_unauthenticated(
    tmp_path: Path, method: str
) -> None:
    core = await started({}, tmp_path)
    try:
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            call = getattr(stub, method)()
            assert dict(await call.initial_metadata())["car-auth"] == "required"
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async with asyncio.timeout(10):
                    await call.read()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error.value.details() == EXPIRED
            # Its session was open (the deadline starts with it): its room is free again.
            await until(lambda: streams_held(core) == 0, "the core holds no session")
    finally:
        await stopped(core.stop(grace=0))


@pytest.mark.parametrize("method", ["Connect", "ConnectBatched"])
async def test_an_authenticated_stream_outlives_the_deadline(tmp_path: Path, method: str) -> None:
    core = await started({}, tmp_path)
    try:
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            call = getattr(session_pb2_grpc.SessionServiceStub(channel), method)()
            auth = session_pb2.ClientFrame(id="a")
            auth.session_auth.token = daemon_token(core)
            await call.write(frame_for(method, auth))
            async with asyncio.timeout(10):
                assert members(method, await call.read()) == ["session_auth"]
            await asyncio.sleep(3 * DEADLINE)
            keys = session_pb2.ClientFrame(id="k")
            keys.state_keys.SetInParent()
            await call.write(frame_for(method, keys))
            async with asyncio.timeout(10):
                assert members(method, await call.read()) == ["state_keys"]
            call.cancel()
    finally:
        await stopped(core.stop(grace=0))


async def test_no_deadline_with_auth_off(tmp_path: Path) -> None:
    core = await started({"auth": False}, tmp_path)
    try:
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            call = session_pb2_grpc.SessionServiceStub(channel).Connect()
            assert dict(await call.initial_metadata())["car-auth"] == "off"
            await asyncio.sleep(3 * DEADLINE)
            keys = session_pb2.ClientFrame(id="k")
            keys.state_keys.SetInParent()
            await call.write(keys)
            async with asyncio.timeout(10):
                answer = await call.read()
            assert isinstance(answer, session_pb2.ServerFrame)
            assert answer.WhichOneof("body") == "state_keys"
            call.cancel()
    finally:
        await stopped(core.stop(grace=0))


async def test_a_gateway_client_of_an_expired_stream_is_closed_1008_with_the_reason(
    tmp_path: Path,
) -> None:
    """A gateway with a stream per connection (one without the daemon token), whose own
    deadline is longer: the core's ends the stream, and the client hears why."""
    config = make_config(
        tmp_path, auth_timeout=DEADLINE, ws_auth_timeout=30.0, ws_multiplex_streams=0
    )
    async with running(config) as (core, gateway):
        async with connect(gateway.url, ping_interval=None) as ws:
            async with asyncio.timeout(10):
                assert await Rpc(ws).wait_closed() == (CloseCode.POLICY_VIOLATION, EXPIRED)
        await until(lambda: streams_held(core) == 0, "the core holds no session")
