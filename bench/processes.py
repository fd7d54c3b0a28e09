"""The benchmarks' processes: `car-grpc serve` and helper servers, started and stopped one way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

#: The gateway's start-up line: group 1 is the WebSocket host:port, group 2 the core's.
LISTENING = re.compile(r"WebSocket listening on ws://(\S+?)/ \(core (\S+)\)")


def cli_env(home: str | Path) -> dict[str, str]:
    """This environment without CAR_* settings, with CAR_HOME=home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    env["CAR_HOME"] = str(home)
    return env


async def stop(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """SIGTERM, wait (reading what its pipes still hold), then SIGKILL if it lingers."""
    if proc.returncode is None:
        proc.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


@contextlib.asynccontextmanager
async def car_grpc_serve(
    home: str | Path, *flags: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, re.Match[str]]]:
    """`car-grpc serve` on ephemeral ports with state in `home`; yields the process and its
    LISTENING line. Its log is read (and dropped) while it runs so the pipe never fills."""
    args = ["serve", "--port", "0", "--grpc-port", "0", "--no-unix-socket", *flags]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "car_grpc.cli", *args,
        env=cli_env(home), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(30):
            while not (match := LISTENING.search((line := await proc.stderr.readline()).decode())):
                if not line:
                    raise RuntimeError("car-grpc serve exited before listening")
        drain = asyncio.create_task(_drain(proc.stderr))
        yield proc, match
    finally:
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        await stop(proc)
