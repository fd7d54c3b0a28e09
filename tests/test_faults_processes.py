"""Faults with real processes: `car-grpc core` and `car-grpc gateway --core ADDR` run
apart. The core is SIGKILLed in the middle of traffic and restarted on the same state
root and port: every turn and approval it acknowledged is there, the open run is marked
incomplete, the WebSocket clients saw a clean close saying why and get back in through
the same gateway. A gateway SIGKILLed ends its own sessions at the core and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from car_grpc.config import GatewayConfig
from car_grpc.core.server import Core
from car_grpc.core.tokens import AgentTokens
from car_grpc.gateway import Gateway
from car_grpc.store import open_store
from tests.bounded import stopped
from tests.processes import Process, car_grpc, port
from tests.ws_helpers import Rpc, RpcError, daemon_token, rpc


@contextlib.asynccontextmanager
async def child(home: Path, *args: str) -> AsyncIterator[tuple[Process, str]]:
    """`car-grpc ARGS` with CAR_HOME=home, once it logged its (first) listener: the process
    and that listener's address."""
    async with car_grpc(home, *args) as process:
        [address] = await process.listeners(1)
        yield process, address


def restartable_core(grpc_port: int) -> tuple[str, ...]:
    """`car-grpc core` arguments on `grpc_port` (0 the first time: a port picked free and
    bound later may be taken in between; then the port it got, to restart on it), the A2A
    port ephemeral (by default the gRPC port + 1, which nobody keeps free)."""
    return ("core", "--grpc-port", str(grpc_port), "--a2a-port", "0")


def token_file(home: Path, name: str) -> str:
    return (home / "ai.parslee.car" / name).read_text().strip()


async def mint_agent_token(home: Path, agent_id: str) -> str:
    """`car-grpc agents add` before the core starts: straight into its store."""
    store = await open_store(home)
    try:
        return await AgentTokens(store.agent_tokens).add(agent_id)
    finally:
        await store.close()


# ------------------------------------------------------------------ the core killed

TURNS_PER_BATCH = 8


async def record_turns(bot: Rpc, run_id: str, acked: list[str], enough: asyncio.Event) -> None:
    """Batches of turns, four in flight, until the connection fails (past 1,600 turns:
    until it closes); the prompts of the acknowledged ones go to `acked`."""

    async def one(batch: int) -> None:
        prompts = [f"b{batch}-t{i}" for i in range(TURNS_PER_BATCH)]
        turns = [{"prompt": p} for p in prompts]
        reply = await bot.result("runs.record_turns", {"run_id": run_id, "turns": turns})
        assert reply["ok"] and reply["count"] == TURNS_PER_BATCH
        acked.extend(prompts)
        if len(acked) >= 200:
            enough.set()

    for batch in itertools.count(step=4):
        if batch * TURNS_PER_BATCH >= 1600:  # stay below the 2000 turns of a run
            await bot.wait_closed(30)
            return
        await asyncio.gather(*(one(batch + i) for i in range(4)))


async def raise_approvals(
    asker: Rpc,
    acked: list[str],
    approved: list[str],
    enough: asyncio.Event,
    resolving: list[str] | None = None,
) -> None:
    """Approvals raised one after another until the connection fails (past 100: until it
    closes), every other one approved by the session that raised it (only it may);
    acknowledged ids go to `acked` and `approved`, and an id whose resolution was sent goes
    to `resolving` first (the kill may land between its commit and its answer: then it is
    approved without having been acknowledged)."""
    for n in itertools.count():
        if n >= 100:  # well within the ledger history host.approvals lists
            await asker.wait_closed(30)
            return
        approval = await asker.result("host.request_approval", {"title": f"a{n}"})
        acked.append(approval["id"])
        if n % 2:
            if resolving is not None:
                resolving.append(acked[-1])
            await asker.result(
                "host.resolve_approval", {"approval_id": acked[-1], "approved": True}
            )
            approved.append(acked[-1])
        if len(acked) >= 10:
            enough.set()


async def ended(task: asyncio.Task[None]) -> None:
    """Wait (10 s at most: longer, the traffic outlived the core) for a traffic task that
    the dead core ended: with the error of a request that was in flight (the gateway's
    -32603) or of one sent after the close, or, past its cap, at the close itself."""
    with contextlib.suppress(RpcError, ConnectionClosed):
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def back_in(url: str, **credentials: str) -> AsyncIterator[Rpc]:
    """A new session through the gateway once the core is back (its channel reconnects
    in its own time: until then each attempt is refused, 1011)."""
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(20):
            while True:
                client = await stack.enter_async_context(rpc(url))
                try:
                    await client.login(**credentials)
                    break
                except (RpcError, ConnectionClosed):
                    code, reason = await client.wait_closed()
                    assert code == 1011, reason
                    await asyncio.sleep(0.05)  # polling another process: nothing to wait on
        yield client


async def test_core_killed_mid_traffic_loses_nothing_acknowledged(tmp_path: Path) -> None:
    home = tmp_path / "home"
    bot_token = await mint_agent_token(home, "bot")
    turns: list[str] = []
    approvals: list[str] = []
    approved: list[str] = []
    resolving: list[str] = []
    # The core starts on an ephemeral port (a port picked free and bound later may be
    # taken in between) and restarts on the one it got; the A2A port is ephemeral too.
    async with (
        child(home, *restartable_core(0)) as (core, address),
        child(home, "gateway", "--core", address, "--port", "0") as (_, url),
    ):
        async with rpc(url) as bot, rpc(url) as asker:
            await bot.login(token=bot_token, agent_id="bot")
            await asker.login(token=token_file(home, "auth-token"))
            run_id = (await bot.result("runs.start", {"intent": "survive a crash"}))["run_id"]
            enough_turns, enough_approvals = asyncio.Event(), asyncio.Event()
            traffic = [
                asyncio.create_task(record_turns(bot, run_id, turns, enough_turns)),
                asyncio.create_task(
                    raise_approvals(asker, approvals, approved, enough_approvals, resolving)
                ),
            ]
            async with asyncio.timeout(20):
                await enough_turns.wait()
                await enough_approvals.wait()
            core.kill()  # mid-traffic: batches and approvals are in flight
            for task in traffic:
                await ended(task)
            for client in (bot, asker):  # a clean close that says why
                code, reason = await client.wait_closed(10)
                assert code == 1011
                assert reason.startswith("core unavailable: "), reason

        async with (
            child(home, *restartable_core(port(address))),
            back_in(url, host_token=token_file(home, "host-token")) as host,
        ):
            trace = await host.result("runs.get_trace", {"run_id": run_id})
            records = trace["records"]
            stored = [r["prompt"] for r in records if r["record"] == "turn"]
            assert set(turns) <= set(stored)
            assert len(stored) % TURNS_PER_BATCH == 0  # whole batches: none torn
            assert [r["index"] for r in records[1:-1]] == list(range(len(stored)))
            assert records[0]["record"] == "started"
            assert (records[-1]["record"], records[-1]["status"]) == ("ended", "incomplete")
            [summary] = (await host.result("runs.list", {"agent_id": "bot"}))["runs"]
            assert (summary["status"], summary["turn_count"]) == ("incomplete", len(stored))
            ledger = {a["id"]: a for a in (await host.result("host.approvals", {}))["approvals"]}
            assert set(approvals) <= set(ledger)
            for approval_id in approvals:
                status = ledger[approval_id]["status"]
                if approval_id in approved:  # acknowledged: kept
                    assert status == "approved", status
                elif approval_id in resolving:  # sent, answer lost with the core: either
                    assert status in ("approved", "expired"), status
                else:
                    assert status == "expired", status
            # The agent gets back in too, with the token it had.
            async with back_in(url, token=bot_token, agent_id="bot") as bot:
                runs = (await bot.result("runs.list", {"agent_id": "bot"}))["runs"]
                assert [r["run_id"] for r in runs] == [run_id]


# ------------------------------------------------------------------ a gateway killed


async def test_a_killed_gateway_ends_its_sessions_and_no_others(core: Core, tmp_path: Path) -> None:
    """Sessions on a gateway that dies with SIGKILL (no goodbye to anyone) end at the core:
    its agent's chat ends with an error at a host on the other gateway, its registered
    agent leaves the registry, its run becomes incomplete. The other gateway's sessions
    carry on."""
    state = core.parts
    assert state is not None and state.tokens is not None
    staying = Gateway(GatewayConfig(ws_port=0, unix_socket=None), core.grpc_address)
    await staying.start()
    try:
        async with (
            child(tmp_path / "home", "gateway", "--core", core.grpc_address, "--port", "0") as (
                doomed,
                doomed_url,
            ),
            rpc(staying.url) as host,
            rpc(staying.url) as watcher,
            rpc(doomed_url) as agent,
        ):
            await host.login(token=daemon_token(core))
            await watcher.login(host_token=state.tokens.host)
            await watcher.result("host.subscribe", {})
            agent_auth = await agent.login(
                token=await state.agent_tokens.add("bot"), agent_id="bot"
            )
            registered = await agent.result("host.register_agent", {"name": "bot", "kind": "agent"})
            assert (await watcher.next_notification("host.event"))["kind"] == "agent.registered"
            run_id = (await agent.result("runs.start", {"intent": "doomed"}))["run_id"]
            await watcher.result("runs.subscribe", {"run_id": run_id})
            chat = asyncio.create_task(
                host.result("agents.chat", {"agent_id": "bot", "prompt": "hi", "session_id": "c1"})
            )
            await agent.answer(await agent.expect_request(), {"accepted": True})
            assert (await asyncio.wait_for(chat, 5))["accepted"] is True
            staying_ids = set(state.registry.sessions) - {agent_auth["session_id"]}

            doomed.kill()

            event = await host.next_notification("agents.chat.event")
            assert event["session_id"] == "c1" and event["kind"] == "error"
            gone = await watcher.next_notification("host.event")
            assert gone["kind"] == "agent.unregistered"
            assert gone["agent_id"] == registered["id"]
            ended_run = await watcher.next_notification("runs.trace.event")
            assert ended_run["status"] == "incomplete"
            assert (
                set(state.registry.sessions) == staying_ids and "bot" not in state.registry.attached
            )
            # The staying gateway's sessions carry on.
            await host.result("state.set", {"key": "k", "value": "still here"})
            assert await host.result("state.get", {"key": "k"}) == "still here"
            assert (await watcher.result("host.agents", {}))["agents"] == []
    finally:
        await stopped(staying.stop())
