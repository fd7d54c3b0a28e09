"""`car-grpc serve` as a real process: it prints the dashboard's one-time login link, the
link logs a client in, and --no-dashboard serves none."""

from __future__ import annotations

from pathlib import Path

from tests.dashboard_helpers import LOGIN_LINE, log_in, request
from tests.processes import ONE_PROCESS, car_grpc


async def test_serve_prints_a_login_link_that_logs_in_once(tmp_path: Path) -> None:
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket", "--dashboard-port", "0")
    async with car_grpc(tmp_path / "home", "serve", *ONE_PROCESS, *flags) as server:
        match = LOGIN_LINE.search(await server.next_line("dashboard: log in at"))
        assert match is not None
        link = match["url"]
        assert link.startswith("http://127.0.0.1:") and "/login?token=" in link
        cookie = await log_in(link)
        status = await request("GET", link.split("login?")[0] + "api/status", {"Cookie": cookie})
        assert status.status == 200 and status.json()["session_count"] == 0
        assert (await request("GET", link)).status == 401  # used up
        fresh = LOGIN_LINE.search(await server.next_line("dashboard: log in at"))
        assert fresh is not None and fresh["url"] != link
        assert await server.terminate() == 0


async def test_no_dashboard(tmp_path: Path) -> None:
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket", "--no-dashboard")
    async with car_grpc(tmp_path / "home", "serve", *ONE_PROCESS, *flags) as server:
        await server.listeners(2)
        assert await server.terminate() == 0
    assert not any("dashboard" in line for line in server.lines)
