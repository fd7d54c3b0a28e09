"""Client programs in other processes: the Node.js client (clients/node) and an agent on
the official `car-runtime` client (tests/car_runtime_agent.py).

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
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
NODE_DIR = TESTS.parent / "clients" / "node"
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


class Program:
    """One running client program and the events it printed."""

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
        if self.proc.stdin is not None:
            self.proc.stdin.close()
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


def _env(**env: str) -> dict[str, str]:
    """The test run's environment without any CAR_* variable, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CAR_")}, **env}


@contextlib.asynccontextmanager
async def _run(
    name: str, argv: Sequence[str], env: dict[str, str], cwd: Path
) -> AsyncIterator[Program]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    program = Program(name, proc)
    try:
        yield program
    finally:
        await program.stop()


def run_node(
    script: str, *args: str, address: str, car_home: Path, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """Start `node clients/node/<script> <args>` against the server's gRPC `address`.

    The program finds the token files under `car_home`, as a local client would; `env`
    (e.g. CAR_AGENT_ID, CAR_AGENT_TOKEN) is added.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: the polyglot tests need Node.js")
    full_env = _env(CAR_GRPC_ADDRESS=address, CAR_HOME=str(car_home), **env)
    return _run(script, [node, str(NODE_DIR / script), *args], full_env, NODE_DIR)


def run_car_runtime_agent(
    reply: str, *, url: str, agent_id: str, token: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """Start tests/car_runtime_agent.py: `agent_id` attached through the gateway at `url`."""
    script = str(TESTS / "car_runtime_agent.py")
    env = _env(
        CAR_DAEMON_URL=url,
        CAR_AGENT_ID=agent_id,
        CAR_AGENT_TOKEN=token,
        CAR_NO_VERSION_WARNING="1",
    )
    return _run("car_runtime_agent.py", [sys.executable, script, reply], env, TESTS)
