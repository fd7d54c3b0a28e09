"""Timestamps along one client's `tools.list` round trip through `car-grpc serve` as it
starts by default (the gateway in a process of its own): where bench_gateway's one-client
p50 goes, hop by hop, in both server processes.

The server's two processes import this module first (a `sitecustomize` on their
PYTHONPATH, with RT_STAMPS_DIR set), which wraps a few of their functions to note when
each step is reached (CLOCK_MONOTONIC, which all processes share) and writes the notes
to RT_STAMPS_DIR every half second. This process is the client: after a warm-up, N round
trips one after another, each timed. Prints the median time of each step from the
client's send (and from the step before), over the round trips. Not part of
`python -m bench`; a diagnostic (the wrapping costs a little).

    python -m bench.rt_stamps [N]        (N round trips, default 3000)
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

now = time.monotonic_ns
#: The tree this module is in (the servers import it, and theirs from it).
CHECKOUT = str(Path(__file__).resolve().parent.parent)
#: (step, when) in the order reached, in this server process.
STAMPS: list[tuple[str, int]] = []
#: The steps, as (module, class, function, step): stamped as the function is called.
STEPS = (
    ("car_grpc.gateway.connection", "TrackedConnection", "data_received", "gw: WS bytes read"),
    ("car_grpc.gateway.connection", "Connection", "_from_client_at_once", "gw: frame taken"),
    ("car_grpc.gateway.multiplex", "MultiplexedCall", "pull", "gw: ClientFrame queued (pull)"),
    ("car_grpc.gateway.multiplex", "_Stream", "_take_records", "gw: message up taken for write"),
    ("car_grpc.core.multiplex", "SessionChannel", "push", "core: batch read off the stream"),
    ("car_grpc.core.grpc_service", "SessionStream", "_handle", "core: session's reader handles"),
    # An inline request alone in its batch skips the reader (the stream's reader answers it).
    ("car_grpc.core.grpc_service", "SessionStream", "_answer_now", "core: answered where read"),
    ("car_grpc.core.dispatch", "Dispatcher", "execute", "core: dispatch"),
    ("car_grpc.core.multiplex", "SessionChannel", "try_write", "core: answer written at once"),
    ("car_grpc.core.multiplex", "MultiplexedStream", "_take", "core: message down taken"),
    ("car_grpc.gateway.multiplex", "MultiplexedCall", "deliver", "gw: batch read off the stream"),
    ("car_grpc.gateway.connection", "TrackedConnection", "send_now", "gw: answer sent to WS"),
)


def _instrument() -> None:
    import importlib

    for module, cls_name, name, step in STEPS:
        cls = getattr(importlib.import_module(module), cls_name)
        original = getattr(cls, name)

        def wrapped(*args: Any, __original: Any = original, __step: str = step, **kw: Any) -> Any:
            STAMPS.append((__step, now()))
            return __original(*args, **kw)

        setattr(cls, name, functools.wraps(original)(wrapped))
    out = Path(os.environ["RT_STAMPS_DIR"]) / f"{os.getpid()}.txt"

    def dump() -> None:  # (a daemon thread: the notes so far, every half second)
        written = 0
        while True:
            time.sleep(0.5)
            if (end := len(STAMPS)) > written:
                with out.open("a") as f:
                    f.writelines(f"{at} {step}\n" for step, at in STAMPS[written:end])
                written = end

    threading.Thread(target=dump, daemon=True).start()


async def drive(round_trips: int) -> None:
    from bench.bench_gateway import WARMUP, _open, _round_trip
    from tests.processes import EPHEMERAL, car_grpc_argv, cli_env, launch

    with tempfile.TemporaryDirectory() as tmp:
        site, stamps, home = (Path(tmp) / name for name in ("site", "stamps", "home"))
        for folder in (site, stamps, home):
            folder.mkdir()
        (site / "sitecustomize.py").write_text(
            "import os\nif os.environ.get('RT_STAMPS_DIR'):\n"
            "    import bench.rt_stamps\n    bench.rt_stamps._instrument()\n"
        )
        path = os.pathsep.join([str(site), CHECKOUT, os.environ.get("PYTHONPATH", "")])
        env = cli_env(home, PYTHONPATH=path, RT_STAMPS_DIR=str(stamps))
        argv = car_grpc_argv("serve", *EPHEMERAL, "--no-auth", "--no-dashboard")
        async with launch(argv, name="car-grpc serve", env=env) as server:
            _, url = await server.listeners(2, timeout=60)
            ws = await _open(url, bridged=True)
            for _ in range(WARMUP):
                await _round_trip(ws)
            rows = []
            for _ in range(round_trips):
                sent = now()
                await _round_trip(ws)
                rows.append((sent, now()))
            await ws.close()
            await asyncio.sleep(1.5)  # the last notes written
        notes = [
            (int(at), step)
            for file in stamps.iterdir()
            for at, step in (line.rstrip("\n").split(" ", 1) for line in file.open())
        ]
    _report(rows, sorted(notes))


def _report(rows: list[tuple[int, int]], notes: list[tuple[int, str]]) -> None:
    """Each step's median time from the send: its first note within its round trip."""
    times = [at for at, _ in notes]
    offsets: dict[str, list[float]] = {}
    for sent, answered in rows:
        seen: dict[str, int] = {}
        for at, step in notes[
            bisect.bisect_left(times, sent) : bisect.bisect_right(times, answered)
        ]:
            seen.setdefault(step, at)
        for step, at in seen.items():
            offsets.setdefault(step, []).append((at - sent) / 1000)
        offsets.setdefault("client: answer read", []).append((answered - sent) / 1000)
    print(f"{len(rows)} round trips; median us from the client's send (+ from the step before)")
    previous = 0.0
    medians = {step: statistics.median(v) for step, v in offsets.items()}
    for step, median in sorted(medians.items(), key=lambda item: item[1]):
        share = len(offsets[step]) / len(rows)
        partial = f"  [in {share:.0%} of the round trips]" if share < 0.9 else ""
        print(f"{median:8.0f} us  (+{median - previous:5.0f})  {step}{partial}")
        previous = median


if __name__ == "__main__":
    asyncio.run(drive(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
