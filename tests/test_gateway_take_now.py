"""Frames handled where they arrive, without waking the connection's tasks (no change on
the wire). Down: batches from the core written by the multiplexed stream's reader itself
(Connection._from_core_at_once, gateway/multiplex.py): a connection whose reader waits
and whose client keeps up gets its batch there and then, acknowledged at once; everything
else (a client behind, a write under way, no room left in the write buffer) takes the
connection's own read, in order. Up: a client's message handled in data_received while
the connection's reader waits (Connection._from_client_at_once), the rest through recv(),
in order. Real core, real gateway, real sockets; the spies only record what those
methods did."""

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
from tests.bounded import bounded
from tests.conftest import make_config
from tests.test_gateway_e2e import _slow_reader_config
from tests.ws_helpers import RawWebSocket, rpc, running

#: By connection: what each _from_core_at_once / _from_client_at_once call did.
Takes = dict[Connection, list[str]]


@pytest.fixture
def takes(monkeypatch: pytest.MonkeyPatch) -> Takes:
    """Records each _from_core_at_once: "taken" (all of it), "left" (nothing), "part" (some)."""
    seen: Takes = defaultdict(list)
    take_now = Connection._from_core_at_once

    def spy(self: Connection, data: bytes, turn_ends: float) -> Batch | None:
        left = take_now(self, data, turn_ends)
        seen[self].append("taken" if left is None else "left" if left is data else "part")
        return left

    monkeypatch.setattr(connection_module.Connection, "_from_core_at_once", spy)
    return seen


@pytest.fixture
def arrivals(monkeypatch: pytest.MonkeyPatch) -> Takes:
    """Records each _from_client_at_once: "taken", "carried" (translated, the rest left to
    recv()) or "left" (untouched)."""
    seen: Takes = defaultdict(list)
    at_once = Connection._from_client_at_once

    def spy(self: Connection, message: str | bytes) -> bool:
        taken = at_once(self, message)
        seen[self].append("taken" if taken else "carried" if self._carried else "left")
        return taken

    monkeypatch.setattr(connection_module.Connection, "_from_client_at_once", spy)
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
    config = _slow_reader_config(tmp_path, ws_stall_timeout=10)
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
        await bounded(flood, "the sending of every request")
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


async def test_a_burst_from_a_client_reaches_the_core_whole_and_in_order(
    tmp_path: Path, arrivals: Takes
) -> None:
    """An agent sends 300 chat tokens at once, with a frame that is not JSON (answered by
    the gateway) and a JSON-RPC batch of two tokens among them: the first ones are taken
    as they arrive, the frame not JSON is translated there and finished by the
    connection's reader with the rest; the host gets every token in order, the agent its
    error."""
    config = make_config(tmp_path, chat_ack_timeout=5)
    async with running(config) as (core, gateway), rpc(gateway.url) as host:
        assert core.parts is not None and core.parts.tokens is not None
        await host.login(core.parts.tokens.daemon)
        [host_connection] = gateway.connections
        async with rpc(gateway.url) as agent:
            await agent.login(
                agent_id="agent-1", token=await core.parts.agent_tokens.add("agent-1")
            )
            [agent_connection] = gateway.connections - {host_connection}
            chat = asyncio.create_task(
                host.call("agents.chat", {"agent_id": "agent-1", "prompt": "go"})
            )
            await agent.answer(await agent.expect_request("agent.chat"), {"accepted": True})
            sid = (await chat)["result"]["session_id"]
            arrivals[agent_connection].clear()

            def token(i: int) -> dict[str, Any]:
                params = {"session_id": sid, "kind": "token", "delta": f"{i},"}
                return {"jsonrpc": "2.0", "method": "agent.chat.event", "params": params}

            burst: list[str] = []
            for i in range(300):
                if i == 100:
                    burst.append("{not json")
                if i == 200:
                    burst.append(json.dumps([token(i), token(i + 1)]))
                elif i != 201:
                    burst.append(json.dumps(token(i)))
            for text in burst:  # no await that yields: the gateway reads them together
                await agent.ws.send(text)
            got = [await host.expect_notification("agents.chat.event") for _ in range(300)]
            assert "".join(e["delta"] for e in got) == "".join(f"{i}," for i in range(300))
            error = await agent.next_frame()
            assert error["error"]["code"] == -32700 and error["id"] is None
            seen = arrivals[agent_connection]
            assert seen[:100] == ["taken"] * 100
            assert seen[100] == "carried"
