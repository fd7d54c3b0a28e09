"""The cluster's "Done when": two `car-grpc serve` processes (own ports on loopback, own
CAR_HOME) on one real PostgreSQL database, clients on their WebSocket gateways. A host on
core A chats with an agent attached on core B; a call gated on A is approved by a host on
B; a run recorded through A is followed live from B; then A is SIGKILLed in the middle of
recording: B ends the run `incomplete` within lease + grace, every turn A acknowledged is
in it, the chat a host on B had with an agent on A ends with an `error` event, and B
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

from car_grpc.core.tokens import AgentTokens
from car_grpc.store import open_store
from tests.postgres_server import PostgresServer
from tests.processes import ONE_PROCESS, Process, car_grpc_serve
from tests.ws_client import Rpc, RpcError, rpc

#: A short lease keeps the test quick (the release comes within lease + a third of it),
#: long enough that two busy processes on a shared machine renew theirs in time.
LEASE = 3.0
#: Slack for two busy processes and the database on a shared machine.
SLACK = 1.5
SECRET = "processes-cluster-secret"


async def mint(url: str, home: Path, *agent_ids: str) -> list[str]:
    """Agent tokens, straight into the shared store (as `car-grpc agents add --store`)."""
    store = await open_store(home, url, pool_size=1)
    try:
        return [await AgentTokens(store.agent_tokens).add(a) for a in agent_ids]
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def core(home: Path, url: str, core_id: str) -> AsyncIterator[tuple[Process, str, str]]:
    """`car-grpc serve` as cluster member `core_id`: (process, WebSocket URL, host token)."""
    flags = (
        "--store",
        url,
        "--core-id",
        core_id,
        "--cluster-secret",
        SECRET,
        "--cluster-lease",
        str(LEASE),
        "--gate-method",
        "host.register_agent",
        "--no-dashboard",
    )
    async with car_grpc_serve(home, *ONE_PROCESS, *flags) as process:
        _, ws_url = await process.listeners(2)
        host_token = (home / "ai.parslee.car" / "host-token").read_text().strip()
        yield process, ws_url, host_token


async def chat(host: Rpc, agent: Rpc, agent_id: str) -> str:
    """agents.chat from `host`, acknowledged by `agent`; the chat's session_id."""
    pending = asyncio.create_task(
        host.result("agents.chat", {"agent_id": agent_id, "prompt": "hi"})
    )
    asked = await agent.expect_request("agent.chat")
    await agent.answer(asked, {"accepted": True})
    accepted = await pending
    assert accepted["accepted"] is True
    return str(accepted["session_id"])


async def record_until_killed(
    recorder: Rpc, run_id: str, acked: list[str], enough: asyncio.Event
) -> None:
    """Batches of 4 turns, one after another, until the connection fails; `enough` is set
    once 40 are acknowledged."""
    for batch in itertools.count():
        prompts = [f"b{batch}-t{i}" for i in range(4)]
        reply = await recorder.result(
            "runs.record_turns", {"run_id": run_id, "turns": [{"prompt": p} for p in prompts]}
        )
        assert reply["ok"] is True, reply
        acked.extend(prompts)
        if len(acked) >= 40:
            enough.set()


async def test_two_serve_processes_on_one_postgresql_form_a_cluster(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.create_database("processes")
    bot_token, rec_token, bot2_token = await mint(url, tmp_path / "mint", "bot", "rec", "bot2")
    async with (
        core(tmp_path / "a", url, "core-a") as (proc_a, ws_a, host_a),
        core(tmp_path / "b", url, "core-b") as (_, ws_b, host_b),
        rpc(ws_a) as host_on_a,
        rpc(ws_a) as caller_on_a,
        rpc(ws_a) as recorder_on_a,
        rpc(ws_a) as bot2_on_a,
        rpc(ws_b) as bot_on_b,
        rpc(ws_b) as host_on_b,
    ):
        await host_on_a.login(host_token=host_a)
        await caller_on_a.login(host_token=host_a)
        await recorder_on_a.login(rec_token, agent_id="rec")
        await bot2_on_a.login(bot2_token, agent_id="bot2")
        await bot_on_b.login(bot_token, agent_id="bot")
        await host_on_b.login(host_token=host_b)

        # A host on core A chats with an agent attached on core B.
        session_id = await chat(host_on_a, bot_on_b, "bot")
        for kind, delta in (("token", "hel"), ("token", "lo"), ("done", None)):
            event = {"session_id": session_id, "kind": kind} | ({"delta": delta} if delta else {})
            await bot_on_b.notify("agent.chat.event", event)
        got = [await host_on_a.next_notification("agents.chat.event") for _ in range(3)]
        assert [(e["kind"], e.get("delta")) for e in got] == [
            ("token", "hel"),
            ("token", "lo"),
            ("done", None),
        ]
        assert {(e["session_id"], e["agent_id"]) for e in got} == {(session_id, "bot")}

        # A call gated on core A is approved by a host on core B.
        await host_on_b.result("host.subscribe")
        parked = asyncio.create_task(
            caller_on_a.result("host.register_agent", {"name": "helper", "kind": "test"})
        )
        requested = await host_on_b.next_notification(
            "host.event", where={"kind": "approval.requested"}
        )
        approval_id = requested["payload"]["id"]
        resolved = await host_on_b.result(
            "host.resolve_approval", {"approval_id": approval_id, "approved": True}
        )
        assert resolved["status"] == "approved"
        assert (await asyncio.wait_for(parked, 5))["name"] == "helper", proc_a.log

        # A run recorded through core A is followed live from core B.
        run_id = (await recorder_on_a.result("runs.start", {"intent": "cross"}))["run_id"]
        first = await recorder_on_a.result(
            "runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "first"}]}
        )
        acked = ["first"] if first["ok"] else []
        snapshot = await host_on_b.result("runs.subscribe", {"run_id": run_id})
        assert (snapshot["cursor"], [t["prompt"] for t in snapshot["turns_so_far"]]) == (
            1,
            ["first"],
        )
        enough = asyncio.Event()
        recording = asyncio.create_task(record_until_killed(recorder_on_a, run_id, acked, enough))
        live = await host_on_b.next_notification("runs.trace.event", where={"cursor": 2})
        assert live["record"]["prompt"] == "b0-t0"

        # A chat from a host on B to an agent on A, open when A dies.
        doomed = await chat(host_on_b, bot2_on_a, "bot2")

        # Core A is SIGKILLed mid-run.
        await asyncio.wait_for(enough.wait(), 10)
        proc_a.kill()
        killed = asyncio.get_running_loop().time()
        with contextlib.suppress(RpcError, Exception):
            await asyncio.wait_for(recording, 10)
        ended = await host_on_b.next_notification(
            "runs.trace.event", timeout=LEASE * 4 / 3 + SLACK + 5, where={"status": "incomplete"}
        )
        elapsed = asyncio.get_running_loop().time() - killed
        assert ended["record"]["record"] == "ended"
        assert elapsed < LEASE * 4 / 3 + SLACK, elapsed

        error = await host_on_b.next_notification("agents.chat.event", where={"session_id": doomed})
        assert error["kind"] == "error" and "bot2" in error["message"]

        # Every acknowledged turn is there, and the run is incomplete.
        trace = await host_on_b.result("runs.get_trace", {"run_id": run_id})
        prompts = [r.get("prompt") for r in trace["records"] if r["record"] == "turn"]
        assert prompts[: len(acked)] == acked
        assert trace["records"][-1]["status"] == "incomplete"
        listed = await host_on_b.result("runs.list", {"agent_id": "rec"})
        assert [r["status"] for r in listed["runs"]] == ["incomplete"]

        # Core B keeps serving: its own agent still chats.
        await chat(host_on_b, bot_on_b, "bot")
