"""runs.record_turns through the WebSocket front end, with a subscriber attached.

`car-grpc serve` (gateway + core, auth on, its own CAR_HOME) runs in its own process. An
agent records batches of 1, 16 and 256 turns, one batch at a time (each acknowledged
only once committed with synchronous=FULL), on runs of up to 2000 turns; a host session
subscribes to every run and must see every turn. Then 16 agents, each on its own
connection and its own run, record batches of 1 at once (one in flight each): what
concurrent durable writes make of the store (group commit). Reported: turns per second,
the p50 latency of one batch, and the server's CPU time per turn (all its threads, from
/proc: on a busy machine it moves far less than the rates do).

Two baselines, measured in the same run:

- `sqlite`: the same batches as raw SQLite inserts with the same durability (WAL,
  synchronous=FULL, one transaction per batch), in this process: the cost of the disk;
- `echo`: the same record_turns frames sent to a bare `websockets` echo server in its own
  process: the cost of the WebSocket round trip.

The floor of the batch of 256 subscribed, in the same run: the same clients (the same
frames, the same code reading the answers and the events) through a bare relay in its own
process (bench_gateway's multiplexed relay: each WebSocket message as opaque bytes over one
grpc.aio stream, each frame back as a WebSocket message) to a bare core process
(`FloorCore`): the frame parsed with orjson, the turns written as the `sqlite` baseline
writes them, the answer, then the 256 events in one gRPC message. Its ratio to raw SQLite
is the summary's floor: a target it misses is out of reach with grpc.aio and this client.

The 16 concurrent recorders are compared with one recorder of batch 1 (target: at least
5x its turns/s) and with raw SQLite committing one turn per transaction, from the same run:
RECORDER_ROUNDS rounds of one recorder then the 16, the ratio the median of the rounds'
(the two sides seconds apart, not minutes: one recorder's rate follows the disk's commit
latency, the 16's the CPU left to them, and each moves with the machine).

    python -m bench bench_runs          (or ./dev bench bench_runs)

For an A/B of the batch of 256 alone: `python -m bench.bench_runs batch256 [ROUNDS [FLAGS]]`
runs it ROUNDS times (3) after a warm-up, subscribed then not, and prints each round's
turns/s, p50 and the server's CPU per turn, with its main thread's (where the event loop
runs) and its gateway processes' beside (FLAGS go to `car-grpc serve`, e.g.
`--gateway-processes 1`).
`python -m bench.bench_runs concurrent [ROUNDS]` runs one recorder of batch 1, then the 16
at once, ROUNDS times (3), with the server's CPU per turn by thread. `python -m
bench.bench_runs paired WINDOWS TREE...` starts a server from each source tree at once
(e.g. an export of main beside this checkout) and gives them the same two loads in
alternated windows: on a shared machine the paired figures say more than runs one after
the other. `python -m bench.bench_runs paired256 WINDOWS ARM...` does the same for the
batch of 256 subscribed (an ARM is a tree, then its serve flags after commas, e.g.
`DIR,--gateway-processes,1`, or `floor`), with each arm's p50 a batch, its turns/s over
raw SQLite's of the same window, and its CPU per turn by process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from bench import summary
from bench.bench_gateway import mux_frame, mux_frames, run_floor_processes
from bench.proc import cpu_seconds, own_cpu_seconds, process_tree
from car_grpc.core.tokens import HOST_TOKEN_FILE, AgentTokens
from car_grpc.store import open_store
from tests.processes import EPHEMERAL, car_grpc_argv, car_grpc_serve, cli_env, launch, log_listening

BATCH_SIZES = (1, 16, 256)
#: Turns recorded per batch size (and per baseline).
TURNS = {1: 2000, 16: 8000, 256: 20480}
MAX_TURNS_PER_RUN = 2000
#: Concurrent recorders of batch 1, and the turns each records (one run each).
RECORDERS = 16
TURNS_PER_RECORDER = 400
#: Rounds of one recorder then the 16 (after the warm-up): the ratio is their median.
RECORDER_ROUNDS = 5


def turn(i: int) -> dict[str, Any]:
    """A typical turn: a prompt, a tool call and its output (about 600 bytes of JSON)."""
    return {
        "prompt": f"step {i}: " + "look at the failing test and decide what to change " * 4,
        "tool": "shell",
        "parameters": {"cmd": f"pytest -q tests/test_{i % 50}.py", "timeout": 60},
        "output": "F." * 60 + f" {i} passed",
        "verifier_verdict": "not_run",
    }


def frame(run_id: str, batch: list[dict[str, Any]], request_id: int) -> str:
    params = {"run_id": run_id, "turns": batch}
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": "runs.record_turns", "params": params}
    )


@dataclass
class Figures:
    turns_per_s: float
    p50_ms: float
    #: The server's CPU time per turn, in microseconds (0: not measured).
    cpu_us: float = 0.0


def figures(turns: int, elapsed: float, latencies: list[float], cpu_s: float = 0.0) -> Figures:
    return Figures(turns / elapsed, statistics.median(latencies) * 1000, cpu_s / turns * 1e6)


# ------------------------------------------------------------------ car-grpc


class Client:
    """One JSON-RPC WebSocket session; answers by id, notifications counted."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = 0
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: Turn events received, cursor gaps seen, and each run's `ended` event.
        self.events = 0
        self.gaps = 0
        self.last_cursor: dict[str, int] = {}
        self.ended: dict[str, asyncio.Event] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message and "method" not in message:
                self.answers.pop(message["id"]).set_result(message)
            elif message.get("method") == "runs.trace.event":
                params = message["params"]
                run_id = params["run_id"]
                if params["record"]["record"] == "ended":
                    self.ended_event(run_id).set()
                    continue
                self.events += 1
                self.gaps += params["cursor"] != self.last_cursor.get(run_id, 0) + 1
                self.last_cursor[run_id] = params["cursor"]

    def ended_event(self, run_id: str) -> asyncio.Event:
        return self.ended.setdefault(run_id, asyncio.Event())

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    async def send_frame(self, text: str, request_id: int) -> dict[str, Any]:
        answer = self.answers[request_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(text)
        result: dict[str, Any] = await answer
        return result

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        request_id = self.next_id()
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        answer = await self.send_frame(json.dumps(request), request_id)
        assert "result" in answer, answer
        return answer["result"]


async def open_client(url: str, auth: dict[str, str]) -> Client:
    ws = await connect(url, ping_interval=None, compression=None, max_size=None)
    client = Client(ws)
    await client.call("session.auth", auth)
    await client.call("server.handshake", {"protocol_version": 3})
    return client


@dataclass
class Delivery:
    events: int
    gaps: int


async def bench_car_grpc(
    batch_size: int, agent: Client, watcher: Client | None, server_pid: int
) -> tuple[Figures, Delivery]:
    total = TURNS[batch_size]
    per_run = MAX_TURNS_PER_RUN // batch_size * batch_size
    latencies: list[float] = []
    events, gaps = (watcher.events, watcher.gaps) if watcher else (0, 0)
    clock = time.perf_counter
    done = 0
    runs = []
    cpu = cpu_seconds(server_pid)
    while done < total:
        run_id = (await agent.call("runs.start", {"intent": f"bench {batch_size}"}))["run_id"]
        runs.append(run_id)
        if watcher is not None:
            await watcher.call("runs.subscribe", {"run_id": run_id})
        for _ in range(min(per_run, total - done) // batch_size):
            batch = [turn(done + i) for i in range(batch_size)]
            request_id = agent.next_id()
            text = frame(run_id, batch, request_id)
            start = clock()
            answer = await agent.send_frame(text, request_id)
            latencies.append(clock() - start)
            assert answer["result"]["ok"], answer
            done += batch_size
        await agent.call("runs.complete", {"run_id": run_id, "outcome": {"status": "ok"}})
    if watcher is not None:
        async with asyncio.timeout(30):  # every run's `ended` reaches the subscriber
            for run_id in runs:
                await watcher.ended_event(run_id).wait()
    cpu = cpu_seconds(server_pid) - cpu
    delivery = Delivery(watcher.events - events, watcher.gaps - gaps) if watcher else Delivery(0, 0)
    return figures(total, sum(latencies), latencies, cpu), delivery


async def bench_concurrent(
    agents: list[Client], watcher: Client, server_pid: int
) -> tuple[Figures, Delivery]:
    """Every agent records TURNS_PER_RECORDER turns in batches of 1 on its own run, all at
    once, one batch in flight each; the watcher is subscribed to every run."""
    events, gaps = watcher.events, watcher.gaps
    run_ids = []
    for agent in agents:
        run_id = (await agent.call("runs.start", {"intent": "bench concurrent"}))["run_id"]
        await watcher.call("runs.subscribe", {"run_id": run_id})
        run_ids.append(run_id)
    latencies: list[float] = []
    clock = time.perf_counter

    async def record(agent: Client, run_id: str) -> None:
        for n in range(TURNS_PER_RECORDER):
            request_id = agent.next_id()
            text = frame(run_id, [turn(n)], request_id)
            start = clock()
            answer = await agent.send_frame(text, request_id)
            latencies.append(clock() - start)
            assert answer["result"]["ok"], answer

    started, cpu = clock(), cpu_seconds(server_pid)
    await asyncio.gather(*(record(a, r) for a, r in zip(agents, run_ids, strict=True)))
    elapsed, cpu = clock() - started, cpu_seconds(server_pid) - cpu
    for agent, run_id in zip(agents, run_ids, strict=True):
        await agent.call("runs.complete", {"run_id": run_id, "outcome": {"status": "ok"}})
    async with asyncio.timeout(30):
        for run_id in run_ids:
            await watcher.ended_event(run_id).wait()
    delivery = Delivery(watcher.events - events, watcher.gaps - gaps)
    return figures(len(agents) * TURNS_PER_RECORDER, elapsed, latencies, cpu), delivery


# ------------------------------------------------------------------ baselines


def open_raw(path: Path) -> sqlite3.Connection:
    """The raw SQLite baseline's database: WAL, synchronous=FULL, one table of turns."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS t(run INTEGER, seq INTEGER, body BLOB,"
        " PRIMARY KEY (run, seq)) WITHOUT ROWID"
    )
    return conn


def insert_raw(conn: sqlite3.Connection, rows: list[tuple[int, int, bytes]]) -> None:
    """A batch of (run, seq, body) rows in one transaction, committed (durable)."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    conn.execute("COMMIT")


def bench_sqlite(batch_size: int, path: Path) -> Figures:
    """The same batches as raw inserts: WAL, synchronous=FULL, one transaction each."""
    conn = open_raw(path)
    total = TURNS[batch_size]
    latencies: list[float] = []
    clock = time.perf_counter
    for n in range(0, total, batch_size):
        rows = [(batch_size, n + i, json.dumps(turn(n + i)).encode()) for i in range(batch_size)]
        start = clock()
        insert_raw(conn, rows)
        latencies.append(clock() - start)
    conn.close()
    return figures(total, sum(latencies), latencies)


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def run_echo_server() -> None:
    """`python -m bench.bench_runs echo`: log the URL, echo until stdin closes."""
    async with serve(
        _echo, "127.0.0.1", 0, ping_interval=None, compression=None, max_size=None
    ) as server:
        log_listening("echo", f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def bench_echo(batch_size: int) -> Figures:
    async with launch([sys.executable, "-m", "bench.bench_runs", "echo"], stdin=True) as echo:
        [url] = await echo.listeners(1)
        async with connect(url, ping_interval=None, compression=None, max_size=None) as ws:
            total = TURNS[batch_size]
            latencies: list[float] = []
            clock = time.perf_counter
            for n in range(0, total, batch_size):
                text = frame("run-x", [turn(n + i) for i in range(batch_size)], n)
                start = clock()
                await ws.send(text)
                await ws.recv()
                latencies.append(clock() - start)
    return figures(total, sum(latencies), latencies)


# ------------------------------------------------------------------ the floor

#: `_recorders_of`'s name for the floor (an arm of `paired256`).
FLOOR = "floor"


@dataclass
class FloorRun:
    run_id: str
    #: `"run_id":"...","agent_id":"..."`, as car-grpc's texts begin.
    ids: bytes
    #: Its key in the raw table (`t.run`), and the turns it has.
    number: int
    turns: int = 0
    #: The connections subscribed to it (the relay's connection ids).
    subscribers: list[int] = field(default_factory=list)


class FloorCore:
    """The floor's bare core: bench_car_grpc's frames read with orjson and answered with
    the texts car-grpc answers (the checks, protobuf and sessions left out). A batch of
    turns is written as the raw SQLite baseline writes it (`insert_raw`: one transaction,
    WAL, synchronous=FULL; each turn's orjson bytes), on the event loop; then the answer,
    then each turn's runs.trace.event for every subscriber, all of them in one gRPC
    message, which the relay writes as one WebSocket message each."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.runs: dict[str, FloorRun] = {}
        self.numbers = itertools.count()
        self.agents: dict[int, str] = {}

    async def serve(self, requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The relay's stream (bench_gateway's multiplexed framing both ways)."""
        while (message := await context.read()) is not grpc.aio.EOF:
            assert isinstance(message, bytes)
            for conn_id, payload in mux_frames(message):
                for out in self.handle(conn_id, orjson.loads(payload)):
                    await context.write(out)

    def handle(self, conn_id: int, request: dict[str, Any]) -> list[bytes]:
        """The gRPC messages that answer `request` of connection `conn_id`, in order."""
        method, params = request["method"], request.get("params", {})
        events = b""
        if method == "runs.record_turns":
            run = self.runs[params["run_id"]]
            result, events = self.record(run, params["turns"])
        elif method == "session.auth":
            self.agents[conn_id] = params.get("agent_id", "")
            result = b'{"ok":true}'
        elif method == "server.handshake":
            result = b'{"protocol_version":3}'
        elif method == "runs.start":
            run_id, agent_id = f"run-{uuid.uuid4().hex}", self.agents[conn_id]
            ids = b'"run_id":"%b","agent_id":"%b"' % (run_id.encode(), agent_id.encode())
            run = self.runs[run_id] = FloorRun(run_id, ids, next(self.numbers))
            result = b"{%b}" % ids
        elif method == "runs.subscribe":
            run = self.runs[params["run_id"]]
            run.subscribers.append(conn_id)
            result = b'{%b,"turns_so_far":[],"cursor":%d,"status":"in_progress"}' % (
                run.ids,
                run.turns,
            )
        elif method == "runs.complete":
            run = self.runs.pop(params["run_id"])
            result = b'{"run_id":"%b","ok":true}' % run.run_id.encode()
            ended = (
                b'{"jsonrpc":"2.0","method":"runs.trace.event","params":{%b,"record":{"record":'
                b'"ended","timestamp":%d,"status":"completed","outcome":{"status":"ok",'
                b'"timestamp":%d}},"cursor":%d,"status":"completed"}}'
            ) % (run.ids, _now(), _now(), run.turns)
            events = b"".join(mux_frame(subscriber, ended) for subscriber in run.subscribers)
        else:
            raise ValueError(method)
        answer = b'{"jsonrpc":"2.0","id":%d,"result":%b}' % (request["id"], result)
        return [mux_frame(conn_id, answer), events] if events else [mux_frame(conn_id, answer)]

    def record(self, run: FloorRun, turns: list[dict[str, Any]]) -> tuple[bytes, bytes]:
        """Store `turns` on `run` (committed): the answer's result and the events."""
        base, bodies = run.turns, [orjson.dumps(t) for t in turns]
        insert_raw(self.db, [(run.number, base + i, body) for i, body in enumerate(bodies)])
        run.turns += len(bodies)
        result = b'{"run_id":"%b","base_index":%d,"count":%d,"ok":true}' % (
            run.run_id.encode(),
            base,
            len(bodies),
        )
        if not run.subscribers:
            return result, b""
        head = (
            b'{"jsonrpc":"2.0","method":"runs.trace.event","params":{%b,"record":{"record":'
            b'"turn","timestamp":%d,"index":'
        ) % (run.ids, _now())
        tail = b'},"cursor":%d,"status":"in_progress"}}'
        texts = [
            b"%b%d,%b" % (head, base + i, body[1:-1]) + tail % (base + i + 1)
            for i, body in enumerate(bodies)
        ]
        return result, b"".join(mux_frame(s, text) for s in run.subscribers for text in texts)


def _now() -> int:
    return time.time_ns() // 1_000_000


async def run_floor() -> None:
    """`python -m bench.bench_runs floor`: the floor's core in this process (gRPC on a free
    port, its database in a temporary directory) and its relay in a process of its own
    (bench_gateway's multiplexed relay over one grpc.aio stream to this core), as `car-grpc
    serve` starts its gateway; logs both addresses, serves until stdin closes."""
    with tempfile.TemporaryDirectory() as tmp:
        core = FloorCore(open_raw(Path(tmp) / "floor.sqlite3"))
        await run_floor_processes("floor", core.serve)


# ------------------------------------------------------------------ report


Row = tuple[int, Figures, Figures, Figures, Figures, Delivery]
#: One round of the recorders: one recorder of batch 1, then the 16 (and what their
#: subscriber saw).
Recorders = tuple[Figures, tuple[Figures, Delivery]]


async def bench_floor(batch_size: int) -> tuple[Figures, Delivery]:
    """`bench_car_grpc` subscribed against the floor (`run_floor`), after a warm-up."""
    async with contextlib.AsyncExitStack() as stack:
        pid, agent, watcher, _ = await _recorders_of(stack, FLOOR, recorders=0)
        await bench_car_grpc(batch_size, agent, watcher, pid)  # warm up
        measured = await bench_car_grpc(batch_size, agent, watcher, pid)
        await _close(agent, watcher)
    return measured


async def run() -> tuple[list[Row], list[Recorders], tuple[Figures, Delivery]]:
    rows = []
    async with contextlib.AsyncExitStack() as stack:
        pid, agent, watcher, recorders = await _recorders_of(stack)
        raw_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for size in BATCH_SIZES:
            await bench_car_grpc(size, agent, watcher, pid)  # warm up
            ours, delivery = await bench_car_grpc(size, agent, watcher, pid)
            alone, _ = await bench_car_grpc(size, agent, None, pid)
            raw = bench_sqlite(size, raw_dir / f"raw-{size}.sqlite3")
            echo = await bench_echo(size)
            rows.append((size, ours, alone, raw, echo, delivery))
        floor = await bench_floor(BATCH_SIZES[-1])  # beside the last size's raw SQLite
        await bench_concurrent(recorders, watcher, pid)  # warm up
        # The 16 against one recorder of batch 1, in turn, round after round: each ratio is
        # of two phases seconds apart (the batch-1 row above was measured minutes before).
        many: list[tuple[Figures, Delivery]] = []
        one: list[Figures] = []
        for _ in range(RECORDER_ROUNDS):
            one.append((await bench_car_grpc(1, agent, watcher, pid))[0])
            many.append(await bench_concurrent(recorders, watcher, pid))
        await _close(agent, watcher, *recorders)
    return rows, list(zip(one, many, strict=True)), floor


def main() -> None:
    started = time.perf_counter()
    rows, rounds, (floor, floor_seen) = asyncio.run(run())
    print(
        f"{'':6}{'car-grpc, subscribed':>21}{'no subscriber':>16}{'sqlite':>16}{'ws echo':>16}"
        f"{'subscribed / baseline':>30}{'subscriber':>17}"
    )
    print(
        f"{'batch':>5} {'turns/s':>11}{'p50 ms':>9}"
        + f"{'turns/s':>9}{'p50 ms':>7}" * 3
        + f"   {'vs sqlite':>9}{'vs echo':>8}{'p50 vs both':>12}   {'events':>7}{'gaps':>5}"
        + f"   {'server CPU us/turn':>19}"
    )
    for size, ours, alone, raw, echo, seen in rows:
        vs_raw = ours.turns_per_s / raw.turns_per_s
        vs_echo = ours.turns_per_s / echo.turns_per_s
        both = raw.p50_ms + echo.p50_ms
        print(
            f"{size:5d} {ours.turns_per_s:11.0f}{ours.p50_ms:9.2f}"
            + "".join(f"{f.turns_per_s:9.0f}{f.p50_ms:7.2f}" for f in (alone, raw, echo))
            + f"   {vs_raw:8.2f}x{vs_echo:7.2f}x{ours.p50_ms / both:11.1f}x"
            f"   {seen.events / TURNS[size]:7.0%}{seen.gaps:5d}"
            f"   {ours.cpu_us:9.0f}{alone.cpu_us:10.0f}"
        )
    _, _, _, raw_one, _, _ = rows[0]
    total = RECORDERS * TURNS_PER_RECORDER
    ratios = [many.turns_per_s / one.turns_per_s for one, (many, _) in rounds]
    # The round of the median ratio (an odd count): its figures are the ones printed.
    one, (concurrent, concurrent_delivery) = rounds[ratios.index(statistics.median(ratios))]
    rate = concurrent.turns_per_s
    size, big, _, raw_big, _, _ = rows[-1]
    print(
        f"floor (bare relay + bare core), batch {size}, subscribed: {floor.turns_per_s:.0f}"
        f" turns/s, p50 {floor.p50_ms:.2f} ms = {floor.turns_per_s / raw_big.turns_per_s:.2f}x"
        f" sqlite ({big.turns_per_s / floor.turns_per_s:.2f}x of it car-grpc's);"
        f" events {floor_seen.events / TURNS[size]:.0%}, gaps {floor_seen.gaps};"
        f" its CPU {floor.cpu_us:.0f} us/turn"
    )
    summary.report(
        summary.at_least(
            f"runs.record_turns, batch {size}, subscribed",
            f"{big.turns_per_s:,.0f} turns/s",
            big.turns_per_s / raw_big.turns_per_s,
            0.3,
            "raw SQLite",
            floor.turns_per_s / raw_big.turns_per_s,
        ),
        summary.at_least(
            f"{RECORDERS} concurrent recorders of batch 1",
            f"{rate:,.0f} turns/s",
            statistics.median(ratios),
            5,
            "one recorder",
        ),
    )
    print(
        f"{RECORDERS} concurrent recorders, batch 1, subscribed: {rate:.0f} turns/s,"
        f" p50 {concurrent.p50_ms:.2f} ms = {rate / one.turns_per_s:.2f}x"
        f" one recorder ({one.turns_per_s:.0f} turns/s; target >= 5x),"
        f" {rate / raw_one.turns_per_s:.2f}x sqlite batch 1"
        f" ({raw_one.turns_per_s:.0f} turns/s); events {concurrent_delivery.events / total:.0%},"
        f" gaps {concurrent_delivery.gaps}; server CPU {concurrent.cpu_us:.0f} us/turn (one"
        f" recorder {one.cpu_us:.0f}); the round of the median ratio of {RECORDER_ROUNDS}"
        f" ({min(ratios):.2f}-{max(ratios):.2f}x; rounds: one recorder then the 16)"
    )
    print(
        "car-grpc: `car-grpc serve` (its default processes), one writer, one batch in"
        " flight; `subscribed`: a host subscribed to every run (events: turn events it got;"
        " gaps: where fan-out fell behind the recorder and dropped; server CPU: subscribed, then"
        " no subscriber). turns/s ratios: higher is better."
        f" Ran in {time.perf_counter() - started:.0f}s."
    )


def main_thread_seconds(pid: int) -> float:
    """User + system CPU seconds of the main thread of process `pid` so far."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def batch256(rounds: int, flags: list[str]) -> None:
    """The batch of 256 alone, `rounds` times each subscribed and not (see the docstring);
    `flags` go to `car-grpc serve` (e.g. --gateway-processes 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        store = await open_store(home)
        token = await AgentTokens(store.agent_tokens).add("bench-agent")
        await store.close()
        async with car_grpc_serve(home, *flags) as server:
            _, url = await server.listeners(2, timeout=30)
            pid = server.proc.pid
            children = process_tree(pid)[1:]  # the gateway processes, if any
            host_token = (home / "ai.parslee.car" / HOST_TOKEN_FILE).read_text()
            agent = await open_client(url, {"agent_id": "bench-agent", "token": token})
            watcher = await open_client(url, {"host_token": host_token})
            await bench_car_grpc(256, agent, watcher, pid)  # warm up
            for subscriber in (watcher, None):
                for _ in range(rounds):
                    main_thread = main_thread_seconds(pid)
                    others = sum(map(own_cpu_seconds, children))
                    ours, seen = await bench_car_grpc(256, agent, subscriber, pid)
                    main_thread = main_thread_seconds(pid) - main_thread
                    others = sum(map(own_cpu_seconds, children)) - others
                    gateways = f", gateway processes {others / TURNS[256] * 1e6:5.1f}"
                    print(
                        f"{'subscribed' if subscriber else 'no subscriber':>13}:"
                        f" {ours.turns_per_s:8,.0f} turns/s, p50 {ours.p50_ms:6.2f} ms,"
                        f" server CPU {ours.cpu_us:5.1f} us/turn"
                        f" (main thread {main_thread / TURNS[256] * 1e6:5.1f}"
                        f"{gateways if children else ''}),"
                        f" events {seen.events}, gaps {seen.gaps}",
                        flush=True,
                    )
            for client in (agent, watcher):
                await client.ws.close()
                client.reader.cancel()


def thread_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of each thread of process `pid`, by thread name
    (threads of one name added up)."""
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            name, rest = (task / "stat").read_text().split("(", 1)[1].rsplit(")", 1)
            fields = rest.split()
            ticks = int(fields[11]) + int(fields[12])
            key = "main" if task.name == str(pid) else name
            seconds[key] = seconds.get(key, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
    return seconds


def _per_turn(before: dict[str, float], after: dict[str, float], turns: int) -> str:
    """Each thread's CPU per turn between two `thread_seconds`, largest first."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    ranked = sorted(spent.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {s / turns * 1e6:.0f}" for name, s in ranked if s > 0)


async def concurrent(rounds: int) -> None:
    """One recorder of batch 1, then RECORDERS at once, `rounds` times (see the docstring):
    each round's turns/s and the server's CPU per turn, by thread."""
    async with contextlib.AsyncExitStack() as stack:
        pid, agent, watcher, recorders = await _recorders_of(stack)
        print(f"server pid {pid}", flush=True)
        await bench_car_grpc(1, agent, watcher, pid)  # warm up
        await bench_concurrent(recorders, watcher, pid)
        for _ in range(rounds):
            threads = thread_seconds(pid)
            one, _ = await bench_car_grpc(1, agent, watcher, pid)
            by_thread = _per_turn(threads, thread_seconds(pid), TURNS[1])
            threads = thread_seconds(pid)
            many, _ = await bench_concurrent(recorders, watcher, pid)
            many_by_thread = _per_turn(threads, thread_seconds(pid), RECORDERS * TURNS_PER_RECORDER)
            print(
                f"one recorder {one.turns_per_s:6,.0f} turns/s, CPU {one.cpu_us:5.0f} us/turn"
                f" ({by_thread}); {RECORDERS} recorders {many.turns_per_s:6,.0f} turns/s"
                f" = {many.turns_per_s / one.turns_per_s:.2f}x, CPU {many.cpu_us:5.0f} us/turn"
                f" ({many_by_thread})",
                flush=True,
            )
        await _close(agent, watcher, *recorders)


async def _recorders_of(
    stack: contextlib.AsyncExitStack, tree: str | None = None, recorders: int = RECORDERS
) -> tuple[int, Client, Client, list[Client]]:
    """A `car-grpc serve` (importing `tree` first, if given: a directory, then its own
    serve flags after commas; or the floor's core and relay, `FLOOR`), with an agent, a host
    and `recorders` recorders connected: (its pid, the agent, the host, the recorders)."""
    home = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "home"
    ids = ["bench-agent", *(f"bench-recorder-{i}" for i in range(recorders))]
    if tree == FLOOR:  # no tokens: the floor checks nothing
        argv = [sys.executable, "-m", "bench.bench_runs", "floor"]
        server = await stack.enter_async_context(launch(argv, name="floor", stdin=True))
        _, url = await server.listeners(2, timeout=60)
        watcher = await open_client(url, {"host_token": FLOOR})
        clients = [await open_client(url, {"agent_id": agent_id}) for agent_id in ids]
        return server.proc.pid, clients[0], watcher, clients[1:]
    store = await open_store(home)
    tokens = AgentTokens(store.agent_tokens)
    secrets = [await tokens.add(agent_id) for agent_id in ids]
    await store.close()
    if tree is None:
        server = await stack.enter_async_context(car_grpc_serve(home))
    else:
        tree, *flags = tree.split(",")
        argv = car_grpc_argv("serve", *EPHEMERAL, *flags)
        server = await stack.enter_async_context(
            launch(argv, env=cli_env(home, PYTHONPATH=tree), cwd=tree)
        )
    _, url = await server.listeners(2, timeout=60)
    host_token = (home / "ai.parslee.car" / HOST_TOKEN_FILE).read_text()
    watcher = await open_client(url, {"host_token": host_token})
    clients = [
        await open_client(url, {"agent_id": agent_id, "token": secret})
        for agent_id, secret in zip(ids, secrets, strict=True)
    ]
    return server.proc.pid, clients[0], watcher, clients[1:]


async def _close(*clients: Client) -> None:
    for client in clients:
        await client.ws.close()
        client.reader.cancel()


async def paired(windows: int, trees: list[str]) -> None:
    """`car-grpc serve` of every tree at once, the same load given to each in turn, window
    after window (the order reversed every other one; the first a warm-up): one recorder
    of batch 1, then RECORDERS at once. Prints for each tree, median (range) over the
    windows: the 16's turns/s over one recorder's of the same window (the summary's ratio),
    both rates, one recorder's p50 and the server's CPU per turn of both; then the paired
    ratios of the 16's CPU and rate."""
    async with contextlib.AsyncExitStack() as stack:
        arms = [await _recorders_of(stack, tree) for tree in trees]
        one: list[list[Figures]] = [[] for _ in arms]
        many: list[list[Figures]] = [[] for _ in arms]
        for window in range(windows + 1):
            order = list(range(len(arms))) if window % 2 else list(range(len(arms)))[::-1]
            for i in order:
                pid, agent, watcher, recorders = arms[i]
                single, _ = await bench_car_grpc(1, agent, watcher, pid)
                concurrent, _ = await bench_concurrent(recorders, watcher, pid)
                if window:
                    one[i].append(single)
                    many[i].append(concurrent)
        for _, agent, watcher, recorders in arms:
            await _close(agent, watcher, *recorders)

    def spread(values: list[float], digits: int = 0) -> str:
        return (
            f"{statistics.median(values):,.{digits}f}"
            f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
        )

    print(
        f"median (range) over {windows} windows: {RECORDERS} recorders / one recorder"
        f" | {RECORDERS} turns/s | one turns/s | one p50 ms | server CPU us/turn: one | {RECORDERS}"
    )
    for tree, a, b in zip(trees, one, many, strict=True):
        ratios = [y.turns_per_s / x.turns_per_s for x, y in zip(a, b, strict=True)]
        print(
            f"  {tree:32} {spread(ratios, 2)}x | {spread([f.turns_per_s for f in b])}"
            f" | {spread([f.turns_per_s for f in a])} | {spread([f.p50_ms for f in a], 3)}"
            f" | {spread([f.cpu_us for f in a])} | {spread([f.cpu_us for f in b])}"
        )
    if len(trees) == 2:
        for what, key in (("CPU us/turn", "cpu_us"), ("turns/s", "turns_per_s")):
            ratios = [
                getattr(y, key) / getattr(x, key) for x, y in zip(many[0], many[1], strict=True)
            ]
            print(
                f"  {RECORDERS} recorders' {what}, paired ratio {trees[1]} / {trees[0]}:"
                f" median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )


async def paired256(windows: int, arms: list[str]) -> None:
    """`car-grpc serve` of every arm at once (a tree, then its serve flags after commas; or
    `floor`), the batch of 256 subscribed given to each in turn, window after window (the
    order reversed every other one; the first a warm-up), and raw SQLite's batch of 256
    once a window. Prints each arm's p50 a batch, its turns/s over raw SQLite's of the same
    window, and its CPU per turn: all its processes, the first (the core) and the others
    (the gateway or relay); median and range over the windows; then the paired p50 ratios."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [await _recorders_of(stack, arm, recorders=0) for arm in arms]
        raw_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        p50: list[list[float]] = [[] for _ in arms]
        vs_raw: list[list[float]] = [[] for _ in arms]
        cpu: list[list[tuple[float, float, float]]] = [[] for _ in arms]
        for window in range(windows + 1):
            order = list(range(len(arms))) if window % 2 else list(range(len(arms)))[::-1]
            raw = bench_sqlite(256, raw_dir / f"raw-{window}.sqlite3")
            for i in order:
                pid, agent, watcher, _ = servers[i]
                core = own_cpu_seconds(pid)
                figures, _ = await bench_car_grpc(256, agent, watcher, pid)
                core = (own_cpu_seconds(pid) - core) / TURNS[256] * 1e6
                if window:
                    p50[i].append(figures.p50_ms)
                    vs_raw[i].append(figures.turns_per_s / raw.turns_per_s)
                    cpu[i].append((figures.cpu_us, core, figures.cpu_us - core))
        for _, agent, watcher, _ in servers:
            await _close(agent, watcher)

    def spread(values: list[float], unit: str = "") -> str:
        return (
            f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"
            if unit else f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        )  # fmt: skip

    print(
        "batch 256 subscribed, median (range) over the windows: p50 ms | turns/s / raw SQLite's"
        " | CPU us/turn: all processes = the first (core) + the others (gateway, relay)"
    )
    for arm, p, r, c in zip(arms, p50, vs_raw, cpu, strict=True):
        every, first, others = ([x[k] for x in c] for k in range(3))
        print(
            f"  {arm:48} {spread(p)} | {spread(r, 'x')}"
            f" | {spread(every)} = {spread(first)} + {spread(others)}"
        )
    for i in range(1, len(arms)):
        ratios = [y / x for x, y in zip(p50[0], p50[i], strict=True)]
        print(
            f"  p50 paired ratio {arms[i]} / {arms[0]}: median"
            f" {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["echo"]:
        asyncio.run(run_echo_server())
    elif sys.argv[1:] == [FLOOR]:
        asyncio.run(run_floor())
    elif sys.argv[1:2] == ["batch256"]:
        asyncio.run(batch256(int(sys.argv[2]) if len(sys.argv) > 2 else 3, sys.argv[3:]))
    elif sys.argv[1:2] == ["paired256"]:
        asyncio.run(paired256(int(sys.argv[2]), sys.argv[3:]))
    elif sys.argv[1:2] == ["paired"]:
        asyncio.run(paired(int(sys.argv[2]), sys.argv[3:]))
    elif sys.argv[1:2] == ["concurrent"]:
        asyncio.run(concurrent(int(sys.argv[2]) if len(sys.argv) > 2 else 3))
    else:
        main()
