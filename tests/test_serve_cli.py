"""`car-grpc serve` and `car-grpc gateway` as real processes: they start with ephemeral
ports (learned from their log lines), serve WebSocket JSON-RPC over TCP and the Unix
socket, and stop cleanly on SIGTERM, removing the token files."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import unix_connect

from car_grpc.core.server import Core
from tests.processes import ONE_PROCESS, Process, car_grpc, car_grpc_argv, completed, port
from tests.ws_helpers import Rpc, daemon_token, rpc


async def test_serve_starts_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with car_grpc(home, "serve", "--port", "0", "--grpc-port", "0") as server:
        await serve_and_stop(server, home)


async def serve_and_stop(server: Process, home: Path) -> None:
    grpc_address, ws_url, unix = await server.listeners(3)
    assert grpc_address.startswith("127.0.0.1:") and port(grpc_address) != 0
    assert ws_url.startswith("ws://127.0.0.1:") and port(ws_url) != 0
    socket_path = home / "run" / "car-server.sock"
    assert unix == f"unix:{socket_path}"
    tokens = home / "ai.parslee.car"
    token = (tokens / "auth-token").read_text()
    assert len(token) == 43 and (tokens / "host-token").exists()

    async with rpc(ws_url) as client:
        await client.login(token)
        assert await client.result("tools.list") == {"tools": [], "count": 0}
        async with unix_connect(str(socket_path), ping_interval=None) as ws:
            other = Rpc(ws)
            await other.login(token)
            assert await other.result("tools.list") == {"tools": [], "count": 0}
            assert await server.terminate() == 0
    assert not (tokens / "auth-token").exists()
    assert not (tokens / "host-token").exists()
    assert not socket_path.exists()
    # Exactly one line per listener (websockets' own start-up lines are quiet); the
    # fourth is the dashboard's.
    assert sum("listening on" in line for line in server.lines) == 4


async def test_serve_says_in_one_line_that_its_grpc_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        async with car_grpc(
            tmp_path / "home", "serve", "--port", "0", "--grpc-port", busy
        ) as server:
            assert await server.wait() == 1
    assert server.lines[-1].startswith(
        f"car-grpc: core: cannot listen for gRPC on 127.0.0.1:{busy}"
    )
    assert not any("Traceback" in line for line in server.lines)
    assert not (tmp_path / "home" / "ai.parslee.car" / "auth-token").exists()


async def test_serve_flags(tmp_path: Path) -> None:
    async with car_grpc(
        tmp_path / "home",
        "serve",
        *ONE_PROCESS,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--no-auth",
        "--no-approvals",
        "--no-unix-socket",
    ) as server:
        _, ws_url = await server.listeners(2)
        async with rpc(ws_url) as client:
            assert (await client.result("session.auth", {}))["auth_enabled"] is False
        assert await server.terminate() == 0
        assert not any("unix:" in line for line in server.lines)
    assert not (tmp_path / "home" / "ai.parslee.car" / "auth-token").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_serve_shuts_down_cleanly_on(sig: int, tmp_path: Path) -> None:
    home = tmp_path / "home"
    wal = home / "car-grpc" / "store.sqlite3-wal"
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket")
    async with car_grpc(home, "serve", *flags) as server:
        _, ws_url = await server.listeners(2)
        token = (home / "ai.parslee.car" / "auth-token").read_text()
        async with rpc(ws_url) as client:
            await client.login(token)
            assert wal.exists()  # the store is open
            assert await server.terminate(sig) == 0
    assert not (home / "ai.parslee.car" / "auth-token").exists()
    assert not (home / "ai.parslee.car" / "host-token").exists()
    # The store was closed: SQLite folds and removes its write-ahead log on the last close.
    assert not wal.exists()
    assert server.lines[-1].endswith("car_grpc: stopped")


async def test_help_documents_every_flag() -> None:
    _, text, _ = await completed(car_grpc_argv("serve", "--help"), timeout=20)
    for flag in ("--host", "--port", "--grpc-port", "--no-auth", "--no-approvals"):
        assert re.search(rf"^\s+{flag}\b.*\S", text, re.M), flag
    # Where the token files go, as config.default_token_dir decides it.
    where = (
        "$CAR_HOME/ai.parslee.car when CAR_HOME is set, else $XDG_RUNTIME_DIR/ai.parslee.car, "
        "else ~/.config/ai.parslee.car"
    )
    assert where in " ".join(text.split())


async def test_gateway_process_in_front_of_a_core(tmp_path: Path, core: Core) -> None:
    args = ("gateway", "--core", core.grpc_address, "--port", "0")
    async with (
        car_grpc(tmp_path / "gw", *args) as first,
        car_grpc(tmp_path / "gw", *args) as second,
    ):
        await two_gateways(core, [first, second])


async def two_gateways(core: Core, gateways: list[Process]) -> None:
    addresses = [(await g.listeners(1))[0] for g in gateways]
    assert len(set(addresses)) == 2
    async with rpc(addresses[0]) as a, rpc(addresses[1]) as b:
        await a.login(daemon_token(core))
        await b.login(daemon_token(core))
        assert core.parts is not None and len(core.parts.registry.sessions) == 2
    for g in gateways:
        assert await g.terminate() == 0
        assert not any("unix:" in line for line in g.lines)
