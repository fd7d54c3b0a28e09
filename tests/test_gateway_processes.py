"""`car-grpc serve --gateway-processes N`: the gateway in N processes of its own beside the
core's, sharing one WebSocket port; one log, clean shutdown, and no gateway outlives the
server's process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.processes import car_grpc
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
