"""A bystander's round trips while another client sends huge frames (PROTOCOL.md §1: no
single frame may hold the event loop for more than ~10 ms).

`car-grpc serve` (auth off) runs in its own process, and so do the two clients: the
bystander does one `tools.list` round trip after another (a 2 ms pause between them) for
as long as the attack lasts; the attacker sends its frames one at a time, each after the
answer to the one before. Attacks:

- `text 40MB`: one 40 MB frame of 3.3 million small objects (params of a method the
  server does not have: parsed, then answered -32601);
- `string 40MB`: `state.set` of one 40 MB string;
- `nodes 20MB`: `tools.register` of 400,000 tools whose last one is invalid (parsed,
  converted to protobuf, then answered -32602);
- `batch 1000x40KB`: a batch of 1,000 `tools.register` of one tool with a 38 KB schema of
  small values each (all converted and registered);
- `deep`: a batch of 1,000 `state.set` whose value is nested 400 levels deep (each -32602).

Each attack is sent 3 times. Printed per attack: the bystander's round trips during it,
their p50, p99 and max, and how long the server took for each attack frame. The
baseline, in the same run: the bystander with no attack.

    python -m bench bench_bystander          (or ./dev bench bench_bystander)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from typing import Any

from websockets.asyncio.client import connect

from tests.processes import car_grpc_serve

ROUNDS = 3
PAUSE = 0.002
#: The bystander's round trips with no attack.
QUIET_SECONDS = 3.0
ATTACKS = ("text 40MB", "string 40MB", "nodes 20MB", "batch 1000x40KB", "deep")

JSON = Any


def attack_frame(name: str) -> str:
    """The text of one attack frame."""

    def request(n: int, method: str, params: JSON) -> JSON:
        return {"jsonrpc": "2.0", "id": n, "method": method, "params": params}

    if name == "text 40MB":
        objects = [{"k": i % 10} for i in range(3_300_000)]
        return json.dumps(request(1, "no.such", objects))
    if name == "string 40MB":
        return json.dumps(request(1, "state.set", {"key": "big", "value": "x" * 40_000_000}))
    if name == "nodes 20MB":
        tools: list[JSON] = [{"name": f"t{i}", "parameters": {"a": [1, 2]}} for i in range(400_000)]
        tools.append({"name": 5})
        return json.dumps(request(1, "tools.register", tools))
    if name == "batch 1000x40KB":
        schema = {f"p{i}": [i, "v", True] for i in range(1_400)}
        tool = [{"name": "t", "parameters": schema}]
        return json.dumps([request(n, "tools.register", tool) for n in range(1000)])
    if name == "deep":
        deep: JSON = 1
        for _ in range(400):
            deep = {"a": deep}
        return json.dumps(
            [request(n, "state.set", {"key": "k", "value": deep}) for n in range(1000)]
        )
    raise ValueError(name)


# ------------------------------------------------------------------ the two clients


async def _hello(ws: Any) -> None:
    """One answered request: the message size limit is the full one from then on."""
    await ws.send('{"jsonrpc":"2.0","id":0,"method":"tools.list"}')
    await ws.recv()


async def run_attacker(url: str, name: str) -> None:
    """`python -m bench.bench_bystander attacker URL NAME`: prints the seconds per frame."""
    frame = attack_frame(name)
    async with connect(url, ping_interval=None, max_size=None, compression=None) as ws:
        await _hello(ws)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        seconds = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            await ws.send(frame)
            await ws.recv()
            seconds.append(time.perf_counter() - start)
        print(json.dumps(seconds), flush=True)


async def run_bystander(url: str) -> None:
    """`python -m bench.bench_bystander bystander URL`: round trips until stdin closes;
    prints their durations in seconds."""
    stop = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    samples: list[float] = []
    async with connect(url, ping_interval=None, compression=None) as ws:
        await _hello(ws)
        print("ready", flush=True)
        request = '{"jsonrpc":"2.0","id":1,"method":"tools.list"}'
        while not stop.done():
            start = time.perf_counter()
            await ws.send(request)
            await ws.recv()
            samples.append(time.perf_counter() - start)
            await asyncio.sleep(PAUSE)
    print(json.dumps(samples), flush=True)


# ------------------------------------------------------------------ the coordinator


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_bystander", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    assert line == b"ready\n", line
    return proc


async def _finish(proc: asyncio.subprocess.Process) -> JSON:
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    return json.loads(out)


async def measure(url: str, attack: str | None) -> tuple[list[float], list[float]]:
    """(the bystander's round trips, the attack frames' seconds) during one attack."""
    attacker = await _spawn("attacker", url, attack) if attack else None
    bystander = await _spawn("bystander", url)
    if attacker is None:
        await asyncio.sleep(QUIET_SECONDS)
        frames: list[float] = []
    else:
        assert attacker.stdin is not None
        attacker.stdin.write(b"go\n")
        frames = await _finish(attacker)
    assert bystander.stdin is not None
    bystander.stdin.close()
    return await _finish(bystander), frames


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def report(name: str, rtts: list[float], frames: list[float]) -> None:
    ordered = sorted(rtts)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    frame_s = ", ".join(f"{s:.2f}" for s in frames) or "-"
    print(
        f"  {name:16} {len(rtts):6} {_ms(statistics.median(rtts))} {_ms(p99)} {_ms(ordered[-1])}"
        f"   {frame_s}"
    )


async def run(attacks: tuple[str, ...]) -> None:
    with tempfile.TemporaryDirectory() as home:
        async with car_grpc_serve(home, "--no-auth", "--no-dashboard") as server:
            _, url = await server.listeners(2, timeout=30)
            print("  attack           round trips   p50 ms   p99 ms   max ms   attack frames (s)")
            report("none (baseline)", *await measure(url, None))
            for attack in attacks:
                report(attack, *await measure(url, attack))


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["attacker"]:
        asyncio.run(run_attacker(args[1], args[2]))
    elif args[:1] == ["bystander"]:
        asyncio.run(run_bystander(args[1]))
    else:
        wanted = tuple(a for a in ATTACKS if a in args) or ATTACKS
        asyncio.run(run(wanted))


if __name__ == "__main__":
    main()
