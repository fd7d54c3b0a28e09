"""A cluster: bench_load's mixed load against one core and against two on PostgreSQL, and
what crossing cores costs a chat token and an approval.

Load (each configuration its own `car-grpc serve` processes, auth on, ephemeral ports):

1. one core on SQLite (the embedded default);
2. one core on PostgreSQL;
3. two cores on the same PostgreSQL database, the load-generator processes split between
   their gateways (half each).

Each runs bench_load's sessions and roles (proposals with a tool callback, recorded
turns, chats of CHAT_TOKENS tokens, idle sessions), SESSIONS of them over WORKERS
processes, DURATION seconds with a mean pause of THINK seconds between operations (short:
close to saturation on a small machine). Reported: operations/s and p50/p99 per kind.
A chat host and its agent are neighbours (sessions 7 and 8 of 10) and so on the same core.

Crossing cores, on the two-core cluster (WebSocket clients in this process, so both ends
read one clock):

- a chat token: an agent streams tokens stamped with the time they were sent; the host
  measures their arrival. Host and agent on one core, then on different cores.
- an approval: a call gated on core A (`host.register_agent`), approved by a host
  subscribed to host events on core A, then on core B: the gated call's round trip.

The PostgreSQL server is the tests' (tests/postgres_server.py) with fsync and
full_page_writes turned back on, so that it commits as durably as SQLite does here.

    python -m bench bench_cluster        (or ./dev bench bench_cluster)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import bench_load
from bench.bench_load import Phase, _line, agent_of, role_of
from tests.postgres_server import PostgresServer
from tests.processes import Process, car_grpc_serve, launch
from tests.ws_client import Rpc, rpc

SESSIONS = 400
WORKERS = 4
DURATION = 10.0
THINK = 0.1
SECRET = "bench-cluster-secret"
#: Chats and tokens per chat for the cross-core token cost; gated calls for the approval.
CHATS, TOKENS = 20, 50
APPROVALS = 30


def _ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


# ------------------------------------------------------------------ the load


@contextlib.asynccontextmanager
async def serve(home: Path, *flags: str) -> AsyncIterator[tuple[Process, str, str]]:
    """`car-grpc serve`: (process, WebSocket URL, its daemon token)."""
    async with car_grpc_serve(home, "--no-dashboard", *flags) as server:
        _, url = await server.listeners(2, timeout=60)
        daemon = (home / "ai.parslee.car" / "auth-token").read_text().strip()
        yield server, url, daemon


async def mint(home: Path, store: str | None) -> dict[str, str]:
    from car_grpc.core.tokens import AgentTokens
    from car_grpc.store import open_store

    opened = await open_store(home, store, pool_size=2)
    try:
        tokens = AgentTokens(opened.agent_tokens)
        return {
            agent_of(i): await tokens.add(agent_of(i))
            for i in range(SESSIONS)
            if role_of(i) in ("recorder", "chat_agent")
        }
    finally:
        await opened.close()


def _worker(url: str, first: int, count: int, tokens_file: str) -> Any:
    argv = [sys.executable, "-m", "bench.bench_cluster", "worker", url, str(first), str(count)]
    return launch([*argv, tokens_file], name=f"worker {first}", stdin=True, stdout=True)


async def drive(targets: list[tuple[str, str]]) -> Phase:
    """The load, worker w on targets[w % len(targets)] (URL, tokens file)."""
    phase = Phase()
    per_worker = SESSIONS // WORKERS
    async with contextlib.AsyncExitStack() as stack:
        workers = []
        for w in range(WORKERS):
            url, tokens_file = targets[w % len(targets)]
            workers.append(
                await stack.enter_async_context(
                    _worker(url, w * per_worker, per_worker, tokens_file)
                )
            )
        for worker in workers:
            assert json.loads(await _line(worker, 120))["ready"] == per_worker
        for worker in workers:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write(f"go {DURATION}\n".encode())
        for worker in workers:
            result = json.loads(await _line(worker, DURATION + 2 * bench_load.OP_TIMEOUT))
            for kind, values in result["latencies"].items():
                phase.latencies.setdefault(kind, []).extend(values)
            phase.errors += result["errors"]
        for worker in workers:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write(b"close\n")
        for worker in workers:
            assert json.loads(await _line(worker, 60))["closed"]
    return phase


def tokens_file(home: Path, daemon: str, agents: dict[str, str]) -> str:
    path = home / "tokens.json"
    path.write_text(json.dumps({"daemon": daemon, "agents": agents}))
    return str(path)


def cluster_flags(url: str, core_id: str) -> tuple[str, ...]:
    return ("--store", url, "--core-id", core_id, "--cluster-secret", SECRET,
            "--gate-method", "host.register_agent")  # fmt: skip


# ------------------------------------------------------------------ crossing cores


async def token_latencies(host: Rpc, agent: Rpc, agent_id: str) -> list[float]:
    """CHATS chats of TOKENS tokens each; each token's time from send to the host."""
    latencies: list[float] = []
    for n in range(CHATS):
        pending = asyncio.create_task(
            host.result("agents.chat", {"agent_id": agent_id, "prompt": f"go {n}"})
        )
        asked = await agent.expect_request("agent.chat")
        await agent.answer(asked, {"accepted": True})
        session_id = (await pending)["session_id"]
        for _ in range(TOKENS):
            sent = {"session_id": session_id, "kind": "token", "delta": repr(time.perf_counter())}
            await agent.notify("agent.chat.event", sent)
        await agent.notify("agent.chat.event", {"session_id": session_id, "kind": "done"})
        while True:
            event = await host.next_notification("agents.chat.event", timeout=30)
            if event["kind"] == "done":
                break
            latencies.append(time.perf_counter() - float(event["delta"]))
    return latencies


async def approval_latencies(caller: Rpc, approver: Rpc) -> list[float]:
    """APPROVALS gated calls, each approved by `approver` once it hears of it."""
    latencies: list[float] = []
    for n in range(APPROVALS):
        began = time.perf_counter()
        call = asyncio.create_task(
            caller.result("host.register_agent", {"id": f"x{n}", "name": f"x{n}", "kind": "b"})
        )
        requested = await approver.next_notification(
            "host.event", timeout=30, where={"kind": "approval.requested"}
        )
        await approver.result(
            "host.resolve_approval", {"approval_id": requested["payload"]["id"], "approved": True}
        )
        await call
        latencies.append(time.perf_counter() - began)
        await caller.result("host.unregister_agent", {"agent_id": f"x{n}"})
    return latencies


async def crossing(
    url_a: str, url_b: str, home_a: Path, home_b: Path, tokens: dict[str, str]
) -> dict[str, list[float]]:
    host_a = (home_a / "ai.parslee.car" / "host-token").read_text().strip()
    host_b = (home_b / "ai.parslee.car" / "host-token").read_text().strip()
    near, far = agent_of(8), agent_of(18)
    out: dict[str, list[float]] = {}
    async with (
        rpc(url_a) as host,
        rpc(url_a) as agent_near,
        rpc(url_b) as agent_far,
        rpc(url_a) as caller,
        rpc(url_a) as approver_a,
        rpc(url_b) as approver_b,
    ):
        await host.login(host_token=host_a)
        await agent_near.login(tokens[near], agent_id=near)
        await agent_far.login(tokens[far], agent_id=far)
        await caller.login(host_token=host_a)
        await approver_a.login(host_token=host_a)
        await approver_b.login(host_token=host_b)
        out["token, one core"] = await token_latencies(host, agent_near, near)
        out["token, across cores"] = await token_latencies(host, agent_far, far)
        await approver_a.result("host.subscribe")
        out["approval, one core"] = await approval_latencies(caller, approver_a)
        await approver_a.close()
        await approver_b.result("host.subscribe")
        out["approval, across cores"] = await approval_latencies(caller, approver_b)
    return out


# ------------------------------------------------------------------ the run


async def run() -> tuple[dict[str, Phase], dict[str, list[float]]]:
    bench_load.raise_fd_limit()
    phases: dict[str, Phase] = {}
    pg = PostgresServer.create()
    pg.start()
    try:
        pg.execute(pg.url(), "ALTER SYSTEM SET fsync = on")
        pg.execute(pg.url(), "ALTER SYSTEM SET full_page_writes = on")
        pg.execute(pg.url(), "SELECT pg_reload_conf()")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            home = root / "sqlite"
            agents = await mint(home, None)
            async with serve(home) as (_, url, daemon):
                phases["one core, SQLite"] = await drive([(url, tokens_file(home, daemon, agents))])

            store = pg.create_database("bench1")
            home = root / "pg1"
            agents = await mint(home, store)
            async with serve(home, *cluster_flags(store, "solo")) as (_, url, daemon):
                phases["one core, PostgreSQL"] = await drive(
                    [(url, tokens_file(home, daemon, agents))]
                )

            store = pg.create_database("bench2")
            home_a, home_b = root / "a", root / "b"
            agents = await mint(home_a, store)
            async with (
                serve(home_a, *cluster_flags(store, "a")) as (_, url_a, daemon_a),
                serve(home_b, *cluster_flags(store, "b")) as (_, url_b, daemon_b),
            ):
                phases["two cores, PostgreSQL"] = await drive(
                    [
                        (url_a, tokens_file(home_a, daemon_a, agents)),
                        (url_b, tokens_file(home_b, daemon_b, agents)),
                    ]
                )
                costs = await crossing(url_a, url_b, home_a, home_b, agents)
    finally:
        pg.destroy()
    return phases, costs


def main() -> None:
    started = time.perf_counter()
    phases, costs = asyncio.run(run())
    print(
        f"{SESSIONS} WebSocket sessions over {WORKERS} worker processes, {DURATION:g}s of "
        f"traffic, mean pause {THINK:g}s"
    )
    print(f"{'configuration':24}{'ops/s':>8}{'errors':>8}"
          f"{'proposal p50/p99':>20}{'record p50/p99':>18}{'chat p50/p99':>18}")  # fmt: skip
    base = None
    for name, phase in phases.items():
        ops = sum(len(v) for v in phase.latencies.values()) / DURATION
        base = base or ops
        cells = []
        for kind in ("proposer", "recorder", "chat_host"):
            values = phase.latencies.get(kind, [])
            cells.append(f"{_ms(values, 50):.1f}/{_ms(values, 99):.1f}" if len(values) > 1 else "-")
        print(
            f"{name:24}{ops:8.0f}{len(phase.errors):8d}{cells[0]:>20}{cells[1]:>18}{cells[2]:>18}"
        )
        for error in phase.errors[:3]:
            print(f"    error: {error}")
    one = sum(len(v) for v in phases["one core, PostgreSQL"].latencies.values())
    two = sum(len(v) for v in phases["two cores, PostgreSQL"].latencies.values())
    print(f"two cores / one core on PostgreSQL: {two / one:.2f}x the operations")
    print(f"{'crossing cores':26}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}")
    for name, values in costs.items():
        print(f"{name:26}{len(values):7d}{_ms(values, 50):9.2f}{_ms(values, 99):9.2f}")
    print(f"ran in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        bench_load.THINK = THINK
        url, first, count, tokens_path = sys.argv[2:]
        asyncio.run(
            bench_load.worker(
                url, int(first), int(count), json.loads(Path(tokens_path).read_text())
            )
        )
    else:
        main()
