"""The embedded store alone (no server): concurrent durable writes and reads against one
SQLite file, with the event loop idle or kept busy, and what they cost on each thread.

W writers (tasks on one event loop) each append batches of 4 turns to a run of their own,
one batch in flight each, for a few seconds; meanwhile a `runs.get` of a run nobody writes
to (another session's) starts every 5 ms.
"Busy" adds a task that keeps the event loop running Python in 0.5 ms slices (yielding
between them), as a saturated server does: each statement the store thread runs gives
the GIL up and must take it back from that loop. Reported per case: writes/s, write
p50/p99, read p50/p99, writes per commit, the CPU per write of the store's threads, the
event loop and the whole process (`/proc/self/task/*/stat`), and how often per write the
store thread went to sleep (waiting for the GIL, mostly: the hand-offs).

Not part of `./dev bench` (it measures one layer, for A/B runs of the store's code):

    .venv/bin/python -m bench.store_alone [SECONDS]
    PYTHONPATH=/tmp/main-export .venv/bin/python -m bench.store_alone   (another tree)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from car_grpc.store import RunRow
from car_grpc.store.sqlite import SqliteStore
from car_grpc.v1 import runs_pb2

BATCH = 4
#: Seconds between two reads.
READ_EVERY = 0.005
WRITERS = (1, 16, 256)
_TICK = os.sysconf("SC_CLK_TCK")


def turn(i: int) -> bytes:
    """A turn record, serialized as the store takes it."""
    record = runs_pb2.RunRecord(record=runs_pb2.RUN_RECORD_KIND_TURN, timestamp=i)
    record.turn.prompt = f"step {i}: " + "look at the failing test and decide " * 12
    return record.SerializeToString()


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, by name (summed per name), and as
    "<name> switches" the times each thread went to sleep (`voluntary_ctxt_switches`:
    a thread that waits for the GIL, a lock or the disk sleeps)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        name = names.get(int(task.name), "other")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                key = f"{name} switches"
                out[key] = out.get(key, 0.0) + int(line.split()[1])
    return out


async def spin(stop: asyncio.Event) -> None:
    while not stop.is_set():
        end = time.perf_counter() + 0.0005
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def case(store: SqliteStore, writers: int, busy: bool, seconds: float, tag: str) -> str:
    run_ids = [f"{tag}-{writers}-{busy}-{i}" for i in range(writers)]
    quiet = f"{tag}-{writers}-{busy}-quiet"
    for run_id in [*run_ids, quiet]:
        row = RunRow(run_id, "bot", "intent", None, 1, None, runs_pb2.RUN_STATUS_IN_PROGRESS, 0, 1)
        await store.runs.create(row, runs_pb2.RunRecord(record=runs_pb2.RUN_RECORD_KIND_STARTED))
    stop = asyncio.Event()
    write_lat: list[float] = []
    read_lat: list[float] = []

    async def write(run_id: str) -> None:
        seq = 1
        while not stop.is_set():
            batch = [turn(seq + i) for i in range(BATCH)]
            t = time.perf_counter()
            await store.runs.append(run_id, seq, batch)
            write_lat.append(time.perf_counter() - t)
            seq += BATCH

    async def read_one() -> None:
        t = time.perf_counter()
        await store.runs.get(quiet)
        read_lat.append(time.perf_counter() - t)

    async def read() -> None:
        # At a fixed pace whatever each takes (the same reads before and after a change).
        reads: list[asyncio.Task[None]] = []
        while not stop.is_set():
            reads.append(asyncio.create_task(read_one()))
            await asyncio.sleep(READ_EVERY)
        await asyncio.gather(*reads)

    db = store.database
    commits, committed = db.commits, db.committed_writes
    cpu0, wall0 = thread_cpu(), time.perf_counter()
    tasks = [asyncio.create_task(write(r)) for r in run_ids] + [asyncio.create_task(read())]
    if busy:
        tasks.append(asyncio.create_task(spin(stop)))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - wall0
    cpu1 = thread_cpu()
    n = len(write_lat)

    def used(name: str) -> float:
        return (cpu1.get(name, 0.0) - cpu0.get(name, 0.0)) / n * 1e6

    total_cpu = sum(v for k, v in cpu1.items() if " " not in k) - sum(
        v for k, v in cpu0.items() if " " not in k
    )
    switches = (cpu1.get("car-store switches", 0) - cpu0.get("car-store switches", 0)) / n
    groups = db.commits - commits
    q = statistics.quantiles
    return (
        f"| {writers} | {'busy' if busy else 'idle'} | {n / wall:,.0f} "
        f"| {q(write_lat, n=100)[49] * 1e3:.2f} / {q(write_lat, n=100)[98] * 1e3:.2f} "
        f"| {q(read_lat, n=100)[49] * 1e3:.2f} / {q(read_lat, n=100)[98] * 1e3:.2f} "
        f"| {(db.committed_writes - committed) / max(groups, 1):.1f} "
        f"| {used('car-store'):.0f} | {used('car-store-read'):.0f} | {used('MainThread'):.0f} "
        f"| {total_cpu / n * 1e6:.0f} | {switches:.1f} |"
    )


async def run(seconds: float, writer_counts: tuple[int, ...], loops: tuple[bool, ...]) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = await SqliteStore.open(Path(root) / "store.sqlite3")
        try:
            print(
                "| writers | loop | writes/s | write p50/p99 ms | read p50/p99 ms "
                "| writes/commit | CPU us/write: store thread | read thread | event loop "
                "| process | store thread sleeps/write |"
            )
            print("|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
            for busy in loops:
                for writers in writer_counts:
                    print(await case(store, writers, busy, seconds, "r"), flush=True)
        finally:
            await store.close()


def main() -> None:
    """Arguments: seconds per case, then optionally which writer counts (e.g. 16,256)
    and loops (idle, busy or both)."""
    writers = tuple(int(w) for w in sys.argv[2].split(",")) if len(sys.argv) > 2 else WRITERS
    loops = {"idle": (False,), "busy": (True,), "both": (False, True)}[
        sys.argv[3] if len(sys.argv) > 3 else "both"
    ]
    asyncio.run(run(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0, writers, loops))


if __name__ == "__main__":
    main()
