"""A/B of `car-grpc serve` from several source trees at once, in alternated windows.

On a shared machine the load changes from minute to minute, so two benchmark runs one
after the other compare the machine more than the code. Here every tree's server runs at
the same time (each its own `car-grpc serve`, importing its tree first: PYTHONPATH), and
the same load is given to each in turn, window after window (the order reversed every
other window); each window gives the server's CPU per operation (its process tree,
/proc/PID/stat) and its rate. A tree is a directory holding `car_grpc`, e.g. an export of
main (`git archive main | tar -x -C DIR`); `echo`, `relay`, `relay-apart` and `mux` stand
for bench_gateway's bare echo, bare relay (its echo servicer in the relay's process, or in
a process of its own) and bare multiplexed relay.

    python -m bench.ab MODE WINDOWS TREE... [-- SERVE_FLAGS]

A TREE may carry serve flags of its own after commas (`DIR,--gateway-processes,1` beside
`DIR`: one tree in two set-ups).
MODE: `rt1`, `rt16`, `rt64`, ... (that many clients, each one `tools.list` after another,
for AB_SECONDS, default 2), `p50` (one client's `tools.list` round trips as bench_gateway's
latency measures them, AB_ROUND_TRIPS of them a window, default 2,000 after its warm-up: the
p50 of each window, and its ratio to the first arm's window by window), `chat` (one chat
of AB_TOKENS tokens, default 20,000, agent -> host as bench_chats, per window: the
server's CPU per token, and that of its first process (the core) and of the rest
(gateway processes)) or `voice` (AB_CHUNKS PCM
chunks, default 5,000, flooded through one voice session to bench_voice's engine and
spoken back, per window: the CPU of `car-grpc serve` alone per chunk; beside it, that of
its first process (the core) and of the rest (gateway processes), of the engine and of
the client, this process (AB_ENGINE=tree: each arm's engine from its own tree, not
this one's); for `echo` and `mux`, bench_voice's echo and relay of the
binary frames). AB_SPY=DIR: a py-spy profile of each of those processes during each
flood (see `_spy`). Each arm's CPU is also given window by window against the first arm
of its set-up (`paired`: the median and range of the ratios). Not part of
`python -m bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect

from bench import bench_chats, bench_gateway, bench_voice
from bench.proc import cpu_seconds, own_cpu_seconds, process_tree
from tests.processes import EPHEMERAL, car_grpc_argv, cli_env, launch

BARE = ("echo", "relay", "relay-apart", "mux")


@dataclass
class Arm:
    tree: str
    server: bench_gateway.Server
    bridged: bool
    cpu_us: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    #: `voice`: the engine process and its CPU per chunk.
    engine_pid: int = 0
    engine_us: list[float] = field(default_factory=list)
    #: `voice`, `chat`: the server's CPU per chunk (token) split into its first process
    #: (the core, or the whole server in one process) and the rest (gateway processes);
    #: `voice`: this client's.
    core_us: list[float] = field(default_factory=list)
    client_us: list[float] = field(default_factory=list)
    #: `p50`: one client's p50 round trip, each window's (us).
    p50_us: list[float] = field(default_factory=list)


async def _start(
    stack: contextlib.AsyncExitStack, tree: str, flags: Sequence[str], mode: str
) -> Arm:
    if tree in BARE and mode == "voice":
        kind = "relay" if tree == "mux" else tree
        url, [pid] = await stack.enter_async_context(bench_voice.echo_server(kind))
        return Arm(tree, bench_gateway.Server(url, pid), bridged=False)
    if tree in BARE:
        server = await stack.enter_async_context(bench_gateway.echo_server(tree))
        return Arm(tree, server, bridged=False)
    home = stack.enter_context(tempfile.TemporaryDirectory())
    directory, *own = tree.split(",")  # the arm's own flags after commas
    argv = car_grpc_argv("serve", *EPHEMERAL, "--no-auth", *own, *flags)
    env = cli_env(home, PYTHONPATH=directory)
    process = await stack.enter_async_context(launch(argv, env=env, cwd=directory))
    grpc_address, url = await process.listeners(2, timeout=60)
    arm = Arm(tree, bench_gateway.Server(url, process.proc.pid), bridged=True)
    if mode == "voice":  # the same bench engine (this tree's) for every server, or
        # AB_ENGINE=tree: each arm's tree's (an A/B of the bench engine itself)
        engine = [sys.executable, "-m", "bench.bench_voice", "engine", grpc_address]
        if os.environ.get("AB_ENGINE") == "tree":
            launching = launch(engine, stdin=True, env=env, cwd=directory)
        else:
            launching = launch(engine, stdin=True)
        launched = await stack.enter_async_context(launching)
        arm.engine_pid = launched.proc.pid
    return arm


async def _voice(arm: Arm, chunks: int) -> tuple[float, float]:
    """One voice flood of `chunks` chunks (bench_voice.flood): chunks/s and the server's
    CPU per chunk; the engine's goes into `arm.engine_us`."""
    url = arm.server.url
    async with connect(url, ping_interval=None, compression=None, max_size=None) as ws:
        session = await bench_voice.open_session(ws) if arm.bridged else uuid.uuid4()
        engine = cpu_seconds(arm.engine_pid) if arm.engine_pid else 0.0
        core, client = own_cpu_seconds(arm.server.pid), _client_cpu_seconds()
        spies = _spy(arm)
        rate, cpu_us = await bench_voice.flood(ws, session, [arm.server.pid], chunks, arm.tree)
        arm.client_us.append((_client_cpu_seconds() - client) / chunks * 1e6)
        arm.core_us.append((own_cpu_seconds(arm.server.pid) - core) / chunks * 1e6)
        if arm.engine_pid:
            arm.engine_us.append((cpu_seconds(arm.engine_pid) - engine) / chunks * 1e6)
        for spy in spies:
            spy.wait(30)
        return rate, cpu_us


def _client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _spy(arm: Arm) -> list[subprocess.Popen[bytes]]:
    """AB_SPY=DIR: py-spy (`--gil`, raw, AB_SPY_SECONDS, default 5) of each process of the
    server and of the engine from the flood's start, into DIR (one window's worth: the
    profiles of later windows replace it)."""
    folder = os.environ.get("AB_SPY")
    if not folder:
        return []
    seconds = os.environ.get("AB_SPY_SECONDS", "5")
    spy = os.environ.get("AB_SPY_BIN", "/tmp/spy/bin/py-spy")
    pids = [*process_tree(arm.server.pid), *([arm.engine_pid] if arm.engine_pid else [])]
    name = Path(arm.tree.split(",")[0]).name + "-" + "-".join(arm.tree.split(",")[1:])
    argv = [spy, "record", "--gil", "-d", seconds, "-r", "200", "-f", "raw"]
    return [
        subprocess.Popen(
            [*argv, "-p", str(pid), "-o", str(Path(folder) / f"{name}-{i}-{pid}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, pid in enumerate(pids)
    ]


async def _p50(arm: Arm) -> tuple[float, float]:
    """One client's round trips (bench_gateway.latency): round trips/s and the server's
    CPU per round trip (warm-up included); the p50 goes into `arm.p50_us`."""
    cpu, start = cpu_seconds(arm.server.pid), time.perf_counter()
    samples = await bench_gateway.latency(arm.server.url, arm.bridged)
    total = bench_gateway.WARMUP + len(samples)
    arm.p50_us.append(statistics.median(samples) * 1e6)
    rate = total / (time.perf_counter() - start)
    return rate, (cpu_seconds(arm.server.pid) - cpu) / total * 1e6


async def _chat(url: str, n: int, tokens: int) -> float:
    """One chat of `tokens` tokens from the attached agent to a host: tokens/s."""
    async with connect(url, ping_interval=None, compression=None, max_size=None) as ws:
        await bench_chats.host_session(ws)
        return await bench_chats.chat_rate(ws, 9, f"ab-{n}", tokens)


async def run(mode: str, windows: int, trees: Sequence[str], flags: Sequence[str]) -> list[Arm]:
    async with contextlib.AsyncExitStack() as stack:
        arms = [await _start(stack, tree, flags, mode) for tree in trees]
        tokens = int(os.environ.get("AB_TOKENS", "20000"))
        if mode == "chat":
            for arm in arms:  # each server its agent, attached for every window (+1 warm-up)
                argv = [sys.executable, "-m", "bench.bench_chats", "agent", arm.server.url]
                agent = await stack.enter_async_context(
                    launch([*argv, str(windows + 1), str(tokens)], stdin=True, stdout=True)
                )
                assert agent.proc.stdout is not None
                line = await asyncio.wait_for(agent.proc.stdout.readline(), 20)
                assert line.strip() == b"attached", line
        elif mode == "p50":
            bench_gateway.ROUND_TRIPS = int(os.environ.get("AB_ROUND_TRIPS", "2000"))
        elif mode != "voice":
            bench_gateway.THROUGHPUT_SECONDS = float(os.environ.get("AB_SECONDS", "2"))
            clients = int(mode.removeprefix("rt"))
        for window in range(windows + 1):  # the first: warm-up, not counted
            for arm in arms if window % 2 else arms[::-1]:
                if mode == "chat":
                    before, core = cpu_seconds(arm.server.pid), own_cpu_seconds(arm.server.pid)
                    rate = await _chat(arm.server.url, window, tokens)
                    cpu_us = (cpu_seconds(arm.server.pid) - before) / tokens * 1e6
                    if window:
                        core_us = (own_cpu_seconds(arm.server.pid) - core) / tokens * 1e6
                        arm.core_us.append(core_us)
                elif mode == "voice":
                    rate, cpu_us = await _voice(arm, int(os.environ.get("AB_CHUNKS", "5000")))
                elif mode == "p50":
                    rate, cpu_us = await _p50(arm)
                else:
                    rate, _, cpu_us = await bench_gateway.throughput(
                        arm.server, arm.bridged, clients
                    )
                if window:
                    arm.cpu_us.append(cpu_us)
                    arm.rates.append(rate)
                elif mode == "p50":
                    arm.p50_us.pop()
                elif mode == "voice":  # the warm-up's
                    for figures in (arm.engine_us, arm.core_us, arm.client_us):
                        if figures:
                            figures.pop()
        return arms


def main() -> None:
    args = sys.argv[1:]
    flags: list[str] = []
    if "--" in args:
        args, flags = args[: args.index("--")], args[args.index("--") + 1 :]
    mode, windows, trees = args[0], int(args[1]), args[2:]
    arms = asyncio.run(run(mode, windows, trees, flags))
    print(f"{mode} {' '.join(flags)}: server CPU us per operation (median, range) and rate/s")
    for arm in arms:
        cpu, rate = arm.cpu_us, arm.rates
        print(
            f"  {arm.tree:32} {statistics.median(cpu):7.1f} ({min(cpu):.0f}-{max(cpu):.0f})"
            f"  {statistics.median(rate):9,.0f}/s   windows: {' '.join(f'{c:.0f}' for c in cpu)}"
        )
        if arm.core_us and arm.bridged:
            gateway = [whole - core for whole, core in zip(cpu, arm.core_us, strict=True)]
            print(f"  {'  its first process (core)':32} {statistics.median(arm.core_us):7.1f}")
            print(f"  {'  the rest (gateway processes)':32} {statistics.median(gateway):7.1f}")
        if arm.engine_us:
            print(f"  {'  its engine':32} {statistics.median(arm.engine_us):7.1f}")
        if arm.client_us:
            print(f"  {'  the client (this process)':32} {statistics.median(arm.client_us):7.1f}")
        if p50 := arm.p50_us:
            print(
                f"  {'  p50 round trip (us)':32} {statistics.median(p50):7.1f}"
                f" ({min(p50):.0f}-{max(p50):.0f})   windows: {' '.join(f'{p:.0f}' for p in p50)}"
            )
    # Window by window (the load they shared), each arm against the first of its set-up
    # (the same flags after the commas).
    firsts: dict[tuple[str, ...], Arm] = {}
    for arm in arms:
        first = firsts.setdefault(tuple(arm.tree.split(",")[1:]), arm)
        if first is arm:
            continue
        print(f"  paired {arm.tree} / {first.tree}: {_paired(arm.cpu_us, first.cpu_us)}")
        if arm.p50_us and first.p50_us:
            print(f"    p50 {_paired(arm.p50_us, first.p50_us)}")
        if arm.core_us and first.core_us and arm.bridged and first.bridged:
            rest = [[w - c for w, c in zip(a.cpu_us, a.core_us, strict=True)] for a in (arm, first)]
            print(f"    core {_paired(arm.core_us, first.core_us)}, rest {_paired(*rest)}")


def _paired(these: Sequence[float], those: Sequence[float]) -> str:
    """Window-by-window ratios of `these` to `those`: median (range)."""
    ratios = [a / b for a, b in zip(these, those, strict=True) if b > 0]
    if not ratios:  # (nothing to compare: one process, no rest)
        return "-"
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    main()
