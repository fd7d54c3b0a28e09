"""A burst of connections ends no session.

gRPC holds the calls a server has not picked up yet in a queue that refuses calls at
random beyond 1,000 of them (CANCELLED). Under a burst of WebSocket connections the
gateway opened Connect streams faster than the core's event loop picked them up, so one
session in ten of a 2,000-connection burst was refused: the client got -32603 or a close
1011 "core unavailable: CANCELLED". The core now holds far more calls (MAX_PENDING_CALLS)
and the gateway paces the streams it opens (Config.ws_pending_streams).
bench/bench_burst.py measures the full 2,000-connection burst."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2
from car_grpc.wire import batch
from tests.conftest import make_config
from tests.processes import launch
from tests.ws_helpers import daemon_token, rpc, running

_CONNECT = "/car.v1.SessionService/ConnectBatched"


async def test_a_burst_of_connect_streams_is_served_whole(core: Core) -> None:
    """2,000 Connect streams opened at once on one channel, as a gateway opens them: each
    authenticates and does a round trip."""
    token = daemon_token(core)
    outcomes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        connect: grpc.aio.StreamStreamMultiCallable[bytes, session_pb2.ConnectBatchedResponse] = (
            channel.stream_stream(
                _CONNECT,
                request_serializer=batch.serialize,
                response_deserializer=session_pb2.ConnectBatchedResponse.FromString,
            )
        )
        calls = [connect() for _ in range(2000)]

        Call = grpc.aio.StreamStreamCall[bytes, session_pb2.ConnectBatchedResponse]

        async def session(call: Call) -> None:
            auth = session_pb2.ClientFrame(id="1")
            auth.session_auth.token = token
            listing = session_pb2.ClientFrame(id="2")
            listing.tools_list.SetInParent()
            try:
                answers: list[object] = []
                for frame in (auth, listing):
                    await call.write(batch.encode([frame.SerializeToString()]))
                    answer: Any = await call.read()
                    answers += answer.frames if answer is not grpc.aio.EOF else [answer]
            except grpc.aio.AioRpcError as e:
                outcomes[f"{e.code().name}: {e.details()}"] += 1
                return
            bodies = [
                a.WhichOneof("body") if isinstance(a, session_pb2.ServerFrame) else a
                for a in answers
            ]
            served = bodies == ["session_auth", "tools_list"]
            outcomes["served" if served else str(answers)] += 1

        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*(session(call) for call in calls))
        finally:
            for call in calls:
                call.cancel()
    assert outcomes == {"served": 2000}


async def test_a_burst_of_websocket_connections_ends_no_session(tmp_path: Path) -> None:
    """1,400 WebSocket connections at once from another process (every TCP connection
    made first, then every upgrade request written in one go): each authenticates and
    does a round trip."""
    async with running(make_config(tmp_path)) as (core, gateway):
        argv = [sys.executable, "-m", "tests.ws_burst", str(gateway.ws_port), daemon_token(core)]
        async with launch([*argv, "1400"], stdout=True) as burst:
            _, out = await burst.output(45)
        assert json.loads(out)["results"] == {"ok": 1400}, burst.log
        async with rpc(gateway.url) as other:  # and the gateway is fine afterwards
            await other.login(daemon_token(core))


async def test_paced_opening_serves_every_connection(tmp_path: Path) -> None:
    """With room for 2 streams not yet taken in, 60 connections opened at once all get
    their session: each waits its turn, none waits forever. (A stream per connection:
    multiplexed sessions share streams the core has long taken in.)"""
    config = make_config(tmp_path, ws_pending_streams=2, ws_multiplex_streams=0)
    async with running(config) as (core, gateway):

        async def session() -> object:
            async with rpc(gateway.url) as client:
                await client.login(daemon_token(core))
                return await client.result("tools.list")

        async with asyncio.timeout(20):
            results = await asyncio.gather(*(session() for _ in range(60)))
        assert results == [{"tools": [], "count": 0}] * 60
