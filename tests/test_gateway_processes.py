"""`car-grpc serve --gateway-processes N`: the gateway in N processes of its own beside the
core's, sharing one WebSocket port; one log, clean shutdown, and no gateway outlives the
server's process."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.processes import car_grpc, port
from tests.test_serve_cli import serve_and_stop
from tests.ws_helpers import rpc


async def test_serves_listens_once_and_stops_cleanly(tmp_path: Path) -> None:
    """The same listeners, log lines, token files and clean SIGTERM as in one process."""
    home = tmp_path / "home"
    async with car_grpc(
        home, "serve", "--port", "0", "--grpc-port", "0", "--gateway-processes", "2"
    ) as server:
        await serve_and_stop(server, home)


async def test_many_connections_at_once_are_served(tmp_path: Path) -> None:
    home = tmp_path / "home"
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket", "--no-dashboard")
    async with car_grpc(home, "serve", *flags, "--gateway-processes", "2") as server:
        _, url = await server.listeners(2)
        token = (home / "ai.parslee.car" / "auth-token").read_text()

        async def client(i: int) -> object:
            async with rpc(url) as c:
                await c.login(token)
                await c.result("state.set", {"key": f"k{i}", "value": i})
                return await c.result("state.get", {"key": f"k{i}"})

        answers = await asyncio.gather(*(client(i) for i in range(32)))
        assert answers == list(range(32))
        assert await server.terminate() == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL])
async def test_no_gateway_outlives_a_killed_server(tmp_path: Path, sig: int) -> None:
    """The log (stderr, which every gateway process shares) ends only once each of them
    has exited: they stop when the pipe from their parent closes."""
    home = tmp_path / "home"
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket", "--no-dashboard")
    async with car_grpc(home, "serve", *flags, "--gateway-processes", "2") as server:
        _, url = await server.listeners(2)
        async with rpc(url) as c:
            token = (home / "ai.parslee.car" / "auth-token").read_text()
            await c.login(token)
            server.proc.send_signal(sig)
            assert await server.wait(timeout=20) == -sig


async def test_a_bad_count_is_refused(tmp_path: Path) -> None:
    async with car_grpc(tmp_path, "serve", "--gateway-processes", "65") as server:
        assert await server.wait() == 2
        assert "--gateway-processes: must be a number from 0 to 64" in server.log


def _socket_inodes(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    links = (os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink())
    return {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}


def _core_unix_sockets(pid: int) -> list[list[str]]:
    """The rows of /proc/net/unix (Num RefCount Protocol Flags Type St Inode Path) of
    `pid`'s sockets on the core's abstract socket (an accepted connection shows its
    listener's path; an abstract one starts with @)."""
    inodes = _socket_inodes(pid)
    rows = (row.split() for row in Path("/proc/net/unix").read_text().splitlines()[1:])
    return [r for r in rows if r[6] in inodes and r[-1].startswith("@car-grpc-core-")]


def _tcp_remote_ports(pid: int) -> list[int]:
    """The remote ports of `pid`'s TCP sockets (/proc/PID/net/tcp: sl local remote st
    ... inode)."""
    inodes = _socket_inodes(pid)
    return [
        int(row[2].split(":")[1], 16)
        for table in ("tcp", "tcp6")
        for row in map(str.split, Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:])
        if row[9] in inodes
    ]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_gateway_processes_reach_the_core_over_a_unix_socket(tmp_path: Path) -> None:
    """The gateway process's gRPC connection to the core is the core's abstract Unix
    socket (a message costs less CPU there than over TCP loopback), not its TCP port."""
    home = tmp_path / "home"
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket", "--no-dashboard")
    async with car_grpc(home, "serve", *flags, "--gateway-processes", "1") as server:
        grpc_address, url = await server.listeners(2)
        async with rpc(url) as c:
            await c.login((home / "ai.parslee.car" / "auth-token").read_text())
            await c.result("state.set", {"key": "k", "value": 1})
            assert await c.result("state.get", {"key": "k"}) == 1
            (gateway,) = _children(server.proc.pid)
            named = _core_unix_sockets(server.proc.pid)
            assert any(row[3] == "00010000" for row in named)  # listening
            assert any(row[5] == "03" for row in named)  # a connection accepted
            assert port(grpc_address) not in _tcp_remote_ports(gateway)
        assert await server.terminate() == 0
