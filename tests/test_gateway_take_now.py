"""Batches from the core written by the multiplexed stream's reader itself
(Connection._take_now, gateway/multiplex.py): a connection whose reader waits and whose
client keeps up gets its batch there and then, acknowledged at once; everything else
(a client behind, a write under way, no room left in the write buffer) takes the
connection's own read, in order. Real core, real gateway, real sockets; the spy only
records what `_take_now` returned."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from car_grpc.gateway import connection as connection_module
from car_grpc.gateway.connection import Connection
from car_grpc.gateway.multiplex import Batch
from tests.conftest import make_config
from tests.ws_helpers import RawWebSocket, rpc, running

#: By connection: what each _take_now call did with its batch.
Takes = dict[Connection, list[str]]


@pytest.fixture
def takes(monkeypatch: pytest.MonkeyPatch) -> Takes:
    """Records each _take_now: "taken" (all of it), "left" (nothing), "part" (some)."""
    seen: Takes = defaultdict(list)
    take_now = Connection._take_now

    def spy(self: Connection, data: bytes, turn_ends: float) -> Batch | None:
        left = take_now(self, data, turn_ends)
        seen[self].append("taken" if left is None else "left" if left is data else "part")
        return left

    monkeypatch.setattr(connection_module.Connection, "_take_now", spy)
    return seen


async def _authenticated_raw(port: int, rcvbuf: int | None = None) -> RawWebSocket:
    raw = await RawWebSocket.open("127.0.0.1", port, rcvbuf=rcvbuf)
    await raw.send_text({"id": 0, "method": "session.auth", "params": {}})
    _, payload = await raw.read_frame()
    assert "result" in json.loads(payload), payload
    return raw


async def test_a_client_that_stops_reading_holds_back_only_itself(
    tmp_path: Path, takes: Takes
) -> None:
    """Two clients on one multiplexed stream: the one that stops reading has its answers
    queued (its batches left to its own read) until it reads them all, in order; the
    other, meanwhile, gets each answer written by the stream's reader at once."""
    config = make_config(
        tmp_path,
        auth=False,
        ws_outbound_queue=8,
        ws_write_limit=16 * 1024,
        session_outbound_queue=8,
        max_inflight_per_session=8,
        ws_stall_timeout=10,
    )
    async with running(config) as (_core, gateway):
        slow = await _authenticated_raw(gateway.ws_port, rcvbuf=4096)
        [slow_connection] = gateway.connections
        n = 200  # 13 MiB of answers: far more than every buffer on the way
        echo = [
            {
                "id": i,
                "method": "server.handshake",
                "params": {"protocol_version": 3, "client_version": "v" * 65536},
            }
            for i in range(1, n + 1)
        ]
        flood = asyncio.create_task(_send_each(slow, echo))
        for _ in range(1000):
            if slow_connection.outbound.full():
                break
            await asyncio.sleep(0.01)
        assert slow_connection.outbound.full()
        async with rpc(gateway.url) as fast:
            fast_connection = next(c for c in gateway.connections if c is not slow_connection)
            for i in range(50):
                await fast.result("state.set", {"key": "k", "value": i})
            assert slow_connection.outbound.full()  # still behind, all along
        # The fast client's answers were written by the reader (a batch may be left when
        # it came while the writer task was at work); the slow one's were not, once full.
        assert takes[fast_connection].count("taken") >= 40
        assert takes[slow_connection][-1] == "left"
        ids = []
        for _ in range(n):
            answer = json.loads((await slow.read_frame())[1])
            assert answer["result"]["protocol_version"] == 3
            ids.append(answer["id"])
        assert ids == list(range(1, n + 1))
        await flood
        slow.close()


async def _send_each(raw: RawWebSocket, messages: list[dict[str, Any]]) -> None:
    for message in messages:
        await raw.send_text(message)


async def test_a_batch_past_the_write_room_arrives_whole_and_in_order(
    tmp_path: Path, takes: Takes
) -> None:
    """A batch of answers larger than the room left in the write buffer: the reader
    writes what fits, queues the frame that does not and leaves the rest of the batch to
    the connection's read; the client gets every answer, in order."""
    config = make_config(tmp_path, auth=False, ws_write_limit=8 * 1024)
    async with running(config) as (_core, gateway):
        raw = await _authenticated_raw(gateway.ws_port)
        [connection] = gateway.connections
        await raw.send_text(
            {"id": 1, "method": "state.set", "params": {"key": "k", "value": "v" * 3000}}
        )
        assert json.loads((await raw.read_frame())[1])["id"] == 1
        for round_ in range(5):
            ids = list(range(100 * round_ + 2, 100 * round_ + 42))
            frames = [{"id": i, "method": "state.get", "params": {"key": "k"}} for i in ids]
            await _send_each(raw, frames)  # one after another, read by the gateway at once
            got = [json.loads((await raw.read_frame())[1]) for _ in ids]
            assert [answer["id"] for answer in got] == ids
            assert all(answer["result"] == "v" * 3000 for answer in got)
        assert "part" in takes[connection]
        raw.close()
