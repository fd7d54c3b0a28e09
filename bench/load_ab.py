"""A/B of bench_load's car-grpc phase for several source trees, alternated round by round.

    python -m bench.load_ab ROUNDS TREE[,FLAG...]... [-- SERVE_FLAGS]

Each round runs bench_load's car-grpc phase (1,000 sessions, 15 s of traffic, auth on)
against a fresh `car-grpc serve --no-dashboard SERVE_FLAGS` of each TREE in turn (the order
reversed every other round; a TREE is a directory holding `car_grpc`, imported first:
PYTHONPATH, and the server's working directory; flags after commas are that arm's own,
e.g. `DIR,--gateway-processes,1` beside `DIR`), and prints, per round and tree: ops/s,
protocol errors, the worst p99 and each kind's, the server's CPU in cores and per operation,
split into its first process (the core) and the rest (gateway processes, with
`--gateway-processes N`), and the load generator's and the machine's CPU in cores; then the
context switches per operation over the traffic (/proc/PID/task/TID/status) of the core's
process and of the rest: voluntary (`vcs`, a thread went to sleep: a wakeup) and forced
(`ics`, preempted), of all their threads and of the threads beside the event loop alone
(`thr`: gRPC's, the store's) and of gRPC's EventEngine threads alone (`ee`), and the
CPU per operation of each of these three kinds of thread (`loop`, `ee`, `thr`; the rest of
the core's `thr` beyond the gateway's is mostly its store threads). Run it
from outside any checkout (the current directory comes first on sys.path).
LOAD_AB_SPY=DIR: a py-spy profile (`--gil`, raw) of each core during its traffic, into
DIR, and of each gateway process (`NAME-gwN.txt`) (LOAD_AB_SPY_BIN: py-spy's path,
default /tmp/spy/bin/py-spy). Not part of `python -m bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import bench_load
from bench.proc import process_tree
from tests.processes import EPHEMERAL, car_grpc_argv, cli_env, launch


def _spy(pid: int, name: str) -> subprocess.Popen[bytes] | None:
    folder = os.environ.get("LOAD_AB_SPY")
    if not folder:
        return None
    spy = os.environ.get("LOAD_AB_SPY_BIN", "/tmp/spy/bin/py-spy")
    argv = [spy, "record", "--gil", "-p", str(pid), "-d", "12", "-r", "200", "-f", "raw"]
    return subprocess.Popen(
        [*argv, "-o", str(Path(folder) / f"{name}.txt")], stdout=subprocess.DEVNULL
    )


#: The three kinds of thread of a server process, for its CPU: the event loop (its main
#: thread), gRPC's EventEngine threads, and the others (grpc.aio's completion-queue
#: poller; in the core also the store's writer and reader).
_THREADS = ("loop", "ee", "thr")
_TICK = os.sysconf("SC_CLK_TCK")


def _thread_counts(pid: int) -> dict[str, int]:
    """Voluntary and forced context switches so far of `pid` (`core`) and its descendants
    (`gw`), of all their threads, of the threads other than each process's main one and of
    gRPC's EventEngine threads; and the CPU clock ticks so far of each kind of thread
    (_THREADS)."""
    counts = dict.fromkeys(
        (f"{who} {kind}" for who in ("core", "gw") for kind in ("vcs", "ics", "thr vcs", "ee vcs")),
        0,
    )
    counts.update(
        dict.fromkeys((f"{who} {kind} cpu" for who in ("core", "gw") for kind in _THREADS), 0)
    )
    for process in process_tree(pid):
        who = "core" if process == pid else "gw"
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    task = Path(f"/proc/{process}/task/{tid}")
                    status = (task / "status").read_text()
                    vcs = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
                    ics = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
                    stat = (task / "stat").read_text()
                    ticks = sum(map(int, stat[stat.rindex(")") + 2 :].split()[11:13]))
                    counts[f"{who} vcs"] += vcs
                    counts[f"{who} ics"] += ics
                    ee = (task / "comm").read_text().startswith("event_en")
                    kind = "loop" if int(tid) == process else "ee" if ee else "thr"
                    counts[f"{who} {kind} cpu"] += ticks
                    if kind != "loop":
                        counts[f"{who} thr vcs"] += vcs
                    if ee:
                        counts[f"{who} ee vcs"] += vcs
    return counts


async def one(arm: str, flags: Sequence[str], name: str) -> tuple[bench_load.Phase, dict[str, int]]:
    tree, *own = arm.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        argv = car_grpc_argv("serve", *EPHEMERAL, "--no-dashboard", *own, *flags)
        env = cli_env(home, PYTHONPATH=tree)
        async with launch(argv, env=env, cwd=tree) as server:
            _, url = await server.listeners(2, timeout=60)
            tokens_file = home / "tokens.json"
            daemon = (home / "ai.parslee.car" / "auth-token").read_text().strip()
            agents = await bench_load.mint_agents(home)
            tokens_file.write_text(json.dumps({"daemon": daemon, "agents": agents}))
            spies: list[subprocess.Popen[bytes]] = []

            counts: list[dict[str, int]] = []

            def at_go() -> None:
                pid = server.proc.pid
                counts.append(_thread_counts(pid))
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                for n, each in enumerate([pid, *map(int, children)]):
                    if (spy := _spy(each, name if n == 0 else f"{name}-gw{n}")) is not None:
                        spies.append(spy)

            phase = await bench_load.drive(
                server.proc.pid,
                url,
                str(tokens_file),
                lambda: bench_load.sessions_left(home, url),
                at_go,
                lambda: counts.append(_thread_counts(server.proc.pid)),
            )
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
            return phase, {k: counts[1][k] - counts[0][k] for k in counts[0]}


def _row(phase: bench_load.Phase, counts: dict[str, int]) -> dict[str, float]:
    n = bench_load._ops(phase)
    t = phase.traffic_s
    return {
        "ops/s": n / bench_load.DURATION,
        "errors": len(phase.errors) + abs(phase.left_open),
        "p99 ms": bench_load._worst_p99(phase),
        # Each kind's own (the worst of them is the target's figure).
        **{
            f"p99 {kind}": bench_load._ms(v, 99) for kind, v in sorted(phase.latencies.items()) if v
        },
        "server cores": phase.cpu_traffic_s / t,
        "us/op": phase.cpu_traffic_s / n * 1e6,
        "core us/op": phase.cpu_first_s / n * 1e6,
        "rest us/op": (phase.cpu_traffic_s - phase.cpu_first_s) / n * 1e6,
        "core cores": phase.cpu_first_s / t,
        "load gen": phase.cpu_workers_s / t,
        "load gen us/op": phase.cpu_workers_s / n * 1e6,
        "machine": phase.cpu_machine_s / t,
        # CPU per operation of each kind of thread (_THREADS): us; switches: per operation.
        **{
            f"{k} us/op" if k.endswith(" cpu") else f"{k}/op": (
                v / _TICK / n * 1e6 if k.endswith(" cpu") else v / n
            )
            for k, v in counts.items()
        },
    }


_FORMAT = {"ops/s": "{:.0f}", "errors": "{:.0f}", "p99 ms": "{:.0f}", "us/op": "{:.0f}",
           "core us/op": "{:.0f}", "rest us/op": "{:.0f}", "load gen us/op": "{:.0f}"}  # fmt: skip


def _cell(key: str, value: float) -> str:
    whole = key.startswith("p99") or key.endswith("us/op")
    return _FORMAT.get(key, "{:.0f}" if whole else "{:.2f}").format(value)


async def run(rounds: int, trees: Sequence[str], flags: Sequence[str]) -> None:
    bench_load.raise_fd_limit()
    rows: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    keys: list[str] | None = None
    for r in range(rounds):
        for i, tree in enumerate(trees if r % 2 == 0 else trees[::-1]):
            row = _row(*await one(tree, flags, f"r{r}-{i}"))
            rows[tree].append(row)
            keys = list(row)
            cells = " ".join(f"{k} {_cell(k, v)}" for k, v in row.items())
            print(f"round {r} {tree}: {cells}", flush=True)
    assert keys is not None
    print(f"\nbench_load car-grpc phase, flags {' '.join(flags) or '(none)'}: median (range)")
    for tree, tree_rows in rows.items():
        print(f"  {tree}")
        for k in keys:
            values = [row[k] for row in tree_rows if k in row]
            if not values:
                continue
            print(
                f"    {k:14} {_cell(k, statistics.median(values)):>8}"
                f"  ({_cell(k, min(values))}-{_cell(k, max(values))})"
            )


def main() -> None:
    args = sys.argv[1:]
    flags: list[str] = []
    if "--" in args:
        args, flags = args[: args.index("--")], args[args.index("--") + 1 :]
    asyncio.run(run(int(args[0]), args[1:], flags))


if __name__ == "__main__":
    main()
