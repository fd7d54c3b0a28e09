"""`car-grpc` as a real child process: launched with its own CAR_HOME, its listeners read
from its log lines (so ports may be 0), stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

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

    async def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send `sig`, wait for the exit (bounded) and return the exit code."""
        self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            _, rest = await self.proc.communicate()
        self.lines += rest.decode().splitlines()
        return self.proc.returncode if self.proc.returncode is not None else -1


@contextlib.asynccontextmanager
async def launched(home: Path, *args: str) -> AsyncIterator[Process]:
    """`python -m car_grpc.cli ARGS` with CAR_HOME=home; killed on exit if still running."""
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
    try:
        yield Process(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def serve(home: Path, *args: str) -> AsyncIterator[str]:
    """`car-grpc serve` on ephemeral ports, TCP only; yields its WebSocket URL and stops it
    with SIGTERM afterwards."""
    flags = ("--port", "0", "--grpc-port", "0", "--no-unix-socket", *args)
    async with launched(home, "serve", *flags) as server:
        _, ws_address = await server.listeners(2)
        yield f"ws://{ws_address}/"
        assert await server.terminate() == 0, server.lines
