"""What an operation of bench_load waits for inside each server process: collector pauses,
callbacks that hold the event loop, and the loop's lag (on CPU or not). Not part of
`python -m bench`.

As a probe: copy this file as `sitecustomize.py` into the root of an exported tree (a
TREE of `bench.load_ab`) and run with TAIL_PROBE=DIR: every Python process of that tree
(the core and its gateway processes) writes DIR/PID.json every 2 s: each collection (its
generation, wall ms, thread-CPU ms, objects collected), each callback that ran 5 ms or
longer, and each time a 5 ms probe timer fired 3 ms or more late (wall ms late, CPU ms of
the loop's thread meanwhile), once serving (after freeze_startup_heap: startup's own
full collections are left out). Costs ~1 us a callback.

    python -m bench.tail_probe report DIR    # a summary per process
    python -m bench.tail_probe sched SECONDS [PREFIX]  # run queue waits of the threads of
        # the processes whose working directory starts with PREFIX (default /tmp/tail)
"""

from __future__ import annotations

import asyncio
import asyncio.events
import gc
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

_clock = time.perf_counter
_state: dict[str, Any] = {"gc": [], "slow": [], "lag": [], "argv": ""}


def _serving() -> bool:
    """freeze_startup_heap has run (it raises the young threshold; get_freeze_count is a
    walk of the frozen heap)."""
    return gc.get_threshold()[0] != 700


def _on_collection(phase: str, info: dict[str, int], started: list[float] = [0.0, 0.0]) -> None:  # noqa: B006
    if phase == "start":
        started[:] = [_clock(), time.thread_time()]
        return
    wall = (_clock() - started[0]) * 1e3
    cpu = (time.thread_time() - started[1]) * 1e3
    serving = _serving()
    _state["gc"].append((time.time(), info["generation"], wall, cpu, info["collected"], serving))


def _install() -> None:
    folder = Path(os.environ["TAIL_PROBE"])
    folder.mkdir(parents=True, exist_ok=True)
    _state["argv"] = f"{os.getcwd()} {' '.join(sys.argv)}"
    gc.callbacks.append(_on_collection)
    run = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        t = _clock()
        run(self)
        if (took := _clock() - t) > 0.005:
            what = repr(self._callback).split(" at 0x")[0][:160]  # type: ignore[attr-defined]
            if _serving():
                _state["slow"].append((time.time(), took * 1e3, what))

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]

    async def lag_probe() -> None:
        while True:
            t, cpu = _clock(), time.thread_time()
            await asyncio.sleep(0.005)
            if (late := _clock() - t - 0.005) > 0.003 and _serving():
                on_cpu = (time.thread_time() - cpu) * 1e3
                _state["lag"].append((time.time(), late * 1e3, on_cpu))

    run_forever = asyncio.BaseEventLoop.run_forever
    probes: list[asyncio.Task[None]] = []

    def probed_run_forever(self: asyncio.BaseEventLoop) -> None:
        probes.append(self.create_task(lag_probe()))
        run_forever(self)

    asyncio.BaseEventLoop.run_forever = probed_run_forever  # type: ignore[method-assign]

    def dump() -> None:
        while True:
            time.sleep(2)
            (folder / f"{os.getpid()}.json").write_text(json.dumps(_state))

    threading.Thread(target=dump, daemon=True).start()


def report(folder: Path) -> None:
    for path in sorted(folder.glob("*.json")):
        s = json.loads(path.read_text())
        print(f"== {path.name}: {s['argv'][:100]}")
        for gen in range(3):
            runs = [g for g in s["gc"] if g[1] == gen and g[5]]
            if runs:
                cpu = sorted(g[3] for g in runs)
                wall = max(g[2] for g in runs)
                print(
                    f"  gen{gen}: {len(runs)} collections, CPU {sum(cpu):.0f} ms"
                    f" (longest {cpu[-1]:.1f}), longest wall {wall:.1f} ms"
                )
        lags = s["lag"]
        for lo, hi in ((3, 10), (10, 20), (20, 50), (50, 1e9)):
            band = [x for x in lags if lo <= x[1] < hi]
            if band:
                wall = sum(x[1] + 5 for x in band)
                cpu = sum(x[2] for x in band)
                print(f"  loop late {lo}-{hi:g} ms: {len(band)}x, on CPU {cpu / wall:.0%}")
        slow = Counter(x[2] for x in s["slow"])
        print(f"  callbacks >= 5 ms: {len(s['slow'])}, {slow.most_common(3)}")


def sched(seconds: float, prefix: str = "/tmp/tail") -> None:
    """CPU, run queue wait (schedstat) and context switches of each thread of the
    processes whose working directory starts with prefix (the probed trees' servers)."""
    first: dict[tuple[str, str, str], tuple[float, ...]] = {}
    last: dict[tuple[str, str, str], tuple[float, ...]] = {}
    end = time.time() + seconds
    while time.time() < end:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if not os.readlink(f"/proc/{pid}/cwd").startswith(prefix):
                    continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    task = f"/proc/{pid}/task/{tid}"
                    cpu, wait, _ = Path(f"{task}/schedstat").read_text().split()
                    status = Path(f"{task}/status").read_text()
                    vol = status.split("\nvoluntary_ctxt_switches:")[1].split()[0]
                    forced = status.split("nonvoluntary_ctxt_switches:")[1].split()[0]
                    key = (pid, tid, Path(f"{task}/comm").read_text().strip())
                    row = (time.time(), int(cpu) / 1e9, int(wait) / 1e9, int(vol), int(forced))
                    first.setdefault(key, row)
                    last[key] = row
            except (OSError, IndexError):
                continue
        time.sleep(0.5)
    for key, a in first.items():
        b = last[key]
        if b[1] - a[1] > 0.05:
            print(
                f"{key}: {b[0] - a[0]:.0f} s, CPU {b[1] - a[1]:.2f} s, run queue wait"
                f" {b[2] - a[2]:.2f} s, switches {b[3] - a[3]:.0f} voluntary,"
                f" {b[4] - a[4]:.0f} forced"
            )


if __name__ == "__main__":
    if sys.argv[1] == "report":
        report(Path(sys.argv[2]))
    else:
        sched(float(sys.argv[2]), *sys.argv[3:])
elif __name__ == "sitecustomize" and os.environ.get("TAIL_PROBE"):
    _install()
