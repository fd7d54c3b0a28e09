"""A/B of bench_load's load generator: the workers of several source trees against one server.

    python -m bench.load_gen_ab floor|car ROUNDS TREE...

One server process for the whole run (`floor`: bench_load's bare relay; `car`: `car-grpc
serve` of the tree this runs from), and round after round bench_load's traffic against it
(1,000 sessions, 15 s) driven by the workers (`python -m bench.bench_load worker`) of each
TREE in turn (a directory holding `bench/`, imported first: PYTHONPATH and working
directory; the order reversed every other round). Prints per round and tree: ops/s,
protocol errors, the worst p99, the server's and the load generator's CPU per operation,
the generator's and the machine's CPU in cores; then the generator's CPU per operation,
median and range. Run it from outside any checkout. Not part of `python -m bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from bench import bench_load
from tests.processes import Process, launch


async def run(mode: str, rounds: int, trees: list[str]) -> None:
    bench_load.raise_fd_limit()
    tree = trees[0]

    def worker(
        url: str, first: int, count: int, tokens_file: str
    ) -> contextlib.AbstractAsyncContextManager[Process]:
        argv = [sys.executable, "-m", "bench.bench_load", "worker", url, str(first), str(count)]
        env = {**os.environ, "PYTHONPATH": tree}
        name = f"worker {first}"
        return launch([*argv, tokens_file], name=name, stdin=True, stdout=True, env=env, cwd=tree)

    bench_load._worker = worker  # drive() starts the workers of `tree`
    per_op: dict[str, list[float]] = {t: [] for t in trees}
    async with _server(mode) as (pid, url, target, check):
        for r in range(rounds):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                phase = await bench_load.drive(pid, url, target, check)
                n, t = bench_load._ops(phase), phase.traffic_s
                per_op[tree].append(phase.cpu_workers_s / n * 1e6)
                print(
                    f"round {r} {tree}: ops/s {n / bench_load.DURATION:.0f} errors "
                    f"{len(phase.errors) + abs(phase.left_open)} p99 ms "
                    f"{bench_load._worst_p99(phase):.0f} server us/op "
                    f"{phase.cpu_traffic_s / n * 1e6:.0f} load gen us/op {per_op[tree][-1]:.0f} "
                    f"load gen {phase.cpu_workers_s / t:.2f} machine {phase.cpu_machine_s / t:.2f}",
                    flush=True,
                )
    print(f"\nload generator CPU us per operation against {mode}: median (range)")
    for tree, values in per_op.items():
        print(f"  {tree}: {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")


@contextlib.asynccontextmanager
async def _server(
    mode: str,
) -> AsyncIterator[tuple[int, str, str, Callable[[], Awaitable[int]]]]:
    """The server's pid, its URL, the workers' TOKENS argument and the check after close."""

    async def nothing() -> int:
        return 0

    if mode == "floor":
        async with bench_load.relay_serve() as (relay, url):
            yield relay.proc.pid, url, bench_load.FLOOR, nothing
        return
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        async with bench_load.car_grpc_serve_ws(home) as (server, url):
            tokens_file = home / "tokens.json"
            daemon = (home / "ai.parslee.car" / "auth-token").read_text().strip()
            agents = await bench_load.mint_agents(home)
            tokens_file.write_text(json.dumps({"daemon": daemon, "agents": agents}))
            yield (
                server.proc.pid,
                url,
                str(tokens_file),
                lambda: bench_load.sessions_left(home, url),
            )


def main() -> None:
    mode, rounds, *trees = sys.argv[1:]
    assert mode in ("floor", "car"), mode
    asyncio.run(run(mode, int(rounds), trees))


if __name__ == "__main__":
    main()
