"""The credits of a whole ConnectMultiplexed stream (CoreConfig.multiplex_stream_bytes): a
gateway may leave at most that many bytes unacknowledged across all the stream's sessions,
on a real core over gRPC; one batch past it ends the stream INVALID_ARGUMENT, as one past
a session's credits does (test_connect_multiplexed.py). A cancelled session's batches stop
counting at once; and car-grpc's own gateway keeps within the bound the core announces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.wire import batch, multiplex
from tests.conftest import make_config
from tests.test_connect_multiplexed import Gateway, _frame
from tests.ws_helpers import daemon_token, rpc, running

#: The stream's bound in these tests: a few notifications' worth.
STREAM_BYTES = 4096


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, multiplex_stream_bytes=STREAM_BYTES)


@pytest.fixture
async def gateway(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[Gateway]:
    """A ConnectMultiplexed stream to the core, by hand (test_connect_multiplexed.py)."""
    stream = Gateway(channel, daemon_token(core))
    yield stream
    await stream.close()


def notice(size: int) -> bytes:
    """A batch of one agent.chat.event notification of about `size` bytes: read by the
    session, answered by nothing (so acknowledged only once half a window is owed)."""
    return batch.encode([_frame("", "agent_chat_event", session_id="x" * size)])


async def authenticated(core: Core, gateway: Gateway, *keys: int) -> None:
    """Sessions `keys`, authenticated: their auth batches acknowledged with the answers."""
    for key in keys:
        await gateway.request(key, _frame("auth", "session_auth", token=daemon_token(core)))
    await gateway.until(lambda: all(gateway.ids(key) == ["auth"] for key in keys))
    assert all(gateway.acks[key] == 1 for key in keys)


async def ended(gateway: Gateway) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(asyncio.shield(gateway._reader), 10)
    return error.value


async def test_the_core_announces_the_bound_in_the_streams_initial_metadata(
    gateway: Gateway,
) -> None:
    metadata = dict(await gateway.call.initial_metadata())
    assert metadata[multiplex.STREAM_BYTES_KEY] == str(STREAM_BYTES)


async def test_a_batch_past_the_streams_credits_ends_the_stream(
    core: Core, gateway: Gateway
) -> None:
    """Each batch is well within its session's credits; together they are not."""
    await authenticated(core, gateway, 1, 2)
    big = notice(STREAM_BYTES)
    assert len(big) < multiplex.WINDOW_BYTES // 2  # the session acknowledges none yet
    await gateway.send(multiplex.record(1, big))
    await gateway.send(multiplex.record(2, notice(10)))
    error = await ended(gateway)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(
        f"session 2: a batch past the stream's credits ({len(big)} bytes"
        f" unacknowledged across its sessions, at most {STREAM_BYTES})"
    )


async def test_a_cancelled_sessions_batches_stop_counting_at_once(
    core: Core, gateway: Gateway
) -> None:
    await authenticated(core, gateway, 1, 2)
    await gateway.send(multiplex.record(1, notice(STREAM_BYTES)))
    await gateway.send(
        multiplex.record(1, flag4=1),  # cancel
        multiplex.record(2, batch.encode([_frame("t", "tools_list")])),
    )
    await gateway.until(lambda: "t" in gateway.ids(2) and 1 in gateway.ends)
    assert gateway.ends[1].code == grpc.StatusCode.CANCELLED.value[0]


async def test_the_gateway_keeps_within_the_bound_the_core_announces(tmp_path: Path) -> None:
    """WebSocket clients of car-grpc's gateway send many times the stream's bound at once,
    over one multiplexed stream: every request is answered (none ends the stream)."""
    config = make_config(tmp_path, multiplex_stream_bytes=64 * 1024)
    value = "v" * 20_000
    async with running(config) as (core, gateway):

        async def client() -> list[object]:
            async with rpc(gateway.url) as peer:
                await peer.login(daemon_token(core))
                sets = [
                    peer.result("state.set", {"key": f"k{i}", "value": value}) for i in range(8)
                ]
                await asyncio.gather(*sets)
                return [await peer.result("state.get", {"key": f"k{i}"}) for i in range(8)]

        answers = await asyncio.gather(*(client() for _ in range(6)))
    assert all(got == value for values in answers for got in values)
