"""Load: SESSIONS concurrent WebSocket sessions with mixed traffic against `car-grpc serve`.

`car-grpc serve` (gateway + core, auth on, its own CAR_HOME) runs in processes of its own
(as many gateway processes as its default gives, or CAR_GATEWAY_PROCESSES; its memory and
CPU are those of all of them); the sessions are spread over WORKERS load-generator
processes. Every session has a role:

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

The floor, in the same run: the same sessions at the same pace, each operation the same
frames in each direction as through car-grpc (a proposal: the request, the server's
`tools.execute`, its answer and the response; a record: the request and its answer; a
chat: the request to the agent, the agent's ack and its CHAT_TOKENS tokens and `done` to
the host), carried by a bare relay process (`relay` mode) over one shared grpc.aio stream
to an echo servicer and back (bench_gateway's multiplexed relay): the WebSocket and gRPC
hops with no JSON, no protobuf and no session. A frame the relay gets back goes to its
sender, or, prefixed `@N `, to session N's connection (the chat's hops between sessions);
the sessions write and read the same JSON frames as against car-grpc. If the floor misses
the target, the target is out of reach on this path on this machine.

The load generator shares the machine with the server, so it is kept cheap: each session
is a connection on websockets' Sans-I/O protocol (`bench/ws_wire.py`, a message handled as
it is parsed), its frames are the bytes `json.dumps` writes for them, assembled from pieces
written once (`_check_frames`), and one watchdog per worker times out operations.

For each run the coordinator also reads the CPU time of the load generator's processes
and of the whole machine (/proc/stat) during the traffic: the load generator shares the
machine with the server, and a figure the server reaches only with cores to spare says so.

    python -m bench bench_load          (or ./dev bench bench_load)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

import orjson
from websockets.asyncio.server import ServerConnection, serve

from bench import summary, ws_wire
from bench.bench_gateway import mux_echo
from bench.proc import cpu_seconds, machine_busy_seconds, own_cpu_seconds, rss_kib
from bench.ws_wire import Wire, WireClosed
from tests.processes import Process, car_grpc_serve, launch, log_listening

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
#: benchmark's own CAR_GATEWAY_PROCESSES (the server is started without CAR_* variables);
#: unset: the server's default.
GATEWAY_PROCESSES = os.environ.get("CAR_GATEWAY_PROCESSES", "").strip()
ROLES = ("proposer",) * 4 + ("recorder",) * 3 + ("chat_host", "chat_agent", "idle")
#: LOAD_ROLES=proposer,chat_host: only these roles operate, the other sessions stay idle
#: (a micro run of one operation's kind, for `load_ab`); unset: every role.
ACTIVE_ROLES = frozenset(os.environ.get("LOAD_ROLES", "").split(",")) - {""} or set(ROLES)

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


#: What the sessions of a run talk to: car-grpc, the bare echo server, or the floor's relay.
CAR, ECHO, FLOOR = "car-grpc", "echo", "floor"


class Session:
    """One WebSocket session of a worker: requests by id; answers, the server's requests and
    chat events dispatched as each message is parsed (`ws_wire`: no reader task).

    Every frame is the JSON text `json.dumps` writes for it (the bytes this benchmark has
    always sent), assembled from pieces written once: the fixed part of each request, a
    turn's JSON by its number (`_turn_json`), the chat events' parts (`_check_frames` says
    they are the same bytes)."""

    def __init__(self, ws: Wire, index: int, stats: Stats, *, mode: str) -> None:
        self.ws = ws
        self.index = index
        self.stats = stats
        self.mode = mode
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[JSON]] = {}
        self._chats: dict[str, asyncio.Future[None]] = {}
        self.run_id = ""
        self.turns = 0
        #: When the operation in flight started (perf_counter), for `_watchdog`; whether it
        #: cancelled it.
        self.op_started: float | None = None
        self.overdue = False
        #: The tail (after the id) of this session's proposal.submit and, at the floor,
        #: of its answer to the echoed tools.execute.
        self._proposal_tail = _tail({"method": "proposal.submit", "params": self._proposal()})
        self._floor_answer_tail = _tail({"result": {"ok": True, "echo": {"n": index}}})
        ws.listen(self._on_message, self._on_lost)

    def _on_message(self, raw: bytes) -> None:
        routed = False
        if self.mode == FLOOR and raw[:1] == b"@":
            routed, raw = True, raw.partition(b" ")[2]  # from another session
        message = orjson.loads(raw)
        # An answer: at the echo server any frame, at the floor any frame not routed
        # from another session (its own frames come back).
        echoed = self.mode == ECHO or (self.mode == FLOOR and not routed)
        if echoed or "method" not in message:
            future = self._waiting.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(message)
        elif "id" in message:
            with contextlib.suppress(ProtocolError):  # lost: _on_lost fails what waits
                self._answer(message)
        elif message["method"] in ("agents.chat.event", "agent.chat.event"):
            params = message["params"]
            waiter = self._chats.get(params["session_id"])
            if params["kind"] == "done" and waiter is not None and not waiter.done():
                waiter.set_result(None)
            elif params["kind"] not in ("token", "done"):
                self.stats.errors.append(f"chat event {params}")

    def _on_lost(self, e: Exception) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ProtocolError(f"connection lost: {e!r}"))

    def _answer(self, request: dict[str, JSON]) -> None:
        method = request["method"]
        if method == "tools.execute":
            echo = json.dumps(request["params"].get("parameters"))
            self._send(f'{{"jsonrpc": "2.0", "id": {json.dumps(request["id"])}, '
                       f'"result": {{"ok": true, "echo": {echo}}}}}')  # fmt: skip
        elif method in ("agent.chat", "agents.chat"):  # the latter: the floor's host
            # The floor routes the agent's frames to its host (session index - 1).
            to = f"@{self.index - 1} " if self.mode == FLOOR else ""
            session_id = json.dumps(request["params"]["session_id"])
            self._send(f'{to}{{"jsonrpc": "2.0", "id": {json.dumps(request["id"])}, '
                       '"result": {"accepted": true}}')  # fmt: skip
            for n in range(CHAT_TOKENS):
                self._send(to + _chat_event(session_id, "token", f'"t{n} "'))
            self._send(to + _chat_event(session_id, "done", "null"))
        else:
            self.stats.errors.append(f"unexpected server request {method}")

    def _send(self, text: str) -> None:
        try:
            self.ws.send_text(text.encode())
        except WireClosed as e:
            raise ProtocolError(f"connection lost: {e!r}") from e

    async def request(self, tail: str, to: str = "") -> JSON:
        """Send the request whose JSON after its id is `tail` (`_tail`) with the next id
        (prefixed `to`); the frame that answers it."""
        request_id = next(self._ids)
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._send(f'{to}{{"jsonrpc": "2.0", "id": {request_id}, {tail}')
        return await future

    async def call(self, method: str, params: JSON, to: str = "", tail: str = "") -> JSON:
        """A request (its tail `tail` if given, else written from `params`); its result, or
        ProtocolError for an error answer."""
        answer = await self.request(tail or _tail({"method": method, "params": params}), to)
        if "error" in answer:
            raise ProtocolError(f"{method}: {answer['error']}")
        return answer["result"] if self.mode == CAR else answer

    async def login(self, credentials: dict[str, str]) -> None:
        await self.call("session.auth", credentials)
        await self.call("server.handshake", {"protocol_version": 3, "client_version": "load"})

    # -------------------------------------------------------------- the operations

    def _proposal(self) -> JSON:
        action = {"id": "a", "type": "tool_call", "tool": "echo", "parameters": {"n": self.index}}
        return {"proposal": {"actions": [action]}}

    async def propose(self) -> None:
        if self.mode == FLOOR:  # the request comes back as the tools.execute, its answer
            await self.call("proposal.submit", None, tail=self._proposal_tail)  # as the
            await self.request(self._floor_answer_tail)  # response
            return
        result = await self.call("proposal.submit", None, tail=self._proposal_tail)
        if result["results"][0]["status"] != "succeeded":
            raise ProtocolError(f"proposal: {result}")

    def _record_tail(self, run_id: str) -> str:
        """The tail of runs.record_turns of the next TURNS_PER_BATCH turns to `run_id`."""
        turns = ", ".join(_turn_json(self.turns + n) for n in range(TURNS_PER_BATCH))
        return (f'"method": "runs.record_turns", "params": {{"run_id": {json.dumps(run_id)}, '
                f'"turns": [{turns}]}}}}')  # fmt: skip

    async def record(self) -> None:
        if self.mode == FLOOR:
            await self.call("runs.record_turns", None, tail=self._record_tail("floor"))
            self.turns += TURNS_PER_BATCH
            return
        if not self.run_id or self.turns + TURNS_PER_BATCH > 2000:
            started = await self.call("runs.start", {"intent": f"load {self.index}"})
            self.run_id, self.turns = started["run_id"], 0
        tail = self._record_tail(self.run_id)
        reply = await self.call("runs.record_turns", None, tail=tail)
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
            # At the floor the request goes to the agent's connection, whose ack answers it.
            to = f"@{self.index + 1} " if self.mode == FLOOR else ""
            accepted = await self.call("agents.chat", params, to)
            if self.mode == FLOOR:
                accepted = accepted["result"]
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
        self._send(f'{{"id": {request_id}, {self._proposal_tail}')
        await future

    async def close(self) -> None:
        await self.ws.close()


def _tail(frame: dict[str, JSON]) -> str:
    """What `json.dumps` writes after `"id": N, ` of a request whose members after its id
    are `frame`'s."""
    return json.dumps(frame)[1:]


#: A turn's JSON by its number: a session writes turns 0.. of each of its runs, so every
#: session of a worker writes the same few thousand.
_turn_json = functools.cache(lambda n: json.dumps(turn(n)))


def _chat_event(session_id_json: str, kind: str, delta_json: str) -> str:
    return ('{"jsonrpc": "2.0", "method": "agent.chat.event", "params": {"session_id": '
            f'{session_id_json}, "kind": "{kind}", "delta": {delta_json}}}}}')  # fmt: skip


def _check_frames() -> None:
    """The frames assembled from pieces are the bytes json.dumps writes for them."""

    def dumps(request_id: int, frame: dict[str, JSON]) -> str:
        return json.dumps({"jsonrpc": "2.0", "id": request_id, **frame})

    session = Session.__new__(Session)
    session.index, session.turns = 7, 40
    turns = [turn(40 + n) for n in range(TURNS_PER_BATCH)]
    record = {"method": "runs.record_turns", "params": {"run_id": "r-1", "turns": turns}}
    proposal = {"method": "proposal.submit", "params": session._proposal()}
    checks = [
        (f'{{"jsonrpc": "2.0", "id": 5, {session._record_tail("r-1")}', dumps(5, record)),
        (f'{{"jsonrpc": "2.0", "id": 5, {_tail(proposal)}', dumps(5, proposal)),
        (f'{{"id": 5, {_tail(proposal)}', json.dumps({"id": 5, **proposal})),
    ]
    for kind, delta in (("token", "t3 "), ("done", None)):
        params = {"session_id": "load-7-2", "kind": kind, "delta": delta}
        expected = json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
        checks.append((_chat_event('"load-7-2"', kind, json.dumps(delta)), expected))
    for assembled, expected in checks:
        assert assembled == expected, (assembled, expected)


# ------------------------------------------------------------------ a worker process


async def _open(
    url: str, index: int, stats: Stats, credentials: dict[str, str] | None, mode: str = CAR
) -> Session:
    """A session, logged in with `credentials` (at the echo server: not logged in; at the
    floor's relay: on the path `/index`, which the relay routes by)."""
    if mode == FLOOR:
        url = f"{url}/{index}"
    ws = await ws_wire.connect(url, timeout=60)
    session = Session(ws, index, stats, mode=mode)
    if credentials is not None:
        await session.login(credentials)
    return session


def _credentials(tokens: dict[str, JSON], index: int) -> dict[str, str]:
    """session.auth params of session `index`: its agent's token, or the daemon token."""
    if role_of(index) in ("recorder", "chat_agent"):
        agent_id = agent_of(index)
        return {"agent_id": agent_id, "token": tokens["agents"][agent_id]}
    return {"token": tokens["daemon"]}


async def _traffic(session: Session, until: float) -> None:
    role = role_of(session.index)
    if role in ("idle", "chat_agent") or role not in ACTIVE_ROLES:
        return  # chat agents answer as their messages arrive
    operation: Callable[[], Awaitable[None]] = {
        "proposer": session.propose,
        "recorder": session.record,
        "chat_host": session.chat,
    }[role]
    kind = role
    if session.mode == ECHO:
        kind, operation = "echo", session.echo
    await asyncio.sleep(random.uniform(0, THINK))  # spread the starts
    while time.monotonic() < until:
        start = session.op_started = time.perf_counter()
        try:
            await operation()
        except ProtocolError as e:
            session.stats.errors.append(f"session {session.index} {role}: {e!r}")
            return
        except asyncio.CancelledError:
            if not session.overdue:
                raise
            session.stats.errors.append(f"session {session.index} {role}: {TimeoutError()!r}")
            return
        session.op_started = None
        session.stats.note(kind, time.perf_counter() - start)
        await asyncio.sleep(random.expovariate(1 / THINK))


async def _watchdog(traffic: dict[Session, asyncio.Task[None]]) -> None:
    """Cancel an operation past OP_TIMEOUT (its session's traffic, which counts it as an
    error): one timer a second for a worker's sessions, rather than one an operation."""
    while True:
        await asyncio.sleep(1)
        now = time.perf_counter()
        for session, task in traffic.items():
            if session.op_started is not None and now - session.op_started > OP_TIMEOUT:
                session.overdue = True
                task.cancel()


async def worker(url: str, first: int, count: int, tokens: dict[str, JSON] | str) -> None:
    """`python -m bench.bench_load worker URL FIRST COUNT TOKENS`: open sessions FIRST ..
    FIRST+COUNT-1 (TOKENS: a JSON file of the daemon and agent tokens, `echo` for the bare
    echo server, `floor` for the floor's relay), then follow the lines of stdin: `go
    SECONDS`, then `close`."""
    _check_frames()
    random.seed(first)
    stats = Stats()
    mode = tokens if isinstance(tokens, str) else CAR
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    def credentials(i: int) -> dict[str, str] | None:
        if isinstance(tokens, str):  # the floor logs in with frames of the same shape
            return {"token": "floor"} if tokens == FLOOR else None
        return _credentials(tokens, i)

    async def one(i: int) -> Session:
        async with gate:
            return await _open(url, i, stats, credentials(i), mode)

    sessions = await asyncio.gather(*(one(i) for i in range(first, first + count)))
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": len(sessions)}), flush=True)
    command = (await loop.run_in_executor(None, sys.stdin.readline)).split()
    assert command[0] == "go", command
    until = time.monotonic() + float(command[1])
    traffic = {s: asyncio.create_task(_traffic(s, until)) for s in sessions}
    watchdog = asyncio.create_task(_watchdog(traffic))
    await asyncio.gather(*traffic.values())
    watchdog.cancel()
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
    chosen = ("--gateway-processes", GATEWAY_PROCESSES) if GATEWAY_PROCESSES else ()
    flags = ("--no-dashboard", *chosen)
    async with car_grpc_serve(home, *flags) as server:
        _, url = await server.listeners(2, timeout=30)
        yield server, url


@contextlib.asynccontextmanager
async def echo_serve() -> AsyncIterator[tuple[Process, str]]:
    async with launch([sys.executable, "-m", "bench.bench_gateway", "echo"], stdin=True) as echo:
        [url] = await echo.listeners(1, timeout=30)
        yield echo, url


async def run_relay_server() -> None:
    """`python -m bench.bench_load relay`: the floor. Session N connects on `/N`; each of its
    frames goes as opaque bytes over one shared grpc.aio stream to the echo servicer
    (bench_gateway's multiplexed relay) and, when it comes back, to session N, or to
    session M if it starts with `@M ` (the relay reads nothing else of it)."""
    connections: dict[int, ServerConnection] = {}

    async def deliver(conn_id: int, payload: bytes) -> None:
        if payload[:1] == b"@":
            conn_id = int(payload[1 : payload.index(b" ")])
        if (ws := connections.get(conn_id)) is not None:
            await ws.send(payload.decode())

    async with mux_echo(1, deliver) as [stream]:

        async def relay(ws: ServerConnection) -> None:
            assert ws.request is not None
            conn_id = int(ws.request.path.strip("/"))
            connections[conn_id] = ws
            try:
                async for message in ws:
                    stream.send(conn_id, message.encode() if isinstance(message, str) else message)
            finally:
                del connections[conn_id]

        async with serve(
            relay, "127.0.0.1", 0, ping_interval=None, compression=None, max_size=None
        ) as server:
            log_listening("load relay", f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.asynccontextmanager
async def relay_serve() -> AsyncIterator[tuple[Process, str]]:
    async with launch([sys.executable, "-m", "bench.bench_load", "relay"], stdin=True) as relay:
        [url] = await relay.listeners(1, timeout=30)
        yield relay, url


@dataclass
class Phase:
    """What one run (car-grpc, the floor or the bare echo) measured."""

    rss_start_kib: int = 0
    rss_idle_kib: int = 0
    rss_active_kib: int = 0
    rss_closed_kib: int = 0
    cpu_traffic_s: float = 0.0
    #: Wall time from `go` to the last worker's report (DURATION and the last operations).
    traffic_s: float = 0.0
    #: CPU seconds of the load generator's processes, and of the whole machine (every
    #: process, /proc/stat), during the traffic.
    cpu_workers_s: float = 0.0
    cpu_machine_s: float = 0.0
    #: CPU seconds of the server's first process alone during the traffic (the core, when
    #: gateway processes run beside it).
    cpu_first_s: float = 0.0
    open_s: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    left_open: int = -1
    #: The gateway processes that ran beside the core, as car-grpc's log says (e.g.
    #: "1 (auto, 2 CPUs)").
    gateway_processes: str = ""


def _worker(
    url: str, first: int, count: int, tokens_file: str
) -> contextlib.AbstractAsyncContextManager[Process]:
    """A load generator process: its sessions first..first+count-1, driven over stdio."""
    argv = [sys.executable, "-m", "bench.bench_load", "worker", url, str(first), str(count)]
    return launch([*argv, tokens_file], name=f"worker {first}", stdin=True, stdout=True)


async def drive(
    server_pid: int,
    url: str,
    tokens_file: str,
    check: Callable[[], Awaitable[int]],
    at_go: Callable[[], object] | None = None,
    at_end: Callable[[], object] | None = None,
) -> Phase:
    """Open the sessions over the workers, run the traffic, close, measuring the server.
    `at_go()` is called as the traffic starts (bench/load_ab.py: a profiler), `at_end()`
    as it ends (before the sessions close)."""
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
        cpu_first = own_cpu_seconds(server_pid)
        cpu_workers = sum(cpu_seconds(w.proc.pid) for w in workers)
        cpu_machine = machine_busy_seconds()
        go = time.perf_counter()
        if at_go is not None:
            at_go()
        for worker in workers:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write(f"go {DURATION}\n".encode())
        samples: list[int] = []
        reports = [asyncio.create_task(_line(w, DURATION + 2 * OP_TIMEOUT)) for w in workers]
        while not all(r.done() for r in reports):
            samples.append(rss_kib(server_pid))
            await asyncio.wait(reports, timeout=0.5)
        phase.cpu_traffic_s = cpu_seconds(server_pid) - cpu
        phase.cpu_first_s = own_cpu_seconds(server_pid) - cpu_first
        phase.traffic_s = time.perf_counter() - go
        phase.cpu_workers_s = sum(cpu_seconds(w.proc.pid) for w in workers) - cpu_workers
        phase.cpu_machine_s = machine_busy_seconds() - cpu_machine
        if at_end is not None:
            at_end()
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


async def run() -> tuple[Phase, Phase, Phase]:
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
            said = await server.next_line("gateway processes: ")
            ours.gateway_processes = said.split("gateway processes: ", 1)[1]

        async def nothing() -> int:
            return 0

        async with relay_serve() as (relay, url):
            floor = await drive(relay.proc.pid, url, FLOOR, nothing)
        async with echo_serve() as (echo, url):
            bare = await drive(echo.proc.pid, url, ECHO, nothing)
    return ours, floor, bare


def _ms(values: list[float], q: int) -> float:
    """The q-th percentile in milliseconds."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def _ops(phase: Phase) -> int:
    return sum(len(v) for v in phase.latencies.values())


def _worst_p99(phase: Phase) -> float:
    return max(_ms(v, 99) for v in phase.latencies.values() if v)


def main() -> None:
    started = time.perf_counter()
    ours, floor, bare = asyncio.run(run())
    active = sum(role_of(i) != "idle" for i in range(SESSIONS))
    echo = bare.latencies.get("echo", [])
    e50, e99 = _ms(echo, 50), _ms(echo, 99)
    ops = _ops(ours)
    print(
        f"{SESSIONS} WebSocket sessions ({active} active) over {WORKERS} worker processes, "
        f"{DURATION:g}s of traffic, mean pause {THINK:g}s: {ops} operations "
        f"({ops / DURATION:.0f}/s), protocol errors: {len(ours.errors)}, "
        f"sessions left after close: {ours.left_open}; gateway processes beside the core: "
        f"{ours.gateway_processes} (CAR_GATEWAY_PROCESSES={GATEWAY_PROCESSES or 'unset'})"
    )
    print(f"{'operation':18}{'count':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'p50 / echo':>12}{'p99 / echo':>12}")  # fmt: skip
    rows = [(kind, ours, "") for kind in ("proposer", "recorder", "chat_host")]
    rows += [(kind, floor, " (floor)") for kind in ("proposer", "recorder", "chat_host")]
    for kind, phase, suffix in [*rows, ("echo", bare, "")]:
        values = phase.latencies.get(kind, [])
        if not values:
            continue
        p50, p90, p99 = _ms(values, 50), _ms(values, 90), _ms(values, 99)
        name = {"proposer": "proposal", "recorder": "record", "chat_host": "chat"}.get(kind, kind)
        print(
            f"{name + suffix:18}{len(values):8d}{p50:9.2f}{p90:9.2f}{p99:9.2f}"
            f"{max(values) * 1000:9.2f}{p50 / e50:11.1f}x{p99 / e99:11.1f}x"
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
    cores = os.cpu_count() or 1
    print(
        "during the traffic (CPU in cores: CPU seconds per second of traffic):\n"
        f"{'':22}{'ops/s':>8}{'errors':>8}{'p99 ms':>9}{'server':>8}{'us/op':>8}"
        f"{'load gen':>10}{'us/op':>8}{'machine':>9}  (of {cores} cores)"
    )  # fmt: skip
    for name, phase in (("car-grpc", ours), ("floor (bare relay)", floor), ("bare echo", bare)):
        n = _ops(phase)
        print(
            f"{name:22}{n / DURATION:8.0f}{len(phase.errors):8d}{_worst_p99(phase):9.1f}"
            f"{phase.cpu_traffic_s / phase.traffic_s:8.2f}{phase.cpu_traffic_s / n * 1e6:8.0f}"
            f"{phase.cpu_workers_s / phase.traffic_s:10.2f}{phase.cpu_workers_s / n * 1e6:8.0f}"
            f"{phase.cpu_machine_s / phase.traffic_s:9.2f}"
        )
    print(
        f"opening {SESSIONS} sessions took {ours.open_s:.1f}s (floor {floor.open_s:.1f}s, "
        f"bare {bare.open_s:.1f}s); ran in {time.perf_counter() - started:.0f}s"
    )
    worst_p99, floor_p99 = _worst_p99(ours), _worst_p99(floor)
    summary.report(
        summary.Figure(
            f"bench_load, {SESSIONS} sessions, mean pause {THINK:g}s",
            f"{ops / DURATION:.0f} ops/s, {len(ours.errors)} errors, p99 {worst_p99:.1f} ms",
            worst_p99 / e99,
            "0 errors, p99 <= 50 ms",
            not ours.errors and worst_p99 <= 50,
            floor_p99 / e99,
            not floor.errors and floor_p99 <= 50,
        ),
        summary.Figure(
            f"  its floor (bare relay): {_ops(floor) / DURATION:.0f} ops/s, p99",
            f"{floor_p99:.1f} ms",
            floor_p99 / e99,
        ),
        summary.Figure(
            "memory per idle session",
            f"{idle:.1f} KiB",
            idle / bare_idle,
            "<= 64 KiB",
            idle <= 64,
        ),
    )
    for error in [*ours.errors[:5], *floor.errors[:5]]:
        print(f"  error: {error}")
    if ours.errors or floor.errors or ours.left_open != 0:
        raise SystemExit("bench_load: protocol errors or sessions left open")


if __name__ == "__main__":
    if sys.argv[1:] == ["relay"]:
        asyncio.run(run_relay_server())
    elif len(sys.argv) == 6 and sys.argv[1] == "worker":
        url, first, count, tokens_file = sys.argv[2:]
        tokens: dict[str, JSON] | str = tokens_file
        if tokens_file not in (ECHO, FLOOR):
            tokens = json.loads(Path(tokens_file).read_text())
        asyncio.run(worker(url, int(first), int(count), tokens))
    else:
        main()
