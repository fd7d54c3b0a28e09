"""Security: what a refused caller leaves behind, wrong credentials on the WebSocket, the
modes of every secret file and directory, secrets kept out of logs and error messages,
message size limits, and listeners that stay on loopback.

Covered elsewhere, not repeated here: session.auth in every variant on the session
stream (test_auth_e2e), typed-RPC metadata binding (test_typed_rpcs_e2e), the dashboard's
one-time login link, cookie, Origin and Host checks (test_dashboard_http), agent tokens
added and revoked on a running core (test_cli_e2e), the 1009 close of an oversized
WebSocket message (test_gateway_e2e), the Unix socket's mode (test_gateway_e2e).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from websockets.exceptions import ConnectionClosed

from car_grpc.core.server import Core
from car_grpc.core.tokens import AUTH_TOKEN_FILE, HOST_TOKEN_FILE
from car_grpc.gateway import Gateway
from car_grpc.store import database_path
from car_grpc.v1 import state_pb2, state_pb2_grpc
from car_grpc.wire.errors import AUTH_REQUIRED, INTERNAL
from car_grpc.wire.limits import MAX_MESSAGE_BYTES
from car_grpc.wire.metadata import AGENT_ID_KEY
from tests.conftest import make_config
from tests.processes import Process, agents_add, car_grpc, port
from tests.ws_helpers import RpcError, rpc, running

TOKEN_MISMATCH = "auth failed: token mismatch"


def tokens(core: Core) -> tuple[str, str]:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon, core.parts.tokens.host


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ refused callers


async def test_a_refused_typed_call_leaves_no_session_behind(
    core: Core, channel: grpc.aio.Channel
) -> None:
    """Every unauthenticated call opens a one-call session; refusing it must end it too,
    or anyone could fill the core's memory without a token."""
    assert core.parts is not None
    daemon, _ = tokens(core)
    agent = await core.parts.agent_tokens.add("agent-7")
    before = set(core.parts.registry.sessions)
    state = state_pb2_grpc.StateServiceStub(channel)
    for meta in [
        (),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {daemon}x"),),
        (("authorization", f"Bearer {agent}"), (AGENT_ID_KEY, "agent-8")),
        (("authorization", f"Bearer {daemon}"), (AGENT_ID_KEY, "agent-7")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await state.ListStateKeys(state_pb2.ListStateKeysRequest(), metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, meta
        assert set(core.parts.registry.sessions) == before, meta


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Core, Gateway]]:
    async with running(make_config(tmp_path)) as pair:
        yield pair


async def test_wrong_credentials_on_the_websocket(served: tuple[Core, Gateway]) -> None:
    """Each wrong credential gets the same answer (no oracle of which part was wrong) and
    leaves the connection open but unauthenticated; the right one then works on it."""
    core, gateway = served
    assert core.parts is not None
    daemon, host = tokens(core)
    agent = await core.parts.agent_tokens.add("agent-7")
    async with rpc(gateway.url) as client:
        for wrong in [
            {"token": daemon[:-1]},
            {"token": host},
            {"host_token": daemon},
            {"token": agent, "agent_id": "agent-8"},
            {"token": daemon, "agent_id": "agent-7"},
            {"agent_id": "agent-7", "token": agent + "x"},
        ]:
            with pytest.raises(RpcError) as err:
                await client.result("session.auth", wrong)
            assert (err.value.code, err.value.message) == (INTERNAL, TOKEN_MISMATCH), wrong
        assert "agent-7" not in core.parts.registry.attached
        assert (await client.result("session.auth", {"token": agent, "agent_id": "agent-7"}))["ok"]
        assert core.parts.registry.attached["agent-7"] is not None
    async with rpc(gateway.url) as client:
        with pytest.raises(RpcError):
            await client.result("session.auth", {"token": "guess"})
        with pytest.raises(RpcError) as err:
            await client.result("state.keys", {})
        assert err.value.code == AUTH_REQUIRED
        assert await client.wait_closed(5) == (1008, "auth required")


# ------------------------------------------------------------------ files on disk


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


async def test_secret_files_and_their_directories_are_private(tmp_path: Path) -> None:
    """Even under a umask that lets everyone read: token files 0600 in a 0700 directory (a
    wider token file left from before is replaced), the store's SQLite files (database,
    -wal, -shm) 0600 in a 0700 directory (wider ones left from before are narrowed), the
    Unix socket 0600 in a 0700 directory."""
    socket_path = tmp_path / "run" / "car-server.sock"
    # The embedded store's files are the subject, whatever store the suite runs on.
    config = make_config(tmp_path, unix_socket=socket_path, store=None)
    config.core.token_dir.mkdir(parents=True)
    (config.core.token_dir / AUTH_TOKEN_FILE).write_text("stale")
    (config.core.token_dir / AUTH_TOKEN_FILE).chmod(0o644)
    store = database_path(config.core.state_root)
    store_files = [store, *(store.with_name(store.name + s) for s in ("-wal", "-shm"))]
    with umask(0):
        async with running(config):
            for name in (AUTH_TOKEN_FILE, HOST_TOKEN_FILE):
                assert mode(config.core.token_dir / name) == 0o600, name
            for path in store_files:
                assert mode(path) == 0o600, path
            assert mode(store.parent) == 0o700
            assert mode(socket_path) == 0o600
            assert mode(socket_path.parent) == 0o700
    # Store files an earlier version left 0644, the -wal and -shm held open by another
    # process (several may open the store: `agents add` beside a server).
    other = sqlite3.connect(store)
    try:
        other.execute("SELECT count(*) FROM agent_tokens").fetchone()
        for path in store_files:
            path.chmod(0o644)
        with umask(0):
            async with running(config):
                for path in store_files:
                    assert mode(path) == 0o600, path
    finally:
        other.close()
    # A token directory the server creates itself is 0700.
    fresh = make_config(tmp_path / "fresh", store=None)
    with umask(0):
        async with running(fresh):
            assert mode(fresh.core.token_dir) == 0o700


# ------------------------------------------------------------------ a real process


@contextlib.asynccontextmanager
async def serve_logged(home: Path) -> AsyncIterator[tuple[Process, list[str]]]:
    """`car-grpc serve` with its defaults on ephemeral ports, everything it writes (stdout
    and stderr) kept in its `lines`; yields it and its four listeners (gRPC, WebSocket,
    Unix socket, dashboard), then stops it with SIGTERM, which it must exit 0 from."""
    args = ["serve", "--port", "0", "--grpc-port", "0", "--dashboard-port", "0"]
    async with car_grpc(home, *args) as served:
        yield served, await served.listeners(4)
        assert await served.terminate(timeout=15) == 0, served.log


async def test_secrets_stay_out_of_logs_and_error_messages(tmp_path: Path) -> None:
    """A session of failed and successful logins of every kind, on the WebSocket and on
    typed RPCs: no token, right or wrong, appears in anything the server writes or answers.
    The dashboard's one-time login token appears in its login line only."""
    home = tmp_path / "home"
    async with serve_logged(home) as (server, listeners):
        grpc_address, url, _, _ = listeners
        secret_dir = home / "ai.parslee.car"
        daemon = (secret_dir / AUTH_TOKEN_FILE).read_text()
        host = (secret_dir / HOST_TOKEN_FILE).read_text()
        agent = await agents_add(home, "bot")
        wrong = ["wrong-token-0123456789abcdef", daemon[:-2] + "zz", agent[::-1]]
        answers: list[str] = []

        async def attempt(call: Awaitable[Any]) -> None:
            """Note the answer, whatever it is."""
            try:
                answers.append(repr(await call))
            except RpcError as e:
                answers.append(e.message)
            except ConnectionClosed:
                answers.append("connection closed")

        async with rpc(url) as client:
            for credential in (
                {"token": wrong[0]},
                {"host_token": wrong[1]},
                {"token": wrong[2], "agent_id": "bot"},
                {"token": agent, "agent_id": "not-bot"},
            ):
                await attempt(client.result("session.auth", credential))
            await attempt(client.result("state.keys", {}))  # -32001, then the close
        for credential in (
            {"token": daemon},
            {"host_token": host},
            {"token": agent, "agent_id": "bot"},
        ):
            async with rpc(url) as client:
                await attempt(client.result("session.auth", credential))
                await attempt(client.result("server.handshake", {"protocol_version": 3}))
                await attempt(client.result("runs.record_turns", {"run_id": "x", "turns": [{}]}))
                await attempt(client.result("session.auth", {"token": wrong[0]}))
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            state = state_pb2_grpc.StateServiceStub(channel)
            for bearer in (*wrong, daemon, host):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await state.ListStateKeys(
                        state_pb2.ListStateKeysRequest(),
                        metadata=(("authorization", f"Bearer {bearer}"),),
                    )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await state.ListStateKeys(
                    state_pb2.ListStateKeysRequest(),
                    metadata=(("authorization", f"Bearer {wrong[0]}"),),
                )
            answers.append(f"{err.value.details()} {err.value.trailing_metadata()}")
    assert any(TOKEN_MISMATCH in a for a in answers)  # the failures did happen
    for secret in (daemon, host, agent, *wrong):
        assert secret not in server.log, f"a token in the server's output:\n{server.log}"
        assert not any(secret in a for a in answers), answers
    login = re.compile(r"dashboard: log in at http://\S+/login\?token=(\S+)$")
    login_tokens = {m[1] for line in server.lines if (m := login.search(line))}
    assert login_tokens
    for token in login_tokens:
        assert sum(token in line for line in server.lines) == 1


# ------------------------------------------------------------------ sizes and listeners


async def test_a_grpc_message_over_the_limit_is_refused_and_harms_no_one(
    core: Core, channel: grpc.aio.Channel
) -> None:
    daemon, _ = tokens(core)
    meta = (("authorization", f"Bearer {daemon}"),)
    state = state_pb2_grpc.StateServiceStub(channel)
    huge = state_pb2.SetStateRequest(key="k")
    huge.value.string_value = "x" * MAX_MESSAGE_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await state.SetState(huge, metadata=meta)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    keys = await state.ListStateKeys(state_pb2.ListStateKeysRequest(), metadata=meta)
    assert list(keys.keys) == []
    assert core.parts is not None and not core.parts.registry.sessions


def listening_on(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """The TCP sockets process `pid` listens on, from /proc (no tools needed)."""
    fds = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            raw_ip, raw_port = local.split(":")
            packed = bytes.fromhex(raw_ip)
            # Each 32-bit word is in host (little-endian) order.
            ip = b"".join(packed[i : i + 4][::-1] for i in range(0, size, 4))
            address = ipaddress.ip_address(ip)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped  # gRPC binds 127.0.0.1 as ::ffff:127.0.0.1
            found.append((address, int(raw_port, 16)))
    return found


async def test_every_listener_is_on_loopback(tmp_path: Path) -> None:
    """`car-grpc serve` with its defaults: gRPC, WebSocket, dashboard and A2A listen on
    127.0.0.1 and nowhere else; the fourth listener is the Unix socket under CAR_HOME."""
    async with serve_logged(tmp_path / "home") as (server, listeners):
        sockets = listening_on(server.proc.pid)
        ports = {port(address) for address in listeners[:2]}
        ports.add(port(listeners[3]))
        a2a = await server.next_line("A2A agents at ")  # "... at http://HOST:PORT/a2a/<agent_id>"
        ports.add(port(a2a.split(" at ", 1)[1].removesuffix("/a2a/<agent_id>")))
        assert sorted(port for _, port in sockets) == sorted(ports), sockets
        assert all(str(ip) == "127.0.0.1" for ip, _ in sockets), sockets
        assert listeners[2] == f"unix:{tmp_path / 'home' / 'run' / 'car-server.sock'}"
