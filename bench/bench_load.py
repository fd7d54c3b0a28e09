"""Load: SESSIONS concurrent WebSocket sessions with mixed traffic against `car-grpc serve`.

`car-grpc serve` (gateway + core, auth on, its own CAR_HOME) runs in its own process; the
sessions are spread over WORKERS load-generator processes. Every session has a role:

- proposer (4 in 10): proposal.submit of one tool_call, answered by the session itself
  when the server calls back (tools.execute);
- recorder (3 in 10): an attached agent with a run of its own: runs.record_turns of
  TURNS_PER_BATCH turns;
- chat host + chat agent (1 + 1 in 10): agents.chat to its paired agent, which acks and
  streams CHAT_TOKENS tokens and `done`; done when the host has `done`;
- idle (1 in 10): connected, authenticated, nothing more.

Phases: open every session (auth + handshake), then measure the server's resident memory
(VmRSS); then DURATION seconds of traffic, each active session doing one operation after
another with a random pause of mean THINK seconds; memory is sampled throughout. Then every
session closes and the server must report none left (server.status). Any JSON-RPC error,
unexpected answer, close or timeout is a protocol error; there must be none.

The bare baseline, in the same run: the same sessions against a bare `websockets` echo
server in its own process, each operation one round trip of a frame of the same size, at
the same pace. Figures are printed as ratios to it.

    python -m bench bench_load          (or ./dev bench bench_load)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench import summary
from bench.proc import cpu_seconds, rss_kib
from tests.processes import Process, car_grpc_serve, launch

SESSIONS = 1000
WORKERS = 4
DURATION = 15.0
#: Mean pause between one session's operations: 0.5 s is the throughput issue's pace (4x the
#: 2 s this benchmark first ran at).
THINK = 0.5
TURNS_PER_BATCH = 4
CHAT_TOKENS = 8
#: Longest an operation may take before it counts as a protocol error.
OP_TIMEOUT = 30.0
#: Connections a worker opens at a time.
OPEN_CONCURRENCY = 25
#: Gateway processes beside the core (`car-grpc serve --gateway-processes`), from this
#: benchmark's own CAR_GATEWAY_PROCESSES (the server is started without CAR_* variables).
GATEWAY_PROCESSES = os.environ.get("CAR_GATEWAY_PROCESSES", "0")
ROLES = ("proposer",) * 4 + ("recorder",) * 3 + ("chat_host", "chat_agent", "idle")

JSON = Any


def role_of(i: int) -> str:
    return ROLES[i % len(ROLES)]


def agent_of(i: int) -> str:
    """The agent id of session i (recorders and chat agents are attached agents)."""
    return f"load-agent-{i}"


def turn(n: int) -> dict[str, JSON]:
    return {
        "prompt": f"step {n}: look at the failing test and decide what to change",
        "tool": "shell",
        "parameters": {"cmd": f"pytest -q tests/test_{n % 50}.py"},
        "output": "F." * 30 + f" {n} passed",
    }


# ------------------------------------------------------------------ one session


class ProtocolError(Exception):
    pass


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def note(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)


class Session:
    """One WebSocket session of a worker: requests by id, the server's requests and chat
    events dispatched by a reader task."""

    def __init__(self, ws: ClientConnection, index: int, stats: Stats, *, bare: bool) -> None:
        self.ws = ws
        self.index = index
        self.stats = stats
        #: Talking to the echo server: every frame that comes back answers a request.
        self.bare = bare
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[JSON]] = {}
        self._chats: dict[str, asyncio.Future[None]] = {}
        self._reader = asyncio.create_task(self._read())
        self.run_id = ""
        self.turns = 0

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if self.bare or "method" not in message:
                    future = self._waiting.pop(message.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif "id" in message:
                    await self._answer(message)
                elif message["method"] == "agents.chat.event":
                    params = message["params"]
                    waiter = self._chats.get(params["session_id"])
                    if params["kind"] == "done" and waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    elif params["kind"] not in ("token", "done"):
                        self.stats.errors.append(f"chat event {params}")
        except Exception as e:  # the connection went away
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ProtocolError(f"connection lost: {e!r}"))

    async def _answer(self, request: dict[str, JSON]) -> None:
        method = request["method"]
        if method == "tools.execute":
            result: JSON = {"ok": True, "echo": request["params"].get("parameters")}
            await self.ws.send(
                json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result})
            )
        elif method == "agent.chat":
            session_id = request["params"]["session_id"]
            accepted = {"jsonrpc": "2.0", "id": request["id"], "result": {"accepted": True}}
            await self.ws.send(json.dumps(accepted))
            for n in range(CHAT_TOKENS):
                await self.ws.send(_chat_event(session_id, "token", f"t{n} "))
            await self.ws.send(_chat_event(session_id, "done", None))
        else:
            self.stats.errors.append(f"unexpected server request {method}")

    async def call(self, method: str, params: JSON) -> JSON:
        """A request; its result, or ProtocolError for an error answer."""
        request_id = next(self._ids)
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        await self.ws.send(json.dumps(request))
        answer = await future
        if "error" in answer:
            raise ProtocolError(f"{method}: {answer['error']}")
        return answer["result"]

    async def login(self, credentials: dict[str, str]) -> None:
        await self.call("session.auth", credentials)
        await self.call("server.handshake", {"protocol_version": 3, "client_version": "load"})

    # -------------------------------------------------------------- the operations

    async def propose(self) -> None:
        action = {"id": "a", "type": "tool_call", "tool": "echo", "parameters": {"n": self.index}}
        result = await self.call("proposal.submit", {"proposal": {"actions": [action]}})
        if result["results"][0]["status"] != "succeeded":
            raise ProtocolError(f"proposal: {result}")

    async def record(self) -> None:
        if not self.run_id or self.turns + TURNS_PER_BATCH > 2000:
            started = await self.call("runs.start", {"intent": f"load {self.index}"})
            self.run_id, self.turns = started["run_id"], 0
        turns = [turn(self.turns + n) for n in range(TURNS_PER_BATCH)]
        reply = await self.call("runs.record_turns", {"run_id": self.run_id, "turns": turns})
        if not reply.get("ok") or reply["count"] != TURNS_PER_BATCH:
            raise ProtocolError(f"record_turns: {reply}")
        self.turns += TURNS_PER_BATCH

    async def chat(self) -> None:
        session_id = f"load-{self.index}-{next(self._ids)}"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chats[session_id] = done
        try:
            params = {
                "agent_id": agent_of(self.index + 1),
                "prompt": "go",
                "session_id": session_id,
            }
            accepted = await self.call("agents.chat", params)
            if accepted.get("accepted") is not True:
                raise ProtocolError(f"agents.chat: {accepted}")
            await done
        finally:
            del self._chats[session_id]

    async def echo(self) -> None:
        """The bare baseline's operation: one round trip of a frame of the same size."""
        request_id = next(self._ids)
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        action = {"id": "a", "type": "tool_call", "tool": "echo", "parameters": {"n": self.index}}
        params = {"proposal": {"actions": [action]}}
        await self.ws.send(
            json.dumps({"id": request_id, "method": "proposal.submit", "params": params})
        )
        await future

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self._reader


def _chat_event(session_id: str, kind: str, delta: str | None) -> str:
    params = {"session_id": session_id, "kind": kind, "delta": delta}
    return json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})


# ------------------------------------------------------------------ a worker process


async def _open(url: str, index: int, stats: Stats, credentials: dict[str, str] | None) -> Session:
    """A session, logged in with `credentials` (None: the bare echo server)."""
    ws = await connect(url, ping_interval=None, compression=None, max_size=None, open_timeout=60)
    session = Session(ws, index, stats, bare=credentials is None)
    if credentials is not None:
        await session.login(credentials)
    return session


def _credentials(tokens: dict[str, JSON], index: int) -> dict[str, str]:
    """session.auth params of session `index`: its agent's token, or the daemon token."""
    if role_of(index) in ("recorder", "chat_agent"):
        agent_id = agent_of(index)
        return {"agent_id": agent_id, "token": tokens["agents"][agent_id]}
    return {"token": tokens["daemon"]}


async def _traffic(session: Session, bare: bool, until: float) -> None:
    role = role_of(session.index)
    if role in ("idle", "chat_agent"):
        return  # chat agents answer from their reader task
    operation: Callable[[], Awaitable[None]] = {
        "proposer": session.propose,
        "recorder": session.record,
        "chat_host": session.chat,
    }[role]
    kind = "echo" if bare else role
    if bare:
        operation = session.echo
    await asyncio.sleep(random.uniform(0, THINK))  # spread the starts
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(operation(), OP_TIMEOUT)
        except (ProtocolError, TimeoutError) as e:
            session.stats.errors.append(f"session {session.index} {role}: {e!r}")
            return
        session.stats.note(kind, time.perf_counter() - start)
        await asyncio.sleep(random.expovariate(1 / THINK))


async def worker(url: str, first: int, count: int, tokens: dict[str, JSON] | None) -> None:
    """`python -m bench.bench_load worker URL FIRST COUNT TOKENS`: open sessions FIRST ..
    FIRST+COUNT-1 (TOKENS: a JSON file of the daemon and agent tokens, or - for the bare
    echo server), then follow the lines of stdin: `go SECONDS`, then `close`."""
    random.seed(first)
    stats = Stats()
    bare = tokens is None
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(i: int) -> Session:
        async with gate:
            return await _open(url, i, stats, None if tokens is None else _credentials(tokens, i))

    sessions = await asyncio.gather(*(one(i) for i in range(first, first + count)))
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": len(sessions)}), flush=True)
    command = (await loop.run_in_executor(None, sys.stdin.readline)).split()
    assert command[0] == "go", command
    until = time.monotonic() + float(command[1])
    await asyncio.gather(*(_traffic(s, bare, until) for s in sessions))
    print(json.dumps({"latencies": stats.latencies, "errors": stats.errors}), flush=True)
    assert (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "close"
    await asyncio.gather(*(s.close() for s in sessions))
    print(json.dumps({"closed": True}), flush=True)


# ------------------------------------------------------------------ the coordinator


def raise_fd_limit() -> None:
    """Room for every connection, in this process and (inherited) in its children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SESSIONS * 2 + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


#: What was read of a worker's stdout past the line asked for.
_unread: dict[int, bytes] = {}


async def _line(worker: Process, timeout: float) -> str:
    """The next line a worker printed on stdout."""
    assert worker.proc.stdout is not None
    stdout = worker.proc.stdout
    raw = _unread.pop(id(worker), b"")
    async with asyncio.timeout(timeout):
        # Not readline(): a report of every latency can be past its 64 KiB limit.
        while b"\n" not in raw and (chunk := await stdout.read(1 << 20)):
            raw += chunk
    if not raw:
        raise RuntimeError(f"{worker.name} exited early:\n{worker.log}")
    line, _, rest = raw.partition(b"\n")
    if rest:
        _unread[id(worker)] = rest
    return line.decode()


@contextlib.asynccontextmanager
async def car_grpc_serve_ws(home: Path) -> AsyncIterator[tuple[Process, str]]:
    flags = ("--no-dashboard", "--gateway-processes", GATEWAY_PROCESSES)
    async with car_grpc_serve(home, *flags) as server:
        _, url = await server.listeners(2, timeout=30)
        yield server, url


@contextlib.asynccontextmanager
async def echo_serve() -> AsyncIterator[tuple[Process, str]]:
    async with launch([sys.executable, "-m", "bench.bench_gateway", "echo"], stdin=True) as echo:
        [url] = await echo.listeners(1, timeout=30)
        yield echo, url


@dataclass
class Phase:
    """What one run (car-grpc or bare) measured."""

    rss_start_kib: int = 0
    rss_idle_kib: int = 0
    rss_active_kib: int = 0
    rss_closed_kib: int = 0
    cpu_traffic_s: float = 0.0
    open_s: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    left_open: int = -1


def _worker(
    url: str, first: int, count: int, tokens_file: str
) -> contextlib.AbstractAsyncContextManager[Process]:
    """A load generator process: its sessions first..first+count-1, driven over stdio."""
    argv = [sys.executable, "-m", "bench.bench_load", "worker", url, str(first), str(count)]
    return launch([*argv, tokens_file], name=f"worker {first}", stdin=True, stdout=True)


async def drive(
    server_pid: int, url: str, tokens_file: str, check: Callable[[], Awaitable[int]]
) -> Phase:
    """Open the sessions over the workers, run the traffic, close, measuring the server."""
    phase = Phase(rss_start_kib=rss_kib(server_pid))
    per_worker = SESSIONS // WORKERS
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(_worker(url, w * per_worker, per_worker, tokens_file))
            for w in range(WORKERS)
        ]
        for worker in workers:
            assert json.loads(await _line(worker, 120))["ready"] == per_worker
        phase.open_s = time.perf_counter() - started
        await asyncio.sleep(1)  # let the allocator settle
        phase.rss_idle_kib = rss_kib(server_pid)
        cpu = cpu_seconds(server_pid)
        for worker in workers:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write(f"go {DURATION}\n".encode())
        samples: list[int] = []
        reports = [asyncio.create_task(_line(w, DURATION + 2 * OP_TIMEOUT)) for w in workers]
        while not all(r.done() for r in reports):
            samples.append(rss_kib(server_pid))
            await asyncio.wait(reports, timeout=0.5)
        phase.cpu_traffic_s = cpu_seconds(server_pid) - cpu
        phase.rss_active_kib = max(samples)
        for report in reports:
            result = json.loads(report.result())
            for kind, values in result["latencies"].items():
                phase.latencies.setdefault(kind, []).extend(values)
            phase.errors += result["errors"]
        for worker in workers:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write(b"close\n")
        for worker in workers:
            assert json.loads(await _line(worker, 60))["closed"]
        phase.left_open = await check()
        phase.rss_closed_kib = rss_kib(server_pid)
    return phase


async def mint_agents(home: Path) -> dict[str, str]:
    """Tokens for every attached agent, straight into the store (as `car-grpc agents add`)."""
    from car_grpc.core.tokens import AgentTokens
    from car_grpc.store import open_store

    store = await open_store(home)
    try:
        tokens = AgentTokens(store.agent_tokens)
        return {
            agent_of(i): await tokens.add(agent_of(i))
            for i in range(SESSIONS)
            if role_of(i) in ("recorder", "chat_agent")
        }
    finally:
        await store.close()


async def sessions_left(home: Path, url: str) -> int:
    """Streaming sessions the server still holds, besides the one asking (server.status)."""
    host = (home / "ai.parslee.car" / "host-token").read_text().strip()
    session = await _open(url, -1, Stats(), {"host_token": host})
    try:
        status = await session.call("server.status", {})
        return int(status["session_count"]) - 1
    finally:
        await session.close()


async def run() -> tuple[Phase, Phase]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        async with car_grpc_serve_ws(home) as (server, url):
            tokens_file = home / "tokens.json"
            daemon = (home / "ai.parslee.car" / "auth-token").read_text().strip()
            tokens_file.write_text(
                json.dumps({"daemon": daemon, "agents": await mint_agents(home)})
            )
            ours = await drive(
                server.proc.pid, url, str(tokens_file), lambda: sessions_left(home, url)
            )

        async def nothing() -> int:
            return 0

        async with echo_serve() as (echo, url):
            bare = await drive(echo.proc.pid, url, "-", nothing)
    return ours, bare


def _ms(values: list[float], q: int) -> float:
    """The q-th percentile in milliseconds."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    started = time.perf_counter()
    ours, bare = asyncio.run(run())
    active = sum(role_of(i) != "idle" for i in range(SESSIONS))
    echo = bare.latencies.get("echo", [])
    e50, e99 = _ms(echo, 50), _ms(echo, 99)
    ops = sum(len(v) for v in ours.latencies.values())
    print(
        f"{SESSIONS} WebSocket sessions ({active} active) over {WORKERS} worker processes, "
        f"{DURATION:g}s of traffic, mean pause {THINK:g}s: {ops} operations "
        f"({ops / DURATION:.0f}/s), protocol errors: {len(ours.errors)}, "
        f"sessions left after close: {ours.left_open}; gateway processes beside the core: "
        f"{GATEWAY_PROCESSES} (CAR_GATEWAY_PROCESSES)"
    )
    print(f"{'operation':12}{'count':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'p50 / echo':>12}{'p99 / echo':>12}")  # fmt: skip
    for kind in ("proposer", "recorder", "chat_host", "echo"):
        values = (bare if kind == "echo" else ours).latencies.get(kind, [])
        if not values:
            continue
        p50, p90, p99 = _ms(values, 50), _ms(values, 90), _ms(values, 99)
        name = {"proposer": "proposal", "recorder": "record", "chat_host": "chat"}.get(kind, kind)
        print(
            f"{name:12}{len(values):8d}{p50:9.2f}{p90:9.2f}{p99:9.2f}{max(values) * 1000:9.2f}"
            f"{p50 / e50:11.1f}x{p99 / e99:11.1f}x"
        )
    idle = (ours.rss_idle_kib - ours.rss_start_kib) / SESSIONS
    busy = (ours.rss_active_kib - ours.rss_start_kib) / SESSIONS
    bare_idle = (bare.rss_idle_kib - bare.rss_start_kib) / SESSIONS
    bare_busy = (bare.rss_active_kib - bare.rss_start_kib) / SESSIONS
    print(f"{'server memory (VmRSS)':28}{'car-grpc':>10}{'bare echo':>11}{'ratio':>8}")
    print(
        f"{'  at start, MiB':28}{ours.rss_start_kib / 1024:10.1f}{bare.rss_start_kib / 1024:11.1f}"
    )
    for name, a, b in (
        ("  per idle session, KiB", idle, bare_idle),
        ("  per active session, KiB", busy, bare_busy),
    ):
        print(f"{name:28}{a:10.1f}{b:11.1f}{a / b:7.1f}x")
    print(f"{'  after close, MiB':28}{ours.rss_closed_kib / 1024:10.1f}")
    print(
        f"server CPU during traffic: {ours.cpu_traffic_s / DURATION:.0%} of a core "
        f"(bare echo {bare.cpu_traffic_s / DURATION:.0%}); opening {SESSIONS} sessions took "
        f"{ours.open_s:.1f}s (bare {bare.open_s:.1f}s); ran in {time.perf_counter() - started:.0f}s"
    )
    worst_p99 = max(_ms(v, 99) for k, v in ours.latencies.items() if v)
    summary.report(
        summary.Figure(
            f"bench_load, {SESSIONS} sessions, mean pause {THINK:g}s",
            f"{ops / DURATION:.0f} ops/s, {len(ours.errors)} errors, p99 {worst_p99:.1f} ms",
            worst_p99 / e99,
            "0 errors, p99 <= 50 ms",
            not ours.errors and worst_p99 <= 50,
        ),
        summary.Figure(
            "memory per idle session",
            f"{idle:.1f} KiB",
            idle / bare_idle,
            "<= 64 KiB",
            idle <= 64,
        ),
    )
    for error in ours.errors[:5]:
        print(f"  error: {error}")
    if ours.errors or ours.left_open != 0:
        raise SystemExit("bench_load: protocol errors or sessions left open")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        url, first, count, tokens_file = sys.argv[2:]
        tokens = None if tokens_file == "-" else json.loads(Path(tokens_file).read_text())
        asyncio.run(worker(url, int(first), int(count), tokens))
    else:
        main()
