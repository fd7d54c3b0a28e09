"""`car-grpc serve` and `car-grpc gateway` as real processes: they start with ephemeral
ports (learned from their log lines), serve WebSocket JSON-RPC over TCP and the Unix
socket, and stop cleanly on SIGTERM, removing the token files."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import unix_connect

from car_grpc.core.server import Core
from tests.ws_helpers import Rpc, daemon_token, rpc

LISTENING = re.compile(r"listening on (?:ws://)?(?P<where>\S+?)/?(?: \(core .*\))?$")


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def listeners(self, count: int, timeout: float = 20) -> list[str]:
        """The addresses of the first `count` "listening on" log lines."""
        found: list[str] = []
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while len(found) < count:
                raw = await self.proc.stderr.readline()
                assert raw, f"exited early: {self.lines}"
                line = raw.decode().rstrip()
                self.lines.append(line)
                if match := LISTENING.search(line):
                    found.append(match["where"])
        return found

    async def terminate(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout):
            _, rest = await self.proc.communicate()
        self.lines += rest.decode().splitlines()
        return self.proc.returncode if self.proc.returncode is not None else -1


@pytest.fixture
async def car_grpc() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


async def launch(started: list[Process], home: Path, *args: str) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    env["CAR_HOME"] = str(home)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "car_grpc.cli",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    process = Process(proc)
    started.append(process)
    return process


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


async def test_serve_starts_serves_and_stops_on_sigterm(
    tmp_path: Path, car_grpc: list[Process]
) -> None:
    home = tmp_path / "home"
    server = await launch(car_grpc, home, "serve", "--port", "0", "--grpc-port", "0")
    grpc_address, ws_address, unix = await server.listeners(3)
    assert grpc_address.startswith("127.0.0.1:") and port_of(grpc_address) != "0"
    assert ws_address.startswith("127.0.0.1:") and port_of(ws_address) != "0"
    socket_path = home / "run" / "car-server.sock"
    assert unix == f"unix:{socket_path}"
    tokens = home / "ai.parslee.car"
    token = (tokens / "auth-token").read_text()
    assert len(token) == 43 and (tokens / "host-token").exists()

    async with rpc(f"ws://{ws_address}/") as client:
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
    # Exactly one line per listener (websockets' own start-up lines are quiet).
    assert sum("listening on" in line for line in server.lines) == 3


async def test_serve_flags(tmp_path: Path, car_grpc: list[Process]) -> None:
    server = await launch(
        car_grpc,
        tmp_path / "home",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--no-auth",
        "--no-approvals",
        "--no-unix-socket",
    )
    _, ws_address = await server.listeners(2)
    async with rpc(f"ws://{ws_address}/") as client:
        assert (await client.result("session.auth", {}))["auth_enabled"] is False
    assert await server.terminate() == 0
    assert not any("unix:" in line for line in server.lines)
    assert not (tmp_path / "home" / "ai.parslee.car" / "auth-token").exists()


async def test_help_documents_every_flag() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "car_grpc.cli", "serve", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode()
    for flag in ("--host", "--port", "--grpc-port", "--no-auth", "--no-approvals"):
        assert re.search(rf"^\s+{flag}\b.*\S", text, re.M), flag


async def test_gateway_process_in_front_of_a_core(
    tmp_path: Path, core: Core, car_grpc: list[Process]
) -> None:
    gateways = [
        await launch(
            car_grpc, tmp_path / "gw", "gateway", "--core", core.grpc_address, "--port", "0"
        )
        for _ in range(2)
    ]
    addresses = [(await g.listeners(1))[0] for g in gateways]
    assert len(set(addresses)) == 2
    async with rpc(f"ws://{addresses[0]}/") as a, rpc(f"ws://{addresses[1]}/") as b:
        await a.login(daemon_token(core))
        await b.login(daemon_token(core))
        assert core.state is not None and len(core.state.sessions) == 2
    for g in gateways:
        assert await g.terminate() == 0
        assert not any("unix:" in line for line in g.lines)
