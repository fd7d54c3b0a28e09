"""A/B of proposals with one tool callback, from several source trees at once, in
alternated windows.

Each arm is a tree's server in a process (or processes) of its own, importing the tree first
(PYTHONPATH), and one client of this process on it: one client process gives each arm in
turn, window after window (the order reversed every other window), 400 proposals with one
tool callback and 400 pairs of state.gets, alternately. An arm is either

- `TREE`: the tree's core alone in a process of its own, bench_proposals' LeanClient on it
  over gRPC (SessionService.Connect), or
- `TREE,FLAG,...`: `car-grpc serve FLAG...` of the tree (auth off, no dashboard), e.g.
  `TREE,--gateway-processes,1`, and bench_proposals' LeanWsClient on its gateway (JSON-RPC
  over WebSocket): the path of a WebSocket client of the default server, or
- `floor` (`floor,ws`): bench_proposals' floor (bench/proposal_floor.py, of the tree this
  runs from: a bare core, and the bare relay in a process of its own), with the LeanClient
  on its core (the LeanWsClient on its relay).

For each window: the server's CPU per operation (every thread, /proc/PID/task/*/schedstat:
nanoseconds, not the ticks of /proc/PID/stat), split into its first process (the core) and
the rest (gateway processes), and the p50 of each. What it prints per arm: the CPU per
proposal above its floor (the two state.gets), median and range over the windows, the
p50s and the median ratio of the proposal's p50 to the two state.gets'. The client's own
CPU is not counted (it is the same code for every tree). Not part of `python -m bench`.

    cd /tmp && PYTHONPATH=/path/to/checkout python -m bench.proposals_ab WINDOWS ARM...

A tree is a directory holding `car_grpc`, e.g. an export of main (`git archive main | tar
-x -C DIR`). Run it from outside any checkout: the current directory comes first on
sys.path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from bench.bench_proposals import (
    GET,
    ONE_CALL,
    WS_PROPOSAL,
    WS_STATE_GET,
    _lean_connect,
    _submit,
    lean_ws_connect,
)
from bench.proc import process_tree
from tests.processes import EPHEMERAL, car_grpc_argv, cli_env, launch

#: The arm of bench_proposals' floor (`proposal_floor`): `floor` over gRPC, `floor,ws` through
#: its relay.
FLOOR = "floor"

#: Operations of each kind per window (AB_PER_WINDOW): fewer, in more windows, for a finer
#: alternation on a busy machine.
PER_WINDOW = int(os.environ.get("AB_PER_WINDOW", "400"))


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


@dataclass
class Arm:
    """One tree's server and this process's client on it: `get` is one state.get,
    `proposal` one proposal with one callback; `pid` the server's first process (the
    core, or the whole server in one process) and `gateway` whether it has others."""

    tree: str
    pid: int
    get: Callable[[], Awaitable[object]]
    proposal: Callable[[], Awaitable[object]]
    close: Callable[[], Awaitable[None]]
    results: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def _gateway_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of every process under `pid`, not counting `pid` itself."""
    return sum(_cpu_seconds(child) for child in process_tree(pid)[1:])


async def _window(arm: Arm, kind: str) -> None:
    times = []
    cpu, gateway = _cpu_seconds(arm.pid), _gateway_cpu_seconds(arm.pid)
    for _ in range(PER_WINDOW):
        start = time.perf_counter()
        if kind == "proposal":
            await arm.proposal()
        else:
            await arm.get()
            await arm.get()
        times.append(time.perf_counter() - start)
    arm.results[kind + " times"] += times
    arm.results[kind].append((_cpu_seconds(arm.pid) - cpu) / PER_WINDOW * 1e6)
    arm.results[kind + " gateway"].append(
        (_gateway_cpu_seconds(arm.pid) - gateway) / PER_WINDOW * 1e6
    )
    arm.results[kind + " p50"].append(statistics.median(times) * 1e6)


async def _core_arm(stack: contextlib.AsyncExitStack, tree: str) -> Arm:
    """`tree`'s core alone in a process of its own (_SERVE), a LeanClient on it over gRPC."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVE,
        env={**os.environ, "PYTHONPATH": tree},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )

    async def stop() -> None:
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)

    stack.push_async_callback(stop)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    address, token = line.decode().split()
    return await _grpc_arm(stack, tree, proc.pid, address, token)


async def _grpc_arm(
    stack: contextlib.AsyncExitStack, tree: str, pid: int, address: str, token: str
) -> Arm:
    """A LeanClient with `token` on the server at `address` (whose first process is `pid`)."""
    channel = grpc.aio.insecure_channel(address)
    stack.push_async_callback(channel.close)
    client = await _lean_connect(channel, token)
    one = _submit(ONE_CALL)
    return Arm(
        tree,
        pid,
        lambda: client.request("state_get", GET),
        lambda: client.request("proposal_submit", one),
        client.close,
    )


async def _ws_arm(tree: str, pid: int, url: str) -> Arm:
    """A LeanWsClient on the gateway (or relay) at `url` of the server whose first process
    is `pid`."""
    client = await lean_ws_connect(url)
    return Arm(
        tree,
        pid,
        lambda: client.request(WS_STATE_GET),
        lambda: client.request(WS_PROPOSAL),
        client.close,
    )


async def _floor_arm(stack: contextlib.AsyncExitStack, tree: str) -> Arm:
    """The floor of bench_proposals (`proposal_floor`, from this process's tree: the bare
    core, its relay in a process of its own): a LeanClient on the bare core over gRPC
    (`floor`), or a LeanWsClient through the relay (`floor,ws`)."""
    argv = [sys.executable, "-m", "bench.proposal_floor"]
    process = await stack.enter_async_context(launch(argv, name="floor", stdin=True))
    address, url = await process.listeners(2, timeout=60)
    if tree == FLOOR:
        return await _grpc_arm(stack, tree, process.proc.pid, address, "")
    return await _ws_arm(tree, process.proc.pid, url)


async def _serve_arm(stack: contextlib.AsyncExitStack, tree: str) -> Arm:
    """`car-grpc serve FLAGS` of `tree` (auth off, ephemeral ports), a LeanWsClient on its
    gateway (JSON-RPC over WebSocket)."""
    directory, *flags = tree.split(",")
    home = stack.enter_context(tempfile.TemporaryDirectory())
    argv = car_grpc_argv("serve", *EPHEMERAL, "--no-auth", "--no-dashboard", *flags)
    env = cli_env(home, PYTHONPATH=directory)
    process = await stack.enter_async_context(launch(argv, env=env, cwd=directory))
    _, url = await process.listeners(2, timeout=60)
    return await _ws_arm(tree, process.proc.pid, url)


def _report(arm: Arm) -> None:
    r = arm.results
    above = [p - t for p, t in zip(r["proposal"], r["two"], strict=True)]
    ratios = [p / t for p, t in zip(r["proposal p50"], r["two p50"], strict=True)]
    line = (
        f"{arm.tree}: core CPU per proposal {statistics.median(r['proposal']):.0f} us, per "
        f"two state.gets {statistics.median(r['two']):.0f} us; above its floor: median "
        f"{statistics.median(above):.0f} us (windows {min(above):.0f} to {max(above):.0f})"
    )
    if any(r["proposal gateway"]):
        gateway = [p - t for p, t in zip(r["proposal gateway"], r["two gateway"], strict=True)]
        line += (
            f"; gateway processes per proposal {statistics.median(r['proposal gateway']):.0f} "
            f"us, per two state.gets {statistics.median(r['two gateway']):.0f} us, above: "
            f"{statistics.median(gateway):.0f} us"
        )
    proposal, two = (statistics.median(r[kind + " times"]) * 1e6 for kind in ("proposal", "two"))
    print(
        f"{line}; p50 (every window's operations) proposal {proposal:.0f} us, two state.gets "
        f"{two:.0f} us: {proposal / two:.2f}; median of the windows' ratios "
        f"{statistics.median(ratios):.2f} (windows {min(ratios):.2f} to {max(ratios):.2f})"
    )


async def run(windows: int, trees: list[str]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        arms = []
        for tree in trees:
            if tree.split(",")[0] == FLOOR:
                arm = await _floor_arm(stack, tree)
            else:
                arm = await (_serve_arm if "," in tree else _core_arm)(stack, tree)
            stack.push_async_callback(arm.close)
            arms.append(arm)
        for arm in arms:  # warm-up, not counted
            for _ in range(100):
                await arm.proposal()
                await arm.get()
        for w in range(windows):
            for arm in arms[:: 1 if w % 2 == 0 else -1]:
                for kind in ("two", "proposal") if w % 2 == 0 else ("proposal", "two"):
                    await _window(arm, kind)
        for arm in arms:
            _report(arm)


def main() -> None:
    windows, trees = int(sys.argv[1]), sys.argv[2:]
    asyncio.run(run(windows, trees))


if __name__ == "__main__":
    main()
