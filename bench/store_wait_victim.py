"""What the store's wait for a group (GroupLimits.window, branch `rec8`) costs a writer
that another client makes wait: a lone writer (one write after another) while another
client's WRITERS (sessions) each write BURST writes at once, then pause, again and
again: writer n (from 0) pauses PAUSE * (n + 1) / WRITERS ms. Bursts (1 256 5): after a
burst's group the store expects as many writes again, and the lone writer's write is held
(up to 4 windows) for company that does not come. Paced writers (4 1 3.6): answered
together, they come back 0.9 ms apart, each within a window of the one before, so every
wait is met, and is as long as it can be (3.6 of the 4 ms): the worst this store's wait
lets one client do to the others' writes. Each round measures the lone writer's write
latency with the window at 0 (no wait) and at its default, one after the other (the order
reversed every other round), on the same machine: p50, p90, p99 and max of each, and the
default's p50 and p90 over window 0's, round by round.

Not part of `./dev bench` (a bound of one layer, for the review of rec8):

    .venv/bin/python -m bench.store_wait_victim [ROUNDS] [WRITERS BURST PAUSE_MS]
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from car_grpc.store.sqlite.database import GroupLimits, SqliteDatabase

#: The lone writer's writes a round, for each window.
WRITES = 400


def _insert(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO t VALUES (1)")


async def _lone_writer(window: float, writers: int, burst: int, pause: float) -> list[float]:
    """The lone writer's write latencies (ms, sorted) beside the other client's."""
    with tempfile.TemporaryDirectory() as home:
        db = await SqliteDatabase.open(Path(home) / "store.sqlite3", GroupLimits(window=window))
        await db.write(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
        done = asyncio.Event()

        async def bursts(n: int) -> None:
            while not done.is_set():
                await asyncio.gather(*(db.write(_insert) for _ in range(burst)))
                await asyncio.sleep(pause * (n + 1) / writers)

        others = [asyncio.create_task(bursts(n)) for n in range(writers)]
        latencies = []
        try:
            for _ in range(WRITES):
                start = time.perf_counter()
                await db.write(_insert)
                latencies.append((time.perf_counter() - start) * 1000)
        finally:
            done.set()
            await asyncio.gather(*others)
            await db.close()
    return sorted(latencies)


def _quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * q))]


async def _run(rounds: int, writers: int, burst: int, pause_ms: float) -> None:
    default = GroupLimits().window
    ratios: dict[str, list[float]] = {"p50": [], "p90": []}
    for n in range(rounds):
        windows = (0.0, default) if n % 2 == 0 else (default, 0.0)
        got = {w: await _lone_writer(w, writers, burst, pause_ms / 1000) for w in windows}
        for w in (0.0, default):
            ms = got[w]
            print(
                f"round {n}, window {w * 1000:g} ms: lone writer p50 {_quantile(ms, 0.5):.2f}"
                f" p90 {_quantile(ms, 0.9):.2f} p99 {_quantile(ms, 0.99):.2f}"
                f" max {ms[-1]:.2f} ms"
            )
        for name, q in (("p50", 0.5), ("p90", 0.9)):
            ratios[name].append(_quantile(got[default], q) / _quantile(got[0.0], q))
    for name, values in ratios.items():
        print(
            f"lone writer {name}, window {default * 1000:g} ms over 0: median"
            f" {statistics.median(values):.2f}x, rounds {min(values):.2f}-{max(values):.2f}x"
        )


def main() -> None:
    args = [float(a) for a in sys.argv[1:]]
    rounds, writers, burst, pause_ms = (args + [6, 1, 256, 5][len(args) :])[:4]
    print(
        f"{int(rounds)} rounds; the other client: {int(writers)} writers, each {int(burst)}"
        f" writes at once, then a pause of {pause_ms:g} ms"
    )
    asyncio.run(_run(int(rounds), int(writers), int(burst), pause_ms))


if __name__ == "__main__":
    main()
