"""What one client can make the server hold in connections and sessions, on a real core,
a real gateway and real sockets, with small caps: the gateway's ws_max_connections and
ws_max_connections_per_peer (the handshake refused with 503 and Retry-After, before any
core stream), and the core's max_sessions (RESOURCE_EXHAUSTED with its rich details on a
plain stream; on a multiplexed one that session alone, its WebSocket closed 1013), as is
a session past what one multiplexed stream carries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect, unix_connect
from websockets.exceptions import InvalidStatus
from websockets.frames import CloseCode

from car_grpc.cli import build_parser, config_from
from car_grpc.config import Config
from car_grpc.connection_caps import RETRY_AFTER
from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2, session_pb2_grpc
from car_grpc.wire import multiplex
from car_grpc.wire.errors import INTERNAL
from tests.bounded import WAIT_BOUND, until
from tests.conftest import make_config
from tests.error_details import assert_rich_status, car_error
from tests.processes import ONE_PROCESS, serve
from tests.test_car_runtime import run_scenario
from tests.ws_helpers import Rpc, daemon_token, running, running_core

MAX_SESSIONS_REFUSAL = "too many sessions: the core holds at most 2 (max_sessions)"


@contextlib.asynccontextmanager
async def client(url: str, source: str = "127.0.0.1") -> AsyncIterator[Rpc]:
    """A WebSocket to `url` from the loopback address `source` (each a peer of its own)."""
    async with connect(url, ping_interval=None, local_addr=(source, 0)) as ws:
        yield Rpc(ws)


async def refused(url: str, source: str = "127.0.0.1") -> tuple[int, str, str]:
    """A handshake the gateway refuses: (status, Retry-After, body)."""
    with pytest.raises(InvalidStatus) as error:
        async with connect(url, ping_interval=None, local_addr=(source, 0)):
            pass
    response = error.value.response
    return response.status_code, response.headers["Retry-After"], response.body.decode()


async def logged_in(core: Core, rpc: Rpc) -> Rpc:
    await rpc.login(daemon_token(core))
    return rpc


async def works(rpc: Rpc) -> None:
    """The session answers a request."""
    assert (await rpc.result("tools.list"))["count"] == 0


async def test_connections_past_the_total_and_the_peer_caps_are_refused_with_503(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, ws_max_connections=3, ws_max_connections_per_peer=2)
    async with running(config) as (core, gateway), contextlib.AsyncExitStack() as stack:
        url = gateway.url
        first = [await stack.enter_async_context(client(url)) for _ in range(2)]
        status, retry, body = await refused(url)
        assert (status, retry) == (503, str(RETRY_AFTER))
        assert (
            body == "too many connections from 127.0.0.1: at most 2 (ws_max_connections_per_peer)\n"
        )
        other = await stack.enter_async_context(client(url, "127.0.0.2"))
        status, retry, body = await refused(url, "127.0.0.3")
        assert (status, retry) == (503, str(RETRY_AFTER))
        assert body == "too many connections: the gateway holds at most 3 (ws_max_connections)\n"
        for rpc in (*first, other):  # the admitted are served as before
            await works(await logged_in(core, rpc))
        # Refused before any stream to the core: it holds the three admitted alone.
        assert len(gateway.connections) == 3
        assert core.parts is not None and core.parts.registry.streamed == 3


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def silent(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from `source` that sends nothing (yet)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_unanswered(reader: asyncio.StreamReader) -> None:
    """The gateway closes the connection without a byte."""
    with contextlib.suppress(ConnectionResetError):  # closed by a reset: as good
        assert await asyncio.wait_for(reader.read(), WAIT_BOUND) == b""


async def upgraded(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """The connection, silent so far, is still open and served: its handshake succeeds."""
    reader, writer = conn
    writer.write(UPGRADE)
    status = await asyncio.wait_for(reader.readline(), WAIT_BOUND)
    assert status.startswith(b"HTTP/1.1 101"), status


async def test_connections_that_never_send_a_request_are_held_within_the_caps(
    tmp_path: Path,
) -> None:
    """Before its request comes a connection is a handshake under way, counted against
    the same caps: one more from the peer (or past the total) is closed at once, while
    the held ones are served when their request comes (their handshake slot then frees)."""
    config = make_config(tmp_path, ws_max_connections=3, ws_max_connections_per_peer=2)
    async with running(config) as (_, gateway):
        port = gateway.ws_port
        held = [await silent(port, "127.0.0.1") for _ in range(2)]
        past_peer = await silent(port, "127.0.0.1")
        await closed_unanswered(past_peer[0])
        other_peer = await silent(port, "127.0.0.2")
        past_total = await silent(port, "127.0.0.3")
        await closed_unanswered(past_total[0])
        # The held ones were not closed with them: each is answered when it asks.
        await upgraded(held[0])
        # Its handshake done, the peer may start another (its connection counts apart).
        again = await silent(port, "127.0.0.1")
        await upgraded(again)
        await upgraded(other_peer)
        # Two connections from 127.0.0.1 now: a third is refused with 503 as before.
        assert (await refused(gateway.url))[0] == 503
        for _, writer in (*held, past_peer, other_peer, past_total, again):
            writer.close()
        await until(lambda: not gateway._handshakes.total, "no handshake under way")


async def test_the_count_frees_when_a_connection_closes_or_drops(tmp_path: Path) -> None:
    config = make_config(tmp_path, ws_max_connections=2, ws_max_connections_per_peer=2)
    async with running(config) as (core, gateway), contextlib.AsyncExitStack() as stack:
        url = gateway.url
        kept = await stack.enter_async_context(client(url))
        async with client(url) as closing:
            await works(await logged_in(core, closing))
            assert (await refused(url))[0] == 503
        # Closed cleanly: room again at once.
        async with client(url) as dropped:
            await logged_in(core, dropped)
            assert (await refused(url))[0] == 503
            dropped.drop()  # no close frame: the TCP connection just ends
            await until(lambda: len(gateway.connections) == 1, "the gateway holds 1 connection")
            async with client(url) as after:
                await works(await logged_in(core, after))
        await works(await logged_in(core, kept))


async def test_a_unix_socket_client_is_a_peer_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "gw.sock"
    config = make_config(
        tmp_path, unix_socket=path, ws_max_connections=4, ws_max_connections_per_peer=1
    )
    async with running(config) as (core, gateway), contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(client(gateway.url))
        ws = await stack.enter_async_context(unix_connect(str(path), ping_interval=None))
        await works(await logged_in(core, Rpc(ws)))
        with pytest.raises(InvalidStatus) as error:
            async with unix_connect(str(path), ping_interval=None):
                pass
        body = error.value.response.body.decode()
        cap = "at most 1 (ws_max_connections_per_peer)"
        assert body == f"too many connections from the Unix socket: {cap}\n"


@pytest.mark.parametrize("streams", [1, 0], ids=["multiplexed", "stream-per-connection"])
async def test_a_session_past_max_sessions_is_closed_1013_and_the_others_go_on(
    tmp_path: Path, streams: int
) -> None:
    """Through the gateway: multiplexed (`car-grpc serve`'s), only that session's open
    fails and the shared stream carries the others on; with a stream per connection, that
    stream is refused. Either way the client is closed 1013 with the core's reason."""
    config = make_config(tmp_path, max_sessions=2, ws_multiplex_streams=streams)
    async with running(config) as (core, gateway), contextlib.AsyncExitStack() as stack:
        url = gateway.url
        held = [await logged_in(core, await stack.enter_async_context(client(url))) for _ in "ab"]
        async with client(url) as third:
            assert await third.wait_closed() == (CloseCode.TRY_AGAIN_LATER, MAX_SESSIONS_REFUSAL)
        for rpc in held:
            await works(rpc)
        await held[0].close()
        assert core.parts is not None
        registry = core.parts.registry
        await until(lambda: registry.streamed == 1, "the core holds 1 session")
        async with client(url) as again:
            await works(await logged_in(core, again))
        await works(held[1])


async def test_a_session_past_what_one_multiplexed_stream_carries_is_closed_1013(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wire/multiplex.MAX_SESSIONS (65,536 at once on one stream; 2 here), below the
    core's max_sessions: that session alone ends, the stream carries the others on."""
    monkeypatch.setattr(multiplex, "MAX_SESSIONS", 2)
    config = make_config(tmp_path, max_sessions=10, ws_multiplex_streams=1)
    async with running(config) as (core, gateway), contextlib.AsyncExitStack() as stack:
        url = gateway.url
        held = [await logged_in(core, await stack.enter_async_context(client(url))) for _ in "ab"]
        async with client(url) as third:
            assert await third.wait_closed() == (
                CloseCode.TRY_AGAIN_LATER,
                "too many sessions on one stream",
            )
        for rpc in held:
            await works(rpc)


async def test_the_first_request_is_answered_with_the_refusal(tmp_path: Path) -> None:
    """Sent right after the handshake (as car-runtime sends session.auth), before or after
    the core's refusal reaches the gateway: answered with the reason, then the close."""
    config = make_config(tmp_path, max_sessions=2)
    async with running(config) as (core, gateway), contextlib.AsyncExitStack() as stack:
        for _ in "ab":
            await stack.enter_async_context(client(gateway.url))
        async with client(gateway.url) as third:
            error = await third.error("session.auth", {"token": daemon_token(core)})
            assert error == {"code": INTERNAL, "message": MAX_SESSIONS_REFUSAL}
            assert await third.wait_closed() == (CloseCode.TRY_AGAIN_LATER, MAX_SESSIONS_REFUSAL)


@pytest.mark.parametrize("method", ["Connect", "ConnectBatched"])
async def test_a_grpc_stream_past_max_sessions_gets_resource_exhausted_with_details(
    tmp_path: Path, method: str
) -> None:
    async with (
        running_core(make_config(tmp_path, max_sessions=2).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        stub = session_pb2_grpc.SessionServiceStub(channel)
        open_stream: Callable[[], Any] = getattr(stub, method)
        held = [open_stream() for _ in "ab"]
        for call in held:
            assert dict(await call.initial_metadata())  # taken in
        past = open_stream()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await past.read()
        e = error.value
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == MAX_SESSIONS_REFUSAL
        assert car_error(e).message == MAX_SESSIONS_REFUSAL
        assert_rich_status(e, car_error(e))
        # The held streams are served; when one ends there is room for another.
        held[0].cancel()
        assert core.parts is not None
        registry = core.parts.registry
        await until(lambda: registry.streamed == 1, "the core holds 1 session")
        again = open_stream()
        auth = session_pb2.ClientFrame(id="a")
        auth.session_auth.token = daemon_token(core)
        await again.write(
            auth if method == "Connect" else session_pb2.ConnectBatchedRequest(frames=[auth])
        )
        answer = await again.read()
        frames = [answer] if method == "Connect" else list(answer.frames)
        assert [f.WhichOneof("body") for f in frames] == ["session_auth"]
        for call in (held[1], again):
            call.cancel()


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ("--ws-max-connections-per-peer", "1"),
            "connect daemon at {url}: HTTP error: 503 Service Unavailable",
        ),
        (
            ("--max-sessions", "1"),
            "session.auth rejected by daemon: too many sessions: the core holds at most 1"
            " (max_sessions)",
        ),
    ],
    ids=["gateway-cap", "max-sessions"],
)
async def test_car_runtime_sees_a_clear_error(
    tmp_path: Path, flags: tuple[str, str], error: str
) -> None:
    """The official client, against `car-grpc serve` with a cap set by its flag, while
    another connection holds the room: refused at the handshake (car-runtime shows the
    status, not the body), or its session refused by the core (its first request, auth,
    gets the reason)."""
    home = tmp_path / "home"
    async with serve(home, *ONE_PROCESS, *flags) as url, client(url):
        seen = await run_scenario("first_call", url, home)
    first = seen["first"]
    assert first["raised"] == "RuntimeError"
    assert first["message"] == error.format(url=url)


def test_the_caps_come_from_the_environment_or_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Config()
    assert defaults.core.max_sessions == 65_536
    gateway = defaults.gateway
    assert (gateway.ws_max_connections, gateway.ws_max_connections_per_peer) == (16_384, 4_096)
    monkeypatch.setenv("CAR_MAX_SESSIONS", "10")
    monkeypatch.setenv("CAR_WS_MAX_CONNECTIONS", "20")
    monkeypatch.setenv("CAR_WS_MAX_CONNECTIONS_PER_PEER", "5")
    config = Config.from_env()
    assert config.core.max_sessions == 10
    assert (config.gateway.ws_max_connections, config.gateway.ws_max_connections_per_peer) == (
        20,
        5,
    )
    for command in ("serve", "gateway"):
        args = [command, "--ws-max-connections", "7", "--ws-max-connections-per-peer", "3"]
        if command == "gateway":
            args += ["--core", "127.0.0.1:1"]
        flagged = config_from(build_parser().parse_args(args)).gateway
        assert (flagged.ws_max_connections, flagged.ws_max_connections_per_peer) == (7, 3)
    for command in ("serve", "core"):
        flagged_core = config_from(build_parser().parse_args([command, "--max-sessions", "4"]))
        assert flagged_core.core.max_sessions == 4
    monkeypatch.setenv("CAR_WS_MAX_CONNECTIONS_PER_PEER", "0")
    with pytest.raises(ValueError, match="CAR_WS_MAX_CONNECTIONS_PER_PEER must be a whole"):
        Config.from_env()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["core", "--max-sessions", "0"])


async def test_a_gateway_process_counts_its_own_connections(tmp_path: Path) -> None:
    """With the gateway in a process of its own the cap holds there (each process counts
    its own; here one process)."""
    home = tmp_path / "home"
    flags = ("--gateway-processes", "1", "--ws-max-connections-per-peer", "1")
    async with serve(home, *flags) as url, client(url) as held:
        status, retry, body = await refused(url)
        assert (status, retry) == (503, str(RETRY_AFTER))
        assert (
            body == "too many connections from 127.0.0.1: at most 1 (ws_max_connections_per_peer)\n"
        )
        await held.close()
        async with client(url) as again:
            await again.login((home / "ai.parslee.car" / "auth-token").read_text().strip())
            await works(again)
