"""Processes that the tests and the benchmarks start, all started and read one way.

`launch(argv)` starts a program and reads its log (stderr, and stdout too unless the
caller reads stdout itself) in the background from the first byte: a chatty child never
stalls on a full pipe, and every line is kept (`Process.lines`) for the test to check and
for failure messages. Leaving the context stops it (`Process.stop`). `car_grpc(home, ...)`
launches `python -m car_grpc.cli ...` with CAR_HOME=home and no other CAR_* variable;
`car_grpc_serve(home)` is `car-grpc serve` on ephemeral ports without the Unix socket.

A server says where it listens in its log, one line per listener: "... listening on
ADDRESS" (LISTENING). car-grpc's, in the order `car-grpc serve` logs them:

    core: gRPC listening on 127.0.0.1:PORT       ("gRPC (TLS) listening" with a certificate)
    gateway: WebSocket listening on ws://127.0.0.1:PORT/ (core ADDRESS)     (wss:// with TLS)
    gateway: WebSocket listening on unix:PATH
    dashboard: listening on http://127.0.0.1:PORT/

`Process.listeners(n)` waits for the first n and returns their addresses as logged: a gRPC
host:port, a ws://, wss:// or http:// URL, unix:PATH. Other servers started this way say
it the same way (`log_listening`).

One synchronous variant, `start_serve`: `car-grpc serve` for a module-scoped fixture, shared
by tests that each run in their own event loop (so no loop could read its log; a thread
does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tests.bounded import bounded

#: A listener's log line; `address` as logged.
LISTENING = re.compile(r"\blistening on (?P<address>\S+)")
#: `car-grpc serve` flags for ephemeral TCP ports and no Unix socket.
EPHEMERAL = ("--port", "0", "--grpc-port", "0", "--no-unix-socket")
#: `car-grpc serve` flags for one process (the gateway in the core's), for tests that are
#: about neither its processes nor its default: a gateway process of its own (what the
#: default "auto" starts on 2 CPUs) costs each server start ~1.5 s of CPU more.
ONE_PROCESS = ("--gateway-processes", "0")
#: Seconds a process has between SIGTERM and SIGKILL when it is stopped.
GRACE = 10.0

T = TypeVar("T")


def cli_env(car_home: str | Path | None = None, **extra: str) -> dict[str, str]:
    """This environment without CAR_* variables, then CAR_HOME=car_home and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    if car_home is not None:
        env["CAR_HOME"] = str(car_home)
    return env | extra


def car_grpc_argv(*args: str) -> list[str]:
    """The command line of `car-grpc ARGS` in this interpreter."""
    return [sys.executable, "-m", "car_grpc.cli", *args]


def port(address: str) -> int:
    """The port of a logged address: host:port or a URL."""
    return int(address.rstrip("/").rsplit(":", 1)[1])


def log_listening(name: str, address: str) -> None:
    """For a helper server: say on stderr where it listens, as car-grpc does (LISTENING)."""
    print(f"{name} listening on {address}", file=sys.stderr, flush=True)


def _addresses(lines: Sequence[str]) -> list[str]:
    return [m["address"] for line in lines if (m := LISTENING.search(line))]


class Process:
    """A child started by `launch`, its log read as it comes."""

    def __init__(
        self, name: str, proc: asyncio.subprocess.Process, log: asyncio.StreamReader
    ) -> None:
        self.name = name
        self.proc = proc
        #: Every line of the log so far, without its line end.
        self.lines: list[str] = []
        self._grew = asyncio.Event()
        self._ended = False
        self._after = 0  # where next_line looks from
        self._reader = asyncio.create_task(self._read(log))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        try:
            while chunk := await stream.read(65536):
                *complete, pending = (pending + chunk).split(b"\n")
                if complete:
                    self.lines += (line.decode(errors="replace").rstrip() for line in complete)
                    self._grew.set()
            if pending:
                self.lines.append(pending.decode(errors="replace").rstrip())
        finally:
            self._ended = True
            self._grew.set()

    async def _wait(self, find: Callable[[], T | None], what: str, timeout: float) -> T:
        """What `find` finds in the log (None until then), waiting for more lines."""
        try:
            async with asyncio.timeout(timeout):
                while (found := find()) is None:
                    if self._ended:
                        raise AssertionError(
                            f"{self.name} ended its log before {what}:\n{self.log}"
                        )
                    self._grew.clear()
                    await self._grew.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: no {what} within {timeout} s:\n{self.log}"
            ) from None
        return found

    async def listeners(self, count: int, timeout: float = 20) -> list[str]:
        """The addresses of its first `count` listeners, as logged."""

        def find() -> list[str] | None:
            found = _addresses(self.lines)
            return found[:count] if len(found) >= count else None

        return await self._wait(find, f"{count} listening lines", timeout)

    async def next_line(self, needle: str, timeout: float = 20) -> str:
        """The next log line holding `needle`, after the one this returned last."""

        def find() -> str | None:
            for i in range(self._after, len(self.lines)):
                if needle in self.lines[i]:
                    self._after = i + 1
                    return self.lines[i]
            return None

        return await self._wait(find, f"line with {needle!r}", timeout)

    async def wait(self, timeout: float = 10) -> int:
        """Its exit code, once it exited and its log is read to the end."""

        async def exited() -> int:
            code = await self.proc.wait()
            await self._reader
            return code

        return await bounded(exited(), f"{self.name}'s exit", within=timeout)

    async def output(self, timeout: float = 45) -> tuple[int, str]:
        """Its exit code and all it wrote to stdout (launched with stdout=True), once it
        exited within `timeout`."""
        assert self.proc.stdout is not None, "launched without stdout=True"
        out = await bounded(self.proc.stdout.read(), f"{self.name}'s output", within=timeout)
        return await self.wait(timeout), out.decode()

    async def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send `sig` and return the exit code (within `timeout`)."""
        self.proc.send_signal(sig)
        return await self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        self.proc.kill()

    async def stop(self, grace: float = GRACE) -> int:
        """Close its stdin, SIGTERM it, SIGKILL it when still there after `grace` s; its
        exit code."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
        return await self.wait()  # bounded: after SIGKILL only the log's end is awaited


@contextlib.asynccontextmanager
async def launch(
    argv: Sequence[str],
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdin: bool = False,
    stdout: bool = False,
    grace: float = GRACE,
) -> AsyncIterator[Process]:
    """Start `argv`; stopped on exit (`Process.stop(grace)`). Its log is stderr, and
    stdout too unless `stdout` (then the caller reads `proc.stdout`); `stdin` gives it a
    pipe to write to (closed when it is stopped), else /dev/null."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.STDOUT,
    )
    log = proc.stderr if stdout else proc.stdout
    assert log is not None
    process = Process(name or Path(argv[0]).name, proc, log)
    try:
        yield process
    finally:
        await process.stop(grace)


async def completed(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 30
) -> tuple[int, str, str]:
    """Run `argv` to its end (within `timeout`): its exit code, stdout and stderr."""
    async with launch(argv, env=env, stdout=True) as process:
        code, out = await process.output(timeout)
    return code, out, process.log


async def agents_add(home: str | Path, agent_id: str) -> str:
    """`car-grpc agents add AGENT_ID` with CAR_HOME=home, the operator's command (it prints
    the agent's token once, by design); the token."""
    code, out, err = await completed(car_grpc_argv("agents", "add", agent_id), cli_env(home))
    assert code == 0, err
    return out.strip()


def car_grpc(home: str | Path, *args: str) -> contextlib.AbstractAsyncContextManager[Process]:
    """`car-grpc ARGS` with CAR_HOME=home."""
    return launch(car_grpc_argv(*args), name=f"car-grpc {args[0]}", env=cli_env(home))


def car_grpc_serve(
    home: str | Path, *flags: str
) -> contextlib.AbstractAsyncContextManager[Process]:
    """`car-grpc serve FLAGS` on ephemeral TCP ports, without the Unix socket; its first
    two listeners are the core's gRPC address and the gateway's WebSocket URL."""
    return car_grpc(home, "serve", *EPHEMERAL, *flags)


@contextlib.asynccontextmanager
async def serve(home: Path, *flags: str) -> AsyncIterator[str]:
    """`car_grpc_serve(home, *flags)`; yields its WebSocket URL, then stops it with SIGTERM
    and checks that it exited cleanly."""
    async with car_grpc_serve(home, *flags) as server:
        _, url = await server.listeners(2)
        yield url
        assert await server.terminate() == 0, server.log


# ------------------------------------------------------------------ without an event loop


class Served:
    """A running `car-grpc serve` started by `start_serve`, its log read by a thread."""

    def __init__(self, proc: subprocess.Popen[str], car_home: Path) -> None:
        self.proc = proc
        self.car_home = car_home
        self.lines: list[str] = []
        self.grpc_address = ""
        self.ws_url = ""
        self._agents: dict[str, str] = {}
        self._changed = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                with self._changed:
                    self.lines.append(line.rstrip())
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def wait_ready(self, timeout: float) -> None:
        """Wait for the gRPC and WebSocket listeners."""
        with self._changed:
            self._changed.wait_for(lambda: len(_addresses(self.lines)) >= 2 or self._ended, timeout)
            found = _addresses(self.lines)
        if len(found) < 2:
            self.proc.kill()
            raise AssertionError(f"car-grpc serve did not start:\n{self.log}")
        self.grpc_address, self.ws_url = found[:2]

    def token(self, name: str) -> str:
        """A token file the server wrote (`auth-token`, `host-token`), as clients read it."""
        return (self.car_home / "ai.parslee.car" / name).read_text().strip()

    def add_agent(self, agent_id: str) -> str:
        """`car-grpc agents add <agent_id>`, the operator command; returns the token."""
        if agent_id not in self._agents:
            out = subprocess.run(
                car_grpc_argv("agents", "add", agent_id),
                env=cli_env(self.car_home),
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            self._agents[agent_id] = out.stdout.strip()
        return self._agents[agent_id]

    def stop(self, grace: float = GRACE) -> int:
        """SIGTERM, then the exit status (SIGKILL when it does not come within `grace`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(GRACE)
        self._reader.join(5)
        return self.proc.returncode


def start_serve(car_home: Path, *flags: str, timeout: float = 30) -> Served:
    """`car-grpc serve FLAGS` on ephemeral loopback ports with its state in `car_home`, once
    it listens (stop it with `Served.stop`)."""
    car_home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        car_grpc_argv("serve", *EPHEMERAL, *flags),
        env=cli_env(car_home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(proc, car_home)
    try:
        served.wait_ready(timeout)
    except BaseException:  # pytest-timeout's too: no server outlives its test
        served.stop()
        raise
    return served


@contextlib.contextmanager
def serving(car_home: Path, *flags: str) -> Iterator[Served]:
    """`start_serve(car_home, *flags)` for a fixture: stopped at the end, which fails unless
    it exited cleanly."""
    server = start_serve(car_home, *flags)
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, "car-grpc serve did not exit cleanly:\n" + server.log
