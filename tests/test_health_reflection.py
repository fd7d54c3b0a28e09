"""Stock gRPC health on the core, as real processes and real clients: an open
Health.Watch stream does not keep `car-grpc serve` / `car-grpc core` from exiting on
SIGTERM."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serve_process import launched

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "command",
    [
        ("serve", "--port", "0", "--grpc-port", "0", "--no-unix-socket", "--no-dashboard"),
        ("core", "--grpc-port", "0"),
    ],
    ids=["serve", "core"],
)
async def test_sigterm_ends_the_process_with_a_health_watch_open(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    async with launched(tmp_path / "home", *command) as server:
        grpc_address = (await server.listeners(1))[0]
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse) and first.status == SERVING
            began = time.monotonic()
            assert await server.terminate(timeout=5) == 0, server.lines
            elapsed = time.monotonic() - began
            # The watcher was told before the stream ended.
            statuses = [r.status async for r in _until_end(watch)]
        assert statuses[:1] == [NOT_SERVING], statuses
    assert elapsed < 3, f"exit took {elapsed:.1f}s"
    assert server.lines[-1].endswith("stopped"), server.lines


async def _until_end(call: Any) -> AsyncIterator[Any]:
    """The responses of a server stream until it ends (cancelled or not)."""
    try:
        while (reply := await call.read()) is not grpc.aio.EOF:
            yield reply
    except grpc.aio.AioRpcError as e:
        assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), e
