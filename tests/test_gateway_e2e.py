"""The WebSocket gateway end to end: a real core and gateway on loopback, real sockets,
`websockets` as the client (and a raw socket client where a library would be too polite).
Covers framing, every error code the gateway owns, batches, keepalive and idle close,
oversized frames, a client that never reads, the core going away mid-call, the client
going away, the Unix socket and several gateways on one core."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.frames import Opcode
from websockets.protocol import Event

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.core.session import ClientSession
from car_grpc.gateway import Gateway
from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from tests.bounded import bounded, stopped
from tests.conftest import make_config
from tests.ws_helpers import RawWebSocket, Rpc, daemon_token, rpc, running


@pytest.fixture
async def served(config: Config) -> Any:
    async with running(config) as pair:
        yield pair


async def session_closed(core: Core, session_id: str, timeout: float = 5) -> None:
    """Wait until the core has ended the session with that id."""
    assert core.parts is not None
    session = core.parts.registry.sessions.get(session_id)
    if session is not None:
        await asyncio.wait_for(session.closed.wait(), timeout)


async def close_of(ws: ClientConnection, timeout: float = 5) -> tuple[int, str]:
    """Read until the server closes; (code, reason) of its close frame."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, "no close frame from the server"
    return rcvd.code, rcvd.reason


# ------------------------------------------------------------------ framing and errors


async def test_car_runtime_connect_sequence(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        token = daemon_token(core)
        await client.send(
            '{"id":0,"jsonrpc":"2.0","method":"session.auth","params":{"token":"' + token + '"}}'
        )
        auth = await client.recv()
        assert auth["id"] == 0 and auth["result"]["ok"] is True
        await client.send(
            '{"id":2,"jsonrpc":"2.0","method":"server.handshake","params":{"client_version":'
            '"0.58.0","protocol_version":3,"required_capabilities":[]}}'
        )
        text = await client.ws.recv()
        assert isinstance(text, str) and text.startswith('{"jsonrpc":"2.0","id":2,"result":')
        assert json.loads(text)["result"]["protocol_version"] == 3


async def test_gateway_errors_leave_the_connection_open(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        await client.send("definitely not json")
        parse = await client.recv()
        assert parse["id"] is None and parse["error"]["code"] == PARSE_ERROR
        await client.send("17")
        invalid = await client.recv()
        assert invalid["id"] is None and invalid["error"]["code"] == INVALID_REQUEST
        unknown = await client.call("no.such.method")
        assert unknown["error"] == {
            "code": METHOD_NOT_FOUND,
            "message": "unknown method: no.such.method",
        }
        bad = await client.call("tools.unregister", {"name": ["x"]})
        assert bad["error"]["code"] == INVALID_PARAMS
        assert bad["error"]["data"] == {"field": "name"}
        # Still the same, working session.
        assert await client.result("tools.list") == {"tools": [], "count": 0}


async def test_binary_frames_carry_json_too(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        await client.ws.send(b'{"jsonrpc":"2.0","id":"b","method":"tools.list"}')
        assert (await client.recv())["result"]["count"] == 0


async def test_batch_over_the_wire(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        await client.send(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "tools.register", "params": [{"name": "a"}]},
                {"jsonrpc": "2.0", "method": "state.set", "params": {"key": "k", "value": 1}},
                {"jsonrpc": "2.0", "id": "x", "method": "nope"},
                {"jsonrpc": "2.0", "id": 3, "method": "tools.unregister", "params": {}},
                "junk",
            ]
        )
        entries = await client.recv()
        assert isinstance(entries, list) and len(entries) == 4
        by_id = {json.dumps(e["id"]): e for e in entries}
        assert by_id["1"]["result"] == 1
        assert by_id['"x"']["error"]["code"] == METHOD_NOT_FOUND
        assert by_id["3"]["error"]["code"] == INVALID_PARAMS
        assert by_id["null"]["error"]["code"] == INVALID_REQUEST
        # The notification inside the batch ran.
        assert await client.result("state.get", {"key": "k"}) == 1
        await client.send("[]")
        empty = await client.recv()
        assert empty["id"] is None and empty["error"]["code"] == INVALID_REQUEST


def strict(text: str | bytes) -> Any:
    """Parse as a strict peer would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


async def test_long_batches_and_ids_that_are_not_ids_are_refused_over_the_wire(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        entries = [
            f'{{"id":{n},"method":"state.set","params":{{"key":"k{n}","value":1}}}}'
            for n in range(1001)
        ]
        await client.send("[" + ",".join(entries) + "]")
        refused = strict(await client.ws.recv())
        assert refused == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": INVALID_REQUEST,
                "message": "invalid request: batch of more than 1000 entries",
            },
        }
        assert await client.result("state.keys") == []  # no entry of it ran
        for id_text in ("1e400", "-1e999", '{"a":1}', "[1]", "true"):
            await client.send('{"jsonrpc":"2.0","id":' + id_text + ',"method":"tools.list"}')
            answer = strict(await client.ws.recv())
            assert answer["id"] is None and answer["error"]["code"] == INVALID_REQUEST
        await client.send("[" + ",".join(entries[:1000]) + "]")
        served_batch = strict(await client.ws.recv())
        assert sorted(e["id"] for e in served_batch) == list(range(1000))
        assert len(await client.result("state.keys")) == 1000


async def test_request_before_auth_gets_32001_and_the_connection_closes(
    served: tuple[Core, Gateway],
) -> None:
    _, gateway = served
    async with rpc(gateway.url) as client:
        await client.send(
            {
                "id": 2,
                "jsonrpc": "2.0",
                "method": "server.handshake",
                "params": {"protocol_version": 3},
            }
        )
        refused = await client.recv()
        assert refused["id"] == 2 and refused["error"]["code"] == AUTH_REQUIRED
        assert await close_of(client.ws) == (1008, "auth required")


# ------------------------------------------------------------------ server calls, concurrency


def proposal(*tools: str, timeout_ms: int = 5000) -> dict[str, Any]:
    actions = [
        {
            "id": f"a{i}",
            "type": "tool_call",
            "tool": t,
            "parameters": {"n": i},
            "timeout_ms": timeout_ms,
        }
        for i, t in enumerate(tools)
    ]
    return {"proposal": {"id": "p1", "actions": actions}}


async def test_tool_callbacks_and_concurrent_requests(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        await client.result("tools.register", [{"name": "echo"}])
        await client.send(
            {"jsonrpc": "2.0", "id": 100, "method": "proposal.submit", "params": proposal("echo")}
        )
        call = await client.recv()
        assert call["method"] == "tools.execute" and call["id"].startswith("cb-")
        assert call["params"]["request_id"] == call["id"]
        assert call["params"]["parameters"] == {"n": 0}
        # While the proposal waits on the client, other requests are answered.
        assert await client.result("tools.list") == {
            "tools": [{"name": "echo", "description": "", "parameters": {}, "idempotent": False}],
            "count": 1,
        }
        await client.send({"jsonrpc": "2.0", "id": call["id"], "result": {"echo": [1, None, "x"]}})
        done = await client.recv()
        assert done["id"] == 100
        [result] = done["result"]["results"]
        assert result["status"] == "succeeded" and result["output"] == {"echo": [1, None, "x"]}


async def test_tool_error_answers_reach_the_core(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        await client.result("tools.register", [{"name": "fatal"}])
        await client.send(
            {"jsonrpc": "2.0", "id": 5, "method": "proposal.submit", "params": proposal("fatal")}
        )
        call = await client.recv()
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": call["id"],
                "error": {"code": -32000, "message": "disk gone", "data": {"terminal": True}},
            }
        )
        done = await client.recv()
        [result] = done["result"]["results"]
        assert result["status"] == "failed" and "disk gone" in result["error"]
        assert result.get("terminal") is True


async def test_tools_cancel_notification_after_a_timeout(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        await client.result("tools.register", [{"name": "slow"}])
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 6,
                "method": "proposal.submit",
                "params": proposal("slow", timeout_ms=100),
            }
        )
        call = await client.recv()
        frames = [await client.recv(), await client.recv()]
        cancel = next(f for f in frames if f.get("method") == "tools.cancel")
        assert "id" not in cancel
        assert cancel["params"]["request_id"] == call["id"]
        done = next(f for f in frames if f.get("id") == 6)
        assert done["result"]["results"][0]["status"] == "failed"
        # The late answer is harmless.
        await client.send({"jsonrpc": "2.0", "id": call["id"], "result": 1})
        assert await client.result("tools.list") is not None


# ------------------------------------------------------------------ connection lifecycle


async def test_core_stopping_mid_call_fails_the_call_and_closes_with_a_reason(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    core = Core(config.core)
    await core.start()
    gateway = Gateway(config.gateway, core.grpc_address)
    await gateway.start()
    try:
        async with rpc(gateway.url) as client:
            await client.login(daemon_token(core))
            await client.result("tools.register", [{"name": "hang"}])
            await client.send(
                {
                    "jsonrpc": "2.0",
                    "id": 77,
                    "method": "proposal.submit",
                    "params": proposal("hang"),
                }
            )
            call = await client.recv()
            assert call["method"] == "tools.execute"
            await stopped(core.stop(grace=0))  # the core goes away while proposal.submit waits
            failed = await client.recv()
            assert failed["id"] == 77 and failed["error"]["code"] == INTERNAL
            assert failed["error"]["message"].startswith("core unavailable")
            code, reason = await close_of(client.ws)
            assert code == 1011 and reason.startswith("core unavailable")
    finally:
        await stopped(gateway.stop())
        await stopped(core.stop(grace=0))


async def test_core_unreachable_closes_with_a_reason(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    gateway = Gateway(config.gateway, "127.0.0.1:1")  # nothing listens there
    await gateway.start()
    try:
        async with rpc(gateway.url) as client:
            await client.send({"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {}})
            code, reason = await close_of(client.ws)
            assert code == 1011 and reason.startswith("core unavailable: UNAVAILABLE")
    finally:
        await stopped(gateway.stop())


async def test_client_going_away_ends_the_core_session(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        auth = await client.login(daemon_token(core))
    await session_closed(core, auth["session_id"])
    assert core.parts is not None and auth["session_id"] not in core.parts.registry.sessions


async def test_client_dropping_tcp_fails_its_pending_tool_calls(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    assert core.parts is not None
    async with rpc(gateway.url) as client:
        auth = await client.login(daemon_token(core))
        await client.result("tools.register", [{"name": "t"}])
        await client.send(
            {"jsonrpc": "2.0", "id": 1, "method": "proposal.submit", "params": proposal("t")}
        )
        assert (await client.recv())["method"] == "tools.execute"
        session = core.parts.registry.sessions[auth["session_id"]]
        client.ws.transport.abort()  # like car-runtime: no close frame
    await asyncio.wait_for(session.closed.wait(), 5)


async def test_server_pings_and_pongs_keep_a_quiet_client_alive(tmp_path: Path) -> None:
    config = make_config(tmp_path, ws_ping_interval=0.1, ws_idle_timeout=1.0)
    pings = asyncio.Queue[None]()

    class Watching(ClientConnection):
        def process_event(self, event: Event) -> None:
            if getattr(event, "opcode", None) is Opcode.PING:
                pings.put_nowait(None)
            super().process_event(event)

    async with (
        running(config) as (core, gateway),
        connect(gateway.url, ping_interval=None, create_connection=Watching) as ws,
    ):
        client = Rpc(ws)
        await client.login(daemon_token(core))
        # 21 pings at 0.1 s span twice the idle timeout: the auto-pongs kept it open (the
        # idle timeout is 10 intervals: a loaded machine may wake the loop late).
        for _ in range(21):
            await asyncio.wait_for(pings.get(), 5)
        assert await client.result("tools.list") == {"tools": [], "count": 0}


async def test_unauthenticated_connections_are_closed_at_the_auth_deadline(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, ws_auth_timeout=0.3)
    reason = "auth timeout: not authenticated within 0.3s"
    async with (
        running(config) as (core, gateway),
        rpc(gateway.url) as silent,
        rpc(gateway.url) as wrong,
        rpc(gateway.url) as ok,
    ):
        await ok.login(daemon_token(core))
        # A wrong token leaves the session unauthenticated (and the connection open)...
        refused = await wrong.call("session.auth", {"token": "not-the-token"})
        assert refused["error"]["code"] == INTERNAL
        loop = asyncio.get_running_loop()
        start = loop.time()
        # ...until the deadline, like a client that never says anything.
        assert await close_of(silent.ws) == (1008, reason)
        assert await close_of(wrong.ws) == (1008, reason)
        assert loop.time() - start < 2
        # An authenticated session is not affected.
        await asyncio.sleep(0.3)
        assert await ok.result("tools.list") == {"tools": [], "count": 0}


async def test_without_auth_there_is_no_auth_deadline(tmp_path: Path) -> None:
    config = make_config(tmp_path, auth=False, ws_auth_timeout=0.2)
    async with running(config) as (_, gateway), rpc(gateway.url) as client:
        await asyncio.sleep(0.6)
        assert await client.result("tools.list") == {"tools": [], "count": 0}


async def test_a_separate_gateway_learns_from_the_core_that_auth_is_off(tmp_path: Path) -> None:
    """The deadline follows the core's auth, not the gateway's own Config."""
    core = Core(make_config(tmp_path, auth=False).core)
    await core.start()
    gateway = Gateway(make_config(tmp_path, ws_auth_timeout=0.2).gateway, core.grpc_address)
    await gateway.start()
    try:
        async with rpc(gateway.url) as client:
            await asyncio.sleep(0.6)
            assert await client.result("tools.list") == {"tools": [], "count": 0}
    finally:
        await stopped(gateway.stop())
        await stopped(core.stop(grace=0))


async def test_silent_client_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    # The idle timeout is 10 ping intervals: a loaded machine may wake the loop late.
    config = make_config(tmp_path, ws_ping_interval=0.1, ws_idle_timeout=1.0, ws_close_timeout=0.5)
    async with running(config) as (_, gateway):
        raw = await RawWebSocket.open("127.0.0.1", gateway.ws_port)
        try:
            code, reason, pings = await raw.read_until_close()
        finally:
            raw.close()
        assert code == 1001 and reason == "idle timeout: nothing received for 1s"
        assert pings >= 2  # it was pinged, and never answered


async def test_oversized_message_closes_cleanly(tmp_path: Path) -> None:
    config = make_config(tmp_path, ws_max_message_bytes=4096)
    async with running(config) as (core, gateway):
        async with rpc(gateway.url) as client:
            auth = await client.login(daemon_token(core))
            await client.send(
                {"id": 1, "method": "state.set", "params": {"key": "k", "value": "x" * 5000}}
            )
            code, reason = await close_of(client.ws)
            assert code == 1009 and "4096" in reason
        await session_closed(core, auth["session_id"])
        async with rpc(gateway.url) as other:  # the gateway itself is fine
            await other.login(daemon_token(core))


async def test_message_limit_is_small_until_the_session_is_authenticated(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path, ws_max_message_bytes=64 * 1024, ws_max_message_bytes_before_auth=1024
    )
    big = {"key": "k", "value": "x" * 8000}
    async with running(config) as (core, gateway):
        async with rpc(gateway.url) as client:  # before auth: closed, nothing parsed
            await client.send({"id": 1, "method": "state.set", "params": big})
            code, reason = await close_of(client.ws)
            assert code == 1009 and "1024" in reason
        async with rpc(gateway.url) as client:  # after auth: the full limit applies
            await client.login(daemon_token(core))
            answer = await client.call("state.set", big)
            assert "error" not in answer, answer
            assert await client.result("state.get", {"key": "k"}) == big["value"]


def _slow_reader_config(tmp_path: Path, **overrides: Any) -> Config:
    """Small buffers everywhere between the core and a client that stops reading."""
    return make_config(
        tmp_path,
        auth=False,
        ws_outbound_queue=8,
        ws_write_limit=16 * 1024,
        session_outbound_queue=8,
        max_inflight_per_session=8,
        **overrides,
    )


async def _open_unread(gateway: Gateway, core: Core) -> tuple[RawWebSocket, ClientSession]:
    """A raw client (small receive buffer) with an authenticated session."""
    assert core.parts is not None
    raw = await RawWebSocket.open("127.0.0.1", gateway.ws_port, rcvbuf=4096)
    await raw.send_text({"id": 0, "method": "session.auth", "params": {}})
    _, payload = await raw.read_frame()
    return raw, core.parts.registry.sessions[json.loads(payload)["result"]["session_id"]]


def _echo_64k(n: int) -> dict[str, Any]:
    """A request whose answer echoes 64 KiB."""
    params = {"protocol_version": 3, "client_version": "v" * 65536}
    return {"id": n, "method": "server.handshake", "params": params}


async def test_client_that_reads_late_gets_every_response(tmp_path: Path) -> None:
    """A client that stops reading is met with backpressure, not a disconnect: the
    gateway stops reading its core stream, the core stops reading its requests, and
    once it reads again every answer is there."""
    config = _slow_reader_config(tmp_path, ws_stall_timeout=10)
    async with running(config) as (core, gateway):
        raw, session = await _open_unread(gateway, core)
        n = 200  # 13 MiB of answers: far more than every buffer on the way
        flood = asyncio.create_task(_send_all(raw, [_echo_64k(i) for i in range(1, n + 1)]))
        connection = next(iter(gateway.connections))
        for _ in range(1000):  # the client falls behind: its queue fills (backpressure)
            if connection.outbound.full():
                break
            await asyncio.sleep(0.01)
        assert connection.outbound.full()
        ids = set()
        for _ in range(n):
            answer = json.loads((await raw.read_frame())[1])
            assert answer["result"]["protocol_version"] == 3
            ids.add(answer["id"])
        assert ids == set(range(1, n + 1))
        await bounded(flood, "the sending of every request")
        assert not session.closed.is_set()
        raw.close()


async def _send_all(raw: RawWebSocket, messages: list[dict[str, Any]]) -> None:
    for message in messages:
        await raw.send_text(message)


async def test_client_that_never_reads_is_held_to_its_bounds_then_disconnected(
    tmp_path: Path,
) -> None:
    config = _slow_reader_config(tmp_path, ws_stall_timeout=0.3, ws_close_timeout=5)
    async with running(config) as (core, gateway):
        raw, session = await _open_unread(gateway, core)
        flood = asyncio.create_task(_send_all(raw, [_echo_64k(i) for i in range(1, 2000)]))
        # The client took nothing for ws_stall_timeout: the gateway gave up on it and
        # ended its core session...
        await asyncio.wait_for(session.closed.wait(), 10)
        flood.cancel()
        # ...and closed the WebSocket with a reason, found behind what was already sent.
        code, reason, _ = await raw.read_until_close()
        raw.close()
        assert (code, reason) == (1008, "client not reading: stalled for 0.3s")
        # Other clients are unaffected.
        async with rpc(gateway.url) as other:
            assert (await other.result("session.auth", {}))["ok"] is True


async def test_queue_towards_a_client_that_never_reads_is_bounded_in_bytes(
    tmp_path: Path,
) -> None:
    """The core answers 300 reads of a 64 KiB state value (19 MiB) to a client that reads
    nothing: the gateway holds at most its byte budget, 256 KiB, though its frame bound
    (1024 frames, 64 MiB of these) is far off; then it gives the client up (1008)."""
    budget = 256 * 1024
    config = make_config(
        tmp_path,
        auth=False,
        ws_outbound_queue=1024,
        ws_outbound_queue_bytes=budget,
        ws_write_limit=16 * 1024,
        ws_stall_timeout=0.5,
        ws_close_timeout=5,
    )
    async with running(config) as (core, gateway):
        raw, session = await _open_unread(gateway, core)
        value = "v" * 65536
        await raw.send_text(
            {"id": 1, "method": "state.set", "params": {"key": "k", "value": value}}
        )
        reads = [{"id": n, "method": "state.get", "params": {"key": "k"}} for n in range(2, 302)]
        flood = asyncio.create_task(_send_all(raw, reads))
        connection = next(iter(gateway.connections))
        peak = 0
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10
        while not session.closed.is_set():  # sampled while the gateway holds it
            peak = max(peak, connection.outbound.nbytes)
            await asyncio.sleep(0.005)
            assert loop.time() < give_up, "the client was never given up on"
        flood.cancel()
        assert budget - 65600 < connection.outbound.peak_bytes <= budget
        assert peak <= budget
        code, reason, _ = await raw.read_until_close()
        raw.close()
        assert (code, reason) == (1008, "client not reading: stalled for 0.5s")


async def test_gateway_stop_closes_connections_with_a_reason(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    async with rpc(gateway.url) as client:
        await client.login(daemon_token(core))
        stopping = asyncio.create_task(gateway.stop())
        assert await close_of(client.ws) == (1001, "server shutting down")
        await stopped(stopping, "the gateway's stop")


async def test_gateway_stop_while_clients_are_connecting(served: tuple[Core, Gateway]) -> None:
    _, gateway = served

    async def attempt() -> None:
        # Refused, rejected in the handshake, or opened and then closed: never left open.
        with contextlib.suppress(ConnectionClosed, InvalidStatus, InvalidMessage, OSError):
            async with connect(gateway.url, ping_interval=None, open_timeout=5) as ws:
                await ws.recv()

    attempts = [asyncio.create_task(attempt()) for _ in range(20)]
    await asyncio.sleep(0.01)
    await stopped(gateway.stop(), within=10)
    await bounded(asyncio.gather(*attempts), "the connection attempts", within=10)


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "car-server.sock"
    config = make_config(tmp_path, unix_socket=path)
    async with running(config) as (core, gateway):
        assert gateway.unix_socket == path and path.exists()
        assert path.stat().st_mode & 0o777 == 0o600
        async with unix_connect(str(path), ping_interval=None) as ws:
            client = Rpc(ws)
            await client.login(daemon_token(core))
            assert await client.result("tools.list") == {"tools": [], "count": 0}
    assert not path.exists()


async def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "car-server.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    async with running(make_config(tmp_path, unix_socket=path)) as (_, gateway):
        assert gateway.unix_socket == path
        second = Gateway(make_config(tmp_path, unix_socket=path).gateway, "127.0.0.1:1")
        with pytest.raises(OSError, match="already listening"):
            await second.start()
        assert second.ws_port != 0
        with pytest.raises(OSError):  # a failed start left no listener behind
            await asyncio.open_connection("127.0.0.1", second.ws_port)


async def test_two_gateways_serve_one_core(served: tuple[Core, Gateway]) -> None:
    core, first = served
    second = Gateway(first.config, core.grpc_address)
    await second.start()
    try:
        assert second.ws_port != first.ws_port
        async with rpc(first.url) as a, rpc(second.url) as b:
            auth_a = await a.login(daemon_token(core))
            auth_b = await b.login(daemon_token(core))
            assert core.parts is not None
            assert {auth_a["session_id"], auth_b["session_id"]} <= set(core.parts.registry.sessions)
            # Events cross gateways: a host on one sees an agent registered on the other.
            await a.result("host.subscribe", {})
            agent = await b.result("host.register_agent", {"name": "worker", "kind": "bot"})
            event = await a.next_frame()
            assert event["method"] == "host.event" and "id" not in event
            assert event["params"]["kind"] == "agent.registered"
            assert event["params"]["agent_id"] == agent["id"]
            # Per-connection state stays per connection, whichever gateway carries it.
            await a.result("state.set", {"key": "k", "value": "a"})
            await b.result("state.set", {"key": "k", "value": "b"})
            assert await a.result("state.get", {"key": "k"}) == "a"
            assert await b.result("state.get", {"key": "k"}) == "b"
            # Stopping one gateway leaves the other's sessions alone.
            await stopped(second.stop())
            assert await a.result("state.get", {"key": "k"}) == "a"
            await session_closed(core, auth_b["session_id"])
            # ... and the core saw b's session end: its agent left the registry.
            gone = await a.next_frame()
            assert gone["params"]["kind"] == "agent.unregistered"
            assert gone["params"]["agent_id"] == agent["id"]
    finally:
        await stopped(second.stop())
