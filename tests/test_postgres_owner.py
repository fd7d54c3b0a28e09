"""No test PostgreSQL server outlives its owner (tests/postgres_server.py): a child process
starts one and is SIGKILLed; the server is stopped and its directory removed, by the
watchdog, or, when the watchdog was killed too, by the next `create` (`reap`), which
leaves the servers of running owners alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from tests.bounded import bounded, until
from tests.postgres_server import ROOT, _identity, reap
from tests.processes import Process, launch

#: Starts a server, says where it is (its directory, its pid, its watchdog's), then waits.
OWNER = """
import sys
from tests.postgres_server import PostgresServer
server = PostgresServer.create()
server.start()
print(server.root, server.pid, server.watchdog_pid, flush=True)
sys.stdin.read()
"""
#: Seconds an orphaned server (or a killed process) has to be gone.
GONE = 30


async def owned_server(owner: Process) -> tuple[Path, int, int]:
    assert owner.proc.stdout is not None
    line = await bounded(owner.proc.stdout.readline(), "the owner's server", within=60)
    assert line, owner.log
    root, pid, watchdog = line.decode().split()
    assert _identity(int(pid)) and _identity(int(watchdog)), "server and watchdog run"
    return Path(root), int(pid), int(watchdog)


async def gone(pid: int, root: Path | None, what: str) -> None:
    """Until the process `pid` ended and `root` (if given) is removed."""
    await until(
        lambda: not _identity(pid) and not (root is not None and root.exists()),
        f"the end of {what} (pid {pid})",
        within=GONE,
        every=0.05,
    )


def owner() -> contextlib.AbstractAsyncContextManager[Process]:
    return launch([sys.executable, "-c", OWNER], name="owner", cwd=ROOT, stdin=True, stdout=True)


async def test_the_watchdog_stops_the_server_of_a_killed_owner() -> None:
    async with owner() as child:
        root, pid, watchdog = await owned_server(child)
        child.kill()
        await gone(pid, root, "the server of a killed owner")
        await gone(watchdog, None, "the watchdog, its work done")


async def test_the_next_create_reaps_a_server_whose_owner_and_watchdog_were_killed() -> None:
    async with owner() as child:
        root, pid, watchdog = await owned_server(child)
        assert root not in await asyncio.to_thread(reap)  # its owner runs: not reaped
        os.kill(watchdog, signal.SIGKILL)
        await gone(watchdog, None, "the killed watchdog")
        child.kill()
        await child.wait()
        assert _identity(pid) and root.exists(), "the server outlived both"
        await asyncio.to_thread(reap)  # what PostgresServer.create does first
        await gone(pid, root, "the reaped server")
