"""The benchmarks start their processes with tests/processes.py. This module keeps the two
names that benchmarks written before it import (bench_burst and bench_bystander on main),
on top of it; remove it once they use tests.processes too."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests import processes


async def stop(proc: asyncio.subprocess.Process, timeout: float = processes.GRACE) -> None:
    """SIGTERM, wait (reading what its pipes still hold), then SIGKILL if it lingers."""
    if proc.returncode is None:
        proc.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def car_grpc_serve(
    home: str | Path, *flags: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, tuple[str, str, str]]]:
    """`tests.processes.car_grpc_serve`; yields the process and, indexed as the match of the
    gateway's log line was: [1] the WebSocket host:port, [2] the core's address."""
    async with processes.car_grpc_serve(home, *flags) as server:
        core, url = await server.listeners(2, timeout=30)
        host_port = url.removeprefix("ws://").rstrip("/")
        yield server.proc, (f"listening on {url} (core {core})", host_port, core)
