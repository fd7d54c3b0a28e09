"""Run the programs of the Node.js client (clients/node) as subprocesses of a test.

The programs report what they do as JSON lines on stdout (`{"event": "ready", ...}`); a
test waits for the events it expects. `npm ci` runs once, when node_modules does not match
the committed lock file, so the suite works from a clean clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"
_LOCK = NODE_DIR / "package-lock.json"
_STAMP = NODE_DIR / "node_modules" / ".car-grpc-installed-lock"
#: Most stderr kept per program (shown when a test fails).
_STDERR_LIMIT = 64 * 1024


def ensure_installed() -> None:
    """`npm ci` in clients/node, unless node_modules was installed from this lock file."""
    lock = _LOCK.read_bytes()
    if _STAMP.exists() and _STAMP.read_bytes() == lock:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: the polyglot tests need Node.js and npm")
    subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        check=True,
        timeout=300,
    )
    _STAMP.write_bytes(lock)


class NodeProgram:
    """One running Node program and the events it printed."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._stderr = bytearray()
        assert proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._drain(proc.stderr))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self._stderr += chunk[: max(0, _STDERR_LIMIT - len(self._stderr))]

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    async def next_event(self, timeout: float = 10) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: no output within {timeout}s; events {self.events}; "
                f"stderr:\n{self.stderr}"
            ) from None
        if not line:
            await self._exited()
            raise AssertionError(
                f"{self.name} exited ({self.proc.returncode}) after {self.events}; "
                f"stderr:\n{self.stderr}"
            )
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def expect(self, name: str, timeout: float = 10) -> dict[str, Any]:
        """Read events until one named `name`; an `error` event fails the test."""
        while True:
            event = await self.next_event(timeout)
            if event["event"] == name:
                return event
            if event["event"] == "error":
                raise AssertionError(f"{self.name} failed: {event}; stderr:\n{self.stderr}")

    async def _exited(self, timeout: float = 10) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stderr_task, 1)
        return code

    async def finish(self, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait for the program to exit with status 0; return every event it printed."""
        while True:
            assert self.proc.stdout is not None
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                break
            self.events.append(json.loads(line))
        code = await self._exited(timeout)
        assert code == 0, f"{self.name} exited {code}: {self.events}; stderr:\n{self.stderr}"
        return self.events

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task


@contextlib.asynccontextmanager
async def run_node(
    script: str, *args: str, address: str, car_home: Path, **env: str
) -> AsyncIterator[NodeProgram]:
    """Start `node <script> <args>` against the server at `address` (gRPC).

    The program finds the token files under `car_home`, as a local client would; extra
    `env` (e.g. CAR_AGENT_ID, CAR_AGENT_TOKEN) is added. Nothing CAR_* leaks in from the
    environment of the test run.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    full_env = {**base, "CAR_GRPC_ADDRESS": address, "CAR_HOME": str(car_home), **env}
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: the polyglot tests need Node.js")
    proc = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / script),
        *args,
        cwd=NODE_DIR,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    program = NodeProgram(script, proc)
    try:
        yield program
    finally:
        await program.stop()
