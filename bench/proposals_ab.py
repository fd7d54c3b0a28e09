"""A/B of the core's CPU per proposal, from several source trees at once, in alternated windows.

Each tree's core runs in a process of its own (importing the tree first: PYTHONPATH), and
one client process (bench_proposals' LeanClient, one session on each core) gives each in
turn, window after window (the order reversed every other window), 400 proposals with one
tool callback and 400 pairs of state.gets, alternately. For each window: the core's CPU
per operation (every thread of its process, /proc/PID/task/*/schedstat: nanoseconds, not
the ticks of /proc/PID/stat) and the p50 of each. What it prints per tree: the core's CPU
per proposal above its floor (the two state.gets), median and range over the windows,
and the median ratio of the proposal's p50 to the two state.gets'. The client's own CPU is
not counted (it is the same code for every tree). Not part of `python -m bench`.

    cd /tmp && PYTHONPATH=/path/to/checkout python -m bench.proposals_ab WINDOWS TREE...

A tree is a directory holding `car_grpc`, e.g. an export of main (`git archive main | tar
-x -C DIR`). Run it from outside any checkout: the current directory comes first on
sys.path.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc

from bench.bench_proposals import LeanClient, _lean_connect, _submit
from car_grpc.v1 import state_pb2

PER_WINDOW = 400


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` so far (schedstat's first field: ns on the CPU)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended meanwhile
            pass
    return total / 1e9


#: A core on an ephemeral port, from the tree first on PYTHONPATH: prints its address and
#: daemon token, stops at EOF on stdin. (Run with -c: only `car_grpc` comes from the tree.)
_SERVE = """
import asyncio, sys, tempfile
from pathlib import Path
from car_grpc.config import CoreConfig
from car_grpc.core.server import Core

async def serve():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        core = Core(CoreConfig(state_root=root, token_dir=root / "tokens", grpc_port=0))
        await core.start()
        print(core.grpc_address, core.parts.tokens.daemon, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await core.stop(grace=0)

asyncio.run(serve())
"""


async def _window(client: LeanClient, pid: int, kind: str, results: dict[str, list[float]]) -> None:
    get = state_pb2.GetStateRequest(key="k")
    one = _submit([{"id": "a", "type": "tool_call", "tool": "t"}])
    times = []
    cpu = _cpu_seconds(pid)
    for _ in range(PER_WINDOW):
        start = time.perf_counter()
        if kind == "proposal":
            await client.request("proposal_submit", one)
        else:
            await client.request("state_get", get)
            await client.request("state_get", get)
        times.append(time.perf_counter() - start)
    results[kind].append((_cpu_seconds(pid) - cpu) / PER_WINDOW * 1e6)
    results[kind + " p50"].append(statistics.median(times))


async def run(windows: int, trees: list[str]) -> None:
    procs = []
    try:
        for tree in trees:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _SERVE,
                    env={**os.environ, "PYTHONPATH": tree},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )
        arms = []
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            address, token = line.decode().split()
            channel = grpc.aio.insecure_channel(address)
            arms.append((proc.pid, channel, await _lean_connect(channel, token)))
        results: list[dict[str, list[float]]] = [
            {"proposal": [], "two": [], "proposal p50": [], "two p50": []} for _ in trees
        ]
        for w in range(windows):
            order = list(range(len(arms)))[:: 1 if w % 2 == 0 else -1]
            for i in order:
                pid, _, client = arms[i]
                for kind in ("two", "proposal") if w % 2 == 0 else ("proposal", "two"):
                    await _window(client, pid, kind, results[i])
        for tree, r in zip(trees, results, strict=True):
            above = [p - t for p, t in zip(r["proposal"], r["two"], strict=True)]
            ratios = [p / t for p, t in zip(r["proposal p50"], r["two p50"], strict=True)]
            print(
                f"{tree}: core CPU per proposal {statistics.median(r['proposal']):.0f} us, per "
                f"two state.gets {statistics.median(r['two']):.0f} us; above its floor: median "
                f"{statistics.median(above):.0f} us (windows {min(above):.0f} to "
                f"{max(above):.0f}); p50 proposal / two state.gets {statistics.median(ratios):.2f}"
            )
        for _, channel, client in arms:
            await client.close()
            await channel.close()
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)


def main() -> None:
    windows, trees = int(sys.argv[1]), sys.argv[2:]
    asyncio.run(run(windows, trees))


if __name__ == "__main__":
    main()
