"""Client programs in other processes: the TypeScript client (clients/node, run by Node.js
with tsx), the Python examples (clients/python) and an agent on the official `car-runtime`
client (tests/car_runtime_agent.py).

The programs report what they do as JSON lines on stdout (`{"event": "ready", ...}`); a
test waits for the events it expects. `npm ci` runs once, when node_modules does not match
the committed lock file, so the suite works from a clean clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.processes import ONE_PROCESS, Process, Served, cli_env, launch, serving

TESTS = Path(__file__).resolve().parent
NODE_DIR = TESTS.parent / "clients" / "node"
PYTHON_DIR = TESTS.parent / "clients" / "python"
_LOCK = NODE_DIR / "package-lock.json"
_STAMP = NODE_DIR / "node_modules" / ".car-grpc-installed-lock"


def ensure_installed() -> None:
    """`npm ci` in clients/node, unless node_modules was installed from this lock file.

    Both test workers may get here at once on a clean checkout: `npm ci` removes
    node_modules first, so one worker's install would pull the other's away. They take
    turns on an exclusive lock of the lock file (which `npm ci` only reads)."""
    with _LOCK.open("rb") as locked:
        fcntl.flock(locked, fcntl.LOCK_EX)
        _install(locked.read())


def _install(lock: bytes) -> None:
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
    """One running client program and the events it printed on stdout; its stderr is its
    log (`stderr`, shown when a test fails)."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.name = process.name
        self.proc = process.proc
        self.events: list[dict[str, Any]] = []

    @property
    def stderr(self) -> str:
        return self.process.log

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
            await self.process.wait()
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

    async def finish(self, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait for the program to exit with status 0; return every event it printed."""
        while True:
            assert self.proc.stdout is not None
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                break
            self.events.append(json.loads(line))
        code = await self.process.wait(timeout)
        assert code == 0, f"{self.name} exited {code}: {self.events}; stderr:\n{self.stderr}"
        return self.events


def step(program: Program) -> None:
    """Lets a record-run program that waits for its steps (`-step`, `--step`) take its
    next step."""
    assert program.proc.stdin is not None
    program.proc.stdin.write(b"\n")


def recorded_turn(index: int, prompt: str) -> dict[str, Any]:
    """watch-run's line for turn `index` that record-run records, as every language's
    programs print it: `prompt` echoed by the tool `shell`, its output in capitals, after
    the run's `started` record (cursor 1)."""
    return {
        "event": "record",
        "cursor": index + 2,
        "status": "RUN_STATUS_IN_PROGRESS",
        "kind": "turn",
        "index": index,
        "prompt": prompt,
        "tool": "shell",
        "parameters": {
            "argv": ["echo", prompt],
            "step": index + 1,
            "env": {"LANG": "C", "dry_run": False, "limit": None},
        },
        "output": prompt.upper(),
    }


@contextlib.asynccontextmanager
async def run_program(
    name: str, argv: Sequence[str], env: dict[str, str], cwd: Path
) -> AsyncIterator[Program]:
    """`argv` as a Program (stdin a pipe, closed when it is stopped at the end)."""
    async with launch(argv, name=name, env=env, cwd=cwd, stdin=True, stdout=True, grace=5) as p:
        yield Program(p)


def run_node(
    script: str, *args: str, address: str, car_home: Path, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """Start `node --import tsx clients/node/<script> <args>` against the server's gRPC
    `address` (tsx, from clients/node's dependencies, runs the TypeScript as it is).

    The program finds the token files under `car_home`, as a local client would; `env`
    (e.g. CAR_AGENT_ID, CAR_AGENT_TOKEN) is added.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: the polyglot tests need Node.js")
    full_env = cli_env(car_home, CAR_GRPC_ADDRESS=address, **env)
    argv = [node, "--import", "tsx", str(NODE_DIR / script), *args]
    return run_program(script, argv, full_env, NODE_DIR)


def run_python(
    script: str, *args: str, address: str, car_home: Path, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """Start `python clients/python/<script> <args>` (this interpreter: car_grpc.v1 is
    installed) against the server's gRPC `address`, finding the token files under
    `car_home` as a local client would; `env` is added."""
    full_env = cli_env(car_home, CAR_GRPC_ADDRESS=address, **env)
    argv = [sys.executable, str(PYTHON_DIR / script), *args]
    return run_program(script, argv, full_env, PYTHON_DIR)


def run_car_runtime_agent(
    reply: str, *, url: str, agent_id: str, token: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """Start tests/car_runtime_agent.py: `agent_id` attached through the gateway at `url`."""
    script = str(TESTS / "car_runtime_agent.py")
    env = cli_env(
        CAR_DAEMON_URL=url,
        CAR_AGENT_ID=agent_id,
        CAR_AGENT_TOKEN=token,
        CAR_NO_VERSION_WARNING="1",
    )
    return run_program("car_runtime_agent.py", [sys.executable, script, reply], env, TESTS)


# The fixtures `served` and `channel` of the client programs' test modules, which import
# them by these names (pytest registers a fixture under its `name`): one server a module.


@pytest.fixture(scope="module", name="served")
def served_per_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One `car-grpc serve` (one process) for a module; each test uses its own agents,
    sessions and runs."""
    with serving(tmp_path_factory.mktemp("serve") / "car-home", *ONE_PROCESS) as server:
        yield server


@pytest.fixture(name="channel")
async def channel_to_served(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel to `served`'s core."""
    async with grpc.aio.insecure_channel(served.grpc_address) as ch:
        yield ch
