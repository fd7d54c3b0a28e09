"""Timestamps along one `runs.record_turns` batch of 256 with a host subscribed: where
the wall time of bench_runs' batch-256 loop goes, step by step.

`car-grpc serve` (gateway in the core's process) runs in a process of its own, as in
bench_runs, with a few of its functions wrapped to note when each step is reached
(CLOCK_MONOTONIC, which both processes share); this process runs bench_runs' agent and
host and notes when it sends each frame, reads its answer and reads the batch's last
event. Prints the median time of each step from the send, over N batches (after a
warm-up). Not part of `python -m bench`; a diagnostic (the wrapping costs a little).

    python -m bench.turn_stamps [N]
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

now = time.monotonic_ns
#: (step, when) in the order reached, in the server process (threads too: list.append).
STAMPS: list[tuple[str, int]] = []
#: Frames (client -> core and back) at least this large are the batch's.
BIG = 20_000


def _stamp(step: str) -> None:
    STAMPS.append((step, now()))


def _wrap(cls: Any, name: str, before: str | None, after: str | None, big: int = -1) -> None:
    """Stamp `before` / `after` a call of cls.name (only when its argument `big`, by
    position, is at least BIG long, if given)."""
    original = getattr(cls, name)

    def counts(args: tuple[Any, ...]) -> bool:
        return big < 0 or len(args[big]) >= BIG

    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            hit = counts(args)
            if hit and before:
                _stamp(before)
            result = await original(*args, **kwargs)
            if hit and after:
                _stamp(after)
            return result

        setattr(cls, name, wrapped_async)
        return

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hit = counts(args)
        if hit and before:
            _stamp(before)
        result = original(*args, **kwargs)
        if hit and after:
            _stamp(after)
        return result

    setattr(cls, name, wrapped)


def _instrument() -> None:
    from car_grpc.core import grpc_service, multiplex, runs
    from car_grpc.gateway import connection
    from car_grpc.gateway import multiplex as gateway_multiplex
    from car_grpc.store.sqlite import database
    from car_grpc.store.sqlite import runs as sqlite_runs

    conn = connection.Connection
    _wrap(conn, "_from_client_at_once", "gw: frame arrives (whole)", None, 1)
    _wrap(conn, "_translate", None, "gw: JSON -> ClientFrame done", 1)
    # The gateway's message up: its records are taken just before call.write.
    take_up = gateway_multiplex._Stream._take_records

    def taken_up(self: Any) -> list[bytes]:
        records = take_up(self)
        if sum(map(len, records)) >= BIG:
            _stamp("gw: message to the core taken for write")
        return records

    gateway_multiplex._Stream._take_records = taken_up  # type: ignore[method-assign]
    _wrap(multiplex.SessionChannel, "push", "core: batch read off the stream", None, 1)
    _wrap(grpc_service.SessionStream, "_take_batch", None, "core: request task started")
    _wrap(runs.Runs, "record_turns", "core: handler starts", "core: handler returns")
    _wrap(sqlite_runs.SqliteRunStore, "append", "core: store write queued", "core: commit seen")
    _wrap(database.SqliteDatabase, "_execute", "store thread: transaction starts", None)
    _wrap(database.SqliteDatabase, "_hand_back", "store thread: committed", None)
    _wrap(runs.LiveRun, "publish", "core: publish starts", "core: publish done (256 queued)")
    try_write = multiplex.SessionChannel.try_write
    # The answer's way out: set when the handler returns, until the gateway writes it.
    answer = {"core": False, "message": False, "gateway": False}

    def tried(self: Any, data: bytes) -> bool:
        written = try_write(self, data)
        if STAMPS and STAMPS[-1][0].startswith("core: handler returns"):
            _stamp("core: answer try_write " + ("ok" if written else "refused"))
            answer["core"] = answer["message"] = True
        return written

    multiplex.SessionChannel.try_write = tried  # type: ignore[method-assign]
    take_down = multiplex.MultiplexedStream._take

    def taken_down(self: Any) -> list[bytes]:
        records = take_down(self)
        if sum(map(len, records)) >= BIG:
            _stamp("core: events' message taken for write")
        if records and answer["message"]:
            answer["message"] = False
            answer["gateway"] = True
            _stamp("core: answer's message taken for write")
        return records

    multiplex.MultiplexedStream._take = taken_down  # type: ignore[method-assign]
    take_part = gateway_multiplex._Stream._take

    def took(self: Any, part: Any, turn_ends: float) -> None:
        size = len(part.batch)
        if size >= BIG:
            _stamp("gw: events' batch read")
        elif 0 < size < 300 and answer["gateway"]:
            _stamp("gw: answer read")
        take_part(self, part, turn_ends)
        if size >= BIG:
            _stamp("gw: events' batch handled by the reader")
        elif 0 < size < 300 and answer["gateway"]:
            answer["gateway"] = False
            _stamp("gw: answer written to the agent (or queued)")

    gateway_multiplex._Stream._take = took  # type: ignore[method-assign]
    send = conn._send

    async def sent(self: Any, messages: list[str | bytes]) -> None:
        await send(self, messages)
        if len(messages) > 1:
            _stamp("gw: events sent by the host's task")

    conn._send = sent  # type: ignore[method-assign]


def serve(argv: list[str]) -> int:
    """The server side: `car-grpc ARGV`, instrumented; the stamps to $TURN_STAMPS_OUT."""
    _instrument()
    from car_grpc import cli

    code = cli.main(argv)
    Path(os.environ["TURN_STAMPS_OUT"]).write_text(json.dumps(STAMPS))
    return code


async def drive(batches: int) -> None:
    from bench.bench_runs import frame, open_client, turn
    from car_grpc.core.tokens import HOST_TOKEN_FILE, AgentTokens
    from car_grpc.store import open_store
    from tests.processes import EPHEMERAL, cli_env, launch

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        out = Path(tmp) / "stamps.json"
        store = await open_store(home)
        token = await AgentTokens(store.agent_tokens).add("bench-agent")
        await store.close()
        argv = [sys.executable, "-m", "bench.turn_stamps", "serve", "serve", *EPHEMERAL]
        env = cli_env(home, TURN_STAMPS_OUT=str(out))
        rows: list[tuple[int, int, int]] = []  # send, answer read, last event read
        async with launch(argv, name="car-grpc serve", env=env) as server:
            _, url = await server.listeners(2, timeout=30)
            host_token = (home / "ai.parslee.car" / HOST_TOKEN_FILE).read_text()
            agent = await open_client(url, {"agent_id": "bench-agent", "token": token})
            watcher = await open_client(url, {"host_token": host_token})
            last_event: dict[int, int] = {}
            run_done = asyncio.Event()  # the run's last batch's events are all in

            async def note_events() -> None:  # the host's reader, noting each batch's end
                async for raw in watcher.ws:
                    message = json.loads(raw)
                    if message.get("method") == "runs.trace.event":
                        cursor = message["params"]["cursor"]
                        if cursor % 256 == 0:
                            last_event[cursor] = now()
                            if cursor == 7 * 256:
                                run_done.set()
                        continue
                    if "id" in message:
                        watcher.answers.pop(message["id"]).set_result(message)

            watcher.reader.cancel()
            watcher.reader = asyncio.create_task(note_events())
            done = 0
            while done < batches + 16:
                run_id = (await agent.call("runs.start", {"intent": "stamps"}))["run_id"]
                await watcher.call("runs.subscribe", {"run_id": run_id})
                for n in range(7):  # 7 x 256 turns: within a run's 2000
                    request_id = agent.next_id()
                    text = frame(run_id, [turn(i) for i in range(256)], request_id)
                    sent = now()
                    answer = await agent.send_frame(text, request_id)
                    assert answer["result"]["ok"], answer
                    rows.append((sent, now(), (n + 1) * 256))
                    done += 1
                # every event of the run before the next: each row's last event is its own
                async with asyncio.timeout(30):
                    await run_done.wait()
                run_done.clear()
                ends = dict(last_event)
                rows[-7:] = [(s, a, ends.pop(c)) for s, a, c in rows[-7:]]
                last_event.clear()
                await agent.call("runs.complete", {"run_id": run_id, "outcome": {"status": "ok"}})
            for client in (agent, watcher):
                await client.ws.close()
                client.reader.cancel()
            assert await server.terminate() == 0, server.log
        stamps = [(step, at) for step, at in json.loads(out.read_text())]
    _report(rows[16:], stamps)


#: Steps after the answer (the fan-out, the answer's way back): counted from the batch's
#: `core: handler returns` to the next batch's, since they may come after the next send.
_LATE = ("events", "host's task", "gw: answer")


def _report(rows: list[tuple[int, int, int]], stamps: list[tuple[str, int]]) -> None:
    """Each step's median time from the send, over the batches: a step's first stamp in
    its batch's window (from its send to the next send; for the steps after the answer,
    from its handler's return to the next batch's)."""
    stamps.sort(key=lambda s: s[1])
    times = [at for _, at in stamps]

    def first(step: str, start: int, end: int) -> int | None:
        for i in range(bisect.bisect_left(times, start), bisect.bisect_left(times, end)):
            if stamps[i][0] == step:
                return stamps[i][1]
        return None

    sends = [r[0] for r in rows] + [2**63]
    returns = [first("core: handler returns", s, e) or s for s, e in itertools.pairwise(sends)]
    returns.append(2**63)
    steps = {step for step, _ in stamps}
    offsets: dict[str, list[float]] = {}
    for k, (sent, answered, last) in enumerate(rows):
        for step in steps:
            late = any(word in step for word in _LATE)
            start, end = (returns[k], returns[k + 1]) if late else (sent, sends[k + 1])
            if (reached := first(step, start, end)) is not None:
                offsets.setdefault(step, []).append((reached - sent) / 1000)
        offsets.setdefault("client: answer read", []).append((answered - sent) / 1000)
        offsets.setdefault("client: the batch's last event read", []).append((last - sent) / 1000)
    medians = {k: statistics.median(v) for k, v in offsets.items()}
    previous = 0.0
    print(f"{len(rows)} batches of 256; median us from the client's send (+ from the step before)")
    for step, at in sorted(medians.items(), key=lambda item: item[1]):
        share = len(offsets[step]) / len(rows)
        partial = f"  [in {share:.0%} of the batches]" if share < 0.9 else ""
        print(f"{at:8.0f} us  (+{at - previous:5.0f})  {step}{partial}")
        previous = at


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(sys.argv[2:]))
    asyncio.run(drive(int(sys.argv[1]) if len(sys.argv) > 1 else 200))


if __name__ == "__main__":
    main()
