"""The embedded store alone (no server): concurrent durable writes and reads against one
SQLite file, with the event loop idle or kept busy, and what they cost on each thread.

W writers (tasks on one event loop) each append batches of 4 turns to a run of their own,
one batch in flight each, for a few seconds; one reader meanwhile does `runs.get` one after
another. "Busy" adds a task that keeps the event loop running Python in 0.5 ms slices
(yielding between them), as a saturated server does: each statement the store thread runs
gives the GIL up and must take it back from that loop. Reported per case: writes/s, write
p50/p99, read p50/p99, writes per commit, and the CPU per write of the store's threads and
of the whole process (`/proc/self/task/*/stat`).

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
WRITERS = (1, 16, 256)
_TICK = os.sysconf("SC_CLK_TCK")


def turn(i: int) -> runs_pb2.RunRecord:
    record = runs_pb2.RunRecord(record=runs_pb2.RUN_RECORD_KIND_TURN, timestamp=i)
    record.turn.prompt = f"step {i}: " + "look at the failing test and decide " * 12
    return record


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, by name (summed per name)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        name = names.get(int(task.name), "other")
        name = "store" if name.startswith("car-store") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


async def spin(stop: asyncio.Event) -> None:
    while not stop.is_set():
        end = time.perf_counter() + 0.0005
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def case(store: SqliteStore, writers: int, busy: bool, seconds: float, tag: str) -> str:
    run_ids = [f"{tag}-{writers}-{busy}-{i}" for i in range(writers)]
    for run_id in run_ids:
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

    async def read() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await store.runs.get(run_ids[0])
            read_lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.001)

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
    store_cpu = cpu1.get("store", 0) - cpu0.get("store", 0)
    total_cpu = sum(cpu1.values()) - sum(cpu0.values())
    groups = db.commits - commits
    q = statistics.quantiles
    return (
        f"| {writers} | {'busy' if busy else 'idle'} | {n / wall:,.0f} "
        f"| {q(write_lat, n=100)[49] * 1e3:.2f} / {q(write_lat, n=100)[98] * 1e3:.2f} "
        f"| {q(read_lat, n=100)[49] * 1e3:.2f} / {q(read_lat, n=100)[98] * 1e3:.2f} "
        f"| {(db.committed_writes - committed) / max(groups, 1):.1f} "
        f"| {store_cpu / n * 1e6:.0f} | {total_cpu / n * 1e6:.0f} |"
    )


async def run(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = await SqliteStore.open(Path(root) / "store.sqlite3")
        try:
            print(
                "| writers | loop | writes/s | write p50/p99 ms | read p50/p99 ms "
                "| writes/commit | store CPU us/write | process CPU us/write |"
            )
            print("|---:|---|---:|---|---|---:|---:|---:|")
            for busy in (False, True):
                for writers in WRITERS:
                    print(await case(store, writers, busy, seconds, "r"), flush=True)
        finally:
            await store.close()


def main() -> None:
    asyncio.run(run(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0))


if __name__ == "__main__":
    main()
