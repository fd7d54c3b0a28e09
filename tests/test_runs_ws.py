"""Runs over the WebSocket gateway (docs/protocol.md §4 on the JSON-RPC wire): exact JSON
shapes, validation messages, drops, the 2000-turn ceiling under pipelining, live traces,
disconnects, and the official `car-runtime` client recording a run."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from car_grpc.config import Config
from car_grpc.core.run_turns import FIELD_CAP, TRUNCATED, TURN_REPLACED
from car_grpc.core.runs import RECORD_TURNS_USAGE
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from tests.conftest import make_config
from tests.processes import cli_env, launch
from tests.ws_helpers import RawWebSocket, Rpc, running

JSON = Any
TRACE_EVENT = "runs.trace.event"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, run_complete_grace=0.05)


@pytest.fixture
async def served(config: Config) -> AsyncIterator[tuple[Core, Gateway]]:
    async with running(config) as both:
        yield both


@pytest.fixture
async def peers(served: tuple[Core, Gateway]) -> AsyncIterator[Peers]:
    made = Peers(*served)
    try:
        yield made
    finally:
        for peer in made.opened:
            await peer.close()


class Peers:
    """Opens authenticated WebSocket sessions: agents, the host role, an ordinary client."""

    def __init__(self, core: Core, gateway: Gateway) -> None:
        assert core.parts is not None and core.parts.tokens is not None
        self.state = core.parts
        self.tokens = core.parts.tokens
        self.url = gateway.url
        self.opened: list[Rpc] = []

    async def open(self, **credentials: str) -> Rpc:
        peer = Rpc(await connect(self.url, ping_interval=None, max_size=None))
        self.opened.append(peer)
        await peer.login(**credentials)
        return peer

    async def agent(self, agent_id: str = "bot") -> Rpc:
        return await self.open(agent_id=agent_id, token=await self.state.agent_tokens.add(agent_id))

    async def host_role(self) -> Rpc:
        """A session with the host token."""
        return await self.open(host_token=self.tokens.host)

    async def ordinary(self) -> Rpc:
        """A session with the daemon token."""
        return await self.open(token=self.tokens.daemon)


def turns(n: int, prompt: str = "p") -> list[dict[str, JSON]]:
    return [{"prompt": f"{prompt}{i}"} for i in range(n)]


def dropped(run_id: str, reason: str) -> dict[str, JSON]:
    return {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": reason}


async def start(peer: Rpc, **params: JSON) -> str:
    result = await peer.result("runs.start", {"intent": "ship it", **params})
    return str(result["run_id"])


# ---------------------------------------------------------------- lifecycle


async def test_a_run_on_the_json_wire(peers: Peers) -> None:
    bot = await peers.agent()
    started = await bot.result(
        "runs.start", {"intent": "ship it", "agent_name": "Bot", "outcome_description": "green"}
    )
    run_id = started["run_id"]
    assert started == {"run_id": run_id, "agent_id": "bot"}  # the attachment wins

    recorded = await bot.result(
        "runs.record_turns",
        {
            "run_id": run_id,
            "turns": [
                {"index": 99, "prompt": "list files", "tool": "shell", "parameters": {"cmd": "ls"}},
                {"output": {"files": 3}, "cli_outcome": "ok", "verifier_verdict": "passed"},
            ],
        },
    )
    assert recorded == {"run_id": run_id, "base_index": 0, "count": 2, "ok": True}
    outcome = {"status": "success", "summary": "done", "evidence": ["a"], "timestamp": 7}
    completed = await bot.result("runs.complete", {"run_id": run_id, "outcome": outcome})
    assert completed == {"run_id": run_id, "ok": True}

    got = await bot.result("runs.get_trace", {"run_id": run_id})
    stamps = [r.pop("timestamp") for r in got["records"]]
    assert all(isinstance(t, int) and t > 0 for t in stamps)
    assert got == {
        "run_id": run_id,
        "agent_id": "bot",
        "cursor": 4,
        "records": [
            {
                "record": "started",
                "run_id": run_id,
                "agent_id": "bot",
                "intent": "ship it",
                "outcome_description": "green",
            },
            {
                "record": "turn",
                "index": 0,
                "prompt": "list files",
                "tool": "shell",
                "parameters": {"cmd": "ls"},
                "verifier_verdict": "not_run",
            },
            {
                "record": "turn",
                "index": 1,
                "output": {"files": 3},
                "cli_outcome": "ok",
                "verifier_verdict": "passed",
            },
            {"record": "ended", "status": "completed", "outcome": outcome},
        ],
    }

    [summary] = (await bot.result("runs.list", {"agent_id": "bot"}))["runs"]
    assert summary.pop("started_at") <= summary.pop("ended_at")
    assert summary == {
        "run_id": run_id,
        "agent_id": "bot",
        "intent": "ship it",
        "status": "completed",
        "turn_count": 2,
    }
    again = await bot.error("runs.complete", {"run_id": run_id, "outcome": {"status": "x"}})
    assert again["code"] == -32603 and "already ended (completed)" in again["message"]


async def test_start_rules_on_the_json_wire(peers: Peers, served: tuple[Core, Gateway]) -> None:
    plain = await peers.ordinary()
    named = await plain.result("runs.start", {"intent": "i", "agent_name": "Deep Thought"})
    assert named["agent_id"] == "name:deep-thought"
    none = await plain.error("runs.start", {"intent": "i"})
    assert none["code"] == -32602 and "agent_id" in none["message"]

    bot = await peers.agent()
    first = await start(bot, idempotency_key="job-1")
    assert await start(bot, idempotency_key="job-1") == first == "job-1"
    assert served[0].parts is not None
    assert served[0].parts.registry.attached["bot"].current_run == "job-1"
    listed = await bot.result("runs.list", {"agent_id": "bot"})
    assert [r["run_id"] for r in listed["runs"]] == ["job-1"]


# ---------------------------------------------------------------- record_turns


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"turns": [{}]}, "run_id"),
        ({"run_id": "", "turns": [{}]}, "run_id"),
        ({"run_id": "r"}, "turns"),
        ({"run_id": "r", "turns": []}, "turns"),
        ({"run_id": "r", "turns": [{}] * 257}, "turns"),
        ({"run_id": "r", "turns": "all of them"}, "turns"),
        ({"run_id": "r", "turns": [7]}, "turns[0]"),
        ({"run_id": "r", "turns": [{}, {"prompt": 5}]}, "turns[1].prompt"),
        ({"run_id": "r", "turns": [{"index": -1}]}, "turns[0].index"),
        ({"run_id": 3, "turns": [{}]}, "run_id"),
    ],
)
async def test_malformed_record_turns(peers: Peers, params: JSON, field: str) -> None:
    bot = await peers.agent()
    await start(bot, idempotency_key="r")
    error = await bot.error("runs.record_turns", params)
    assert error == {"code": -32602, "message": RECORD_TURNS_USAGE, "data": {"field": field}}
    assert (await bot.result("runs.get_trace", {"run_id": "r"}))["cursor"] == 1


async def test_caps_on_the_json_wire(peers: Peers) -> None:
    bot = await peers.agent()
    run_id = await start(bot)
    long = "é" * FIELD_CAP  # 32 KiB of UTF-8
    capped = "é" * (FIELD_CAP // 2) + TRUNCATED
    huge = {"pages": ["x" * 10_000 for _ in range(30)]}
    result = await bot.result(
        "runs.record_turns",
        {
            "run_id": run_id,
            "turns": [
                {"prompt": long, "parameters": {"q": long, "k": [long]}, "output": long},
                {"prompt": "p", "tool": "read", "output": huge},
            ],
        },
    )
    assert result["ok"] and result["count"] == 2
    records = (await bot.result("runs.get_trace", {"run_id": run_id, "cursor": 1}))["records"]
    assert records[0]["prompt"] == records[0]["output"] == capped
    assert records[0]["parameters"] == {"q": capped, "k": [capped]}
    replaced = {k: records[1][k] for k in ("prompt", "parameters", "output", "tool")}
    assert replaced == {
        "prompt": TURN_REPLACED,
        "parameters": TURN_REPLACED,
        "output": TURN_REPLACED,
        "tool": "read",
    }

    hopeless = {"cli_outcome": {"log": "z" * (300 * 1024)}}
    answer = await bot.result("runs.record_turns", {"run_id": run_id, "turns": [{}, hopeless]})
    assert answer == dropped(run_id, "turn_too_large")


async def test_writers_and_drops_on_the_json_wire(peers: Peers) -> None:
    bot = await peers.agent()
    run_id = await start(bot)
    for peer in (await peers.agent("intruder"), await peers.host_role(), await peers.ordinary()):
        answer = await peer.result("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        assert answer == dropped(run_id, "run_not_found")
    unknown = await bot.result("runs.record_turns", {"run_id": "nope", "turns": [{}]})
    assert unknown == dropped("nope", "run_not_found")

    await bot.result("runs.complete", {"run_id": run_id, "outcome": {"status": "done"}})
    ended = await bot.result("runs.record_turns", {"run_id": run_id, "turns": [{}]})
    assert ended == dropped(run_id, "run_terminal")


async def test_pipelined_batches_stop_at_exactly_2000(peers: Peers) -> None:
    bot = await peers.agent()
    run_id = await start(bot)
    answers = await asyncio.gather(
        *(
            bot.result("runs.record_turns", {"run_id": run_id, "turns": turns(200)})
            for _ in range(15)
        )
    )
    accepted = sorted(a["base_index"] for a in answers if a["ok"])
    assert accepted == list(range(0, 2000, 200))
    assert [a for a in answers if not a["ok"]] == [dropped(run_id, "run_turn_limit")] * 5
    [summary] = (await bot.result("runs.list", {"agent_id": "bot"}))["runs"]
    assert summary["turn_count"] == 2000


# ---------------------------------------------------------------- readers


async def test_subscribe_and_trace_events_on_the_json_wire(peers: Peers) -> None:
    bot = await peers.agent()
    watcher = await peers.host_role()
    intruder = await peers.agent("intruder")
    run_id = await start(bot)
    await bot.result("runs.record_turns", {"run_id": run_id, "turns": turns(2)})

    snapshot = await watcher.result("runs.subscribe", {"run_id": run_id})
    assert snapshot == {
        "run_id": run_id,
        "agent_id": "bot",
        "turns_so_far": [
            {"index": 0, "prompt": "p0", "verifier_verdict": "not_run"},
            {"index": 1, "prompt": "p1", "verifier_verdict": "not_run"},
        ],
        "cursor": 2,
        "status": "in_progress",
    }
    refused = await intruder.error("runs.subscribe", {"run_id": run_id})
    assert refused["code"] == -32602 and "unknown run" in refused["message"]

    await bot.result("runs.record_turns", {"run_id": run_id, "turns": [{"tool": "t"}]})
    event = await watcher.expect_notification(TRACE_EVENT)
    assert event["record"].pop("timestamp") > 0
    assert event == {
        "run_id": run_id,
        "agent_id": "bot",
        "record": {"record": "turn", "index": 2, "tool": "t", "verifier_verdict": "not_run"},
        "cursor": 3,
        "status": "in_progress",
    }
    await bot.result("runs.complete", {"run_id": run_id, "outcome": {"status": "ok"}})
    ended = await watcher.expect_notification(TRACE_EVENT)
    assert ended["record"].pop("timestamp") > 0
    assert ended == {
        "run_id": run_id,
        "agent_id": "bot",
        "record": {"record": "ended", "status": "completed", "outcome": ended["record"]["outcome"]},
        "cursor": 3,
        "status": "completed",
    }
    assert ended["record"]["outcome"]["status"] == "ok"
    assert await watcher.result("runs.unsubscribe", {"run_id": run_id}) == {
        "run_id": run_id,
        "removed": False,  # the subscription ended with its run
    }


async def test_get_trace_not_found_on_the_json_wire(peers: Peers) -> None:
    bot = await peers.agent()
    run_id = await start(bot)
    for peer, target in ((await peers.agent("intruder"), run_id), (bot, "nope")):
        answer = await peer.result("runs.get_trace", {"run_id": target})
        assert answer == {"run_id": target, "records": [], "not_found": True}
    page = await bot.result("runs.get_trace", {"run_id": run_id, "cursor": 0, "limit": 1})
    assert [r["record"] for r in page["records"]] == ["started"] and page["cursor"] == 1


async def test_disconnect_on_the_json_wire(peers: Peers) -> None:
    bot = await peers.agent()
    boss = await peers.host_role()
    run_id = await start(bot)
    await bot.result("runs.record_turns", {"run_id": run_id, "turns": turns(1)})
    bot.drop()  # as car-runtime does: TCP dropped, no close frame

    async with asyncio.timeout(5):
        while True:
            [summary] = (await boss.result("runs.list", {"agent_id": "bot"}))["runs"]
            if summary["status"] == "incomplete":
                break
            await asyncio.sleep(0.01)
    records = (await boss.result("runs.get_trace", {"run_id": run_id}))["records"]
    assert [(r["record"], r.get("status")) for r in records] == [
        ("started", None),
        ("turn", None),
        ("ended", "incomplete"),
    ]


# ---------------------------------------------------------------- car-runtime

CAR_RUNTIME_AGENT = """
import json
import os
import sys
from car_runtime import CarRuntime

rt = CarRuntime()
run = json.loads(rt.runs_start(json.dumps({"intent": "refactor", "agent_name": "Bot"})))
turns = [{"prompt": "read", "tool": "fs.read", "parameters": {"path": "a.py"}}, {"output": "ok"}]
recorded = json.loads(
    rt.daemon_call("runs.record_turns", json.dumps({"run_id": run["run_id"], "turns": turns}))
)
outcome = {"status": "success", "summary": "refactored"}
done = json.loads(rt.runs_complete(json.dumps({"run_id": run["run_id"], "outcome": outcome})))
print(json.dumps({"run": run, "recorded": recorded, "done": done}))
"""


async def test_car_runtime_records_a_run(peers: Peers) -> None:
    token = await peers.state.agent_tokens.add("bot")
    env = cli_env(
        CAR_DAEMON_URL=peers.url,
        CAR_AGENT_ID="bot",
        CAR_AGENT_TOKEN=token,
        CAR_NO_VERSION_WARNING="1",
        CAR_DAEMON_TIMEOUT="20",
    )
    async with launch([sys.executable, "-c", CAR_RUNTIME_AGENT], env=env, stdout=True) as agent:
        code, out = await agent.output(45)
    assert code == 0, agent.log
    seen = json.loads(out.strip().splitlines()[-1])
    run_id = seen["run"]["run_id"]
    assert seen == {
        "run": {"run_id": run_id, "agent_id": "bot"},
        "recorded": {"run_id": run_id, "base_index": 0, "count": 2, "ok": True},
        "done": {"run_id": run_id, "ok": True},
    }

    boss = await peers.host_role()
    records = (await boss.result("runs.get_trace", {"run_id": run_id}))["records"]
    assert [r["record"] for r in records] == ["started", "turn", "turn", "ended"]
    assert records[1]["parameters"] == {"path": "a.py"}
    assert (records[3]["status"], records[3]["outcome"]["summary"]) == ("completed", "refactored")


# ---------------------------------------------------------------- a slow subscriber


async def test_a_subscriber_that_stops_reading_slows_no_one(tmp_path: Path) -> None:
    """Over WebSocket a slow reader is met with backpressure: the gateway stops reading
    its core stream, and the core's per-subscriber queue drops the oldest events. The
    writer and the other subscriber go on at full speed; when the slow subscriber reads
    again it sees a cursor gap, and re-subscribing gives it a complete snapshot."""
    config = make_config(
        tmp_path,
        ws_outbound_queue=16,
        ws_write_limit=16 * 1024,
        session_outbound_queue=16,
        run_subscriber_queue=32,
    )
    async with running(config) as served:
        peers = Peers(*served)
        try:
            await _slow_ws_subscriber(peers, served[1])
        finally:
            for peer in peers.opened:
                await peer.close()


async def _slow_ws_subscriber(peers: Peers, gateway: Gateway) -> None:
    bot = await peers.agent()
    fast = await peers.host_role()
    run_id = await start(bot)
    slow = await RawWebSocket.open("127.0.0.1", gateway.ws_port, rcvbuf=4096)
    requests = [
        ("session.auth", {"host_token": peers.tokens.host}),
        ("server.handshake", {"protocol_version": 3}),
        ("runs.subscribe", {"run_id": run_id}),
    ]
    for n, (method, params) in enumerate(requests):
        await slow.send_text({"jsonrpc": "2.0", "id": n, "method": method, "params": params})
        assert "result" in json.loads((await slow.read_frame())[1])
    await fast.result("runs.subscribe", {"run_id": run_id})
    # From here on the slow subscriber reads nothing.

    drops = peers.state.metrics.queue_drops
    # 32 KiB events, so that every buffer on the way fills up soon.
    big = [{"prompt": "p" * 16000, "output": "o" * 16000}]
    batch = 16  # within the fast subscriber's queue: it never drops
    total = 0

    async def record() -> None:
        nonlocal total
        answer = await bot.result("runs.record_turns", {"run_id": run_id, "turns": big * batch})
        assert (answer["ok"], answer["base_index"]) == (True, total)
        # The fast subscriber has every event, in order, before the next batch.
        cursors = [(await fast.expect_notification(TRACE_EVENT))["cursor"] for _ in range(batch)]
        assert cursors == list(range(total + 1, total + batch + 1))
        total += batch

    # Record until the core drops events for the slow subscriber (every buffer on its way
    # is full), then once more: the writer is not held up.
    while drops.value("run_subscriber") == 0:
        assert total < 1900, "the slow subscriber never lost an event"
        await record()
    await record()

    # The slow subscriber reads again: a gap-free start, a jump, and the newest event.
    seen: list[int] = []
    while not seen or seen[-1] != total:
        note = json.loads((await slow.read_frame())[1])
        assert note["method"] == "runs.trace.event"
        seen.append(note["params"]["cursor"])
    assert seen == sorted(seen) and len(seen) < total
    assert seen[0] == 1 and any(b - a > 1 for a, b in itertools.pairwise(seen))
    # It re-subscribes and gets everything.
    await slow.send_text(
        {"jsonrpc": "2.0", "id": 9, "method": "runs.subscribe", "params": {"run_id": run_id}}
    )
    snapshot = json.loads((await slow.read_frame())[1])["result"]
    assert (snapshot["cursor"], snapshot["status"]) == (total, "in_progress")
    assert [t["index"] for t in snapshot["turns_so_far"]] == list(range(total))
    await bot.result("runs.complete", {"run_id": run_id, "outcome": {"status": "ok"}})
    ended = await fast.expect_notification(TRACE_EVENT)
    assert (ended["record"]["record"], ended["cursor"]) == ("ended", total)
    ended = json.loads((await slow.read_frame())[1])["params"]
    assert (ended["record"]["record"], ended["cursor"]) == ("ended", total)
    slow.close()


async def test_a_recorder_that_leaves_before_its_answer_still_fans_its_turns_out(
    peers: Peers,
) -> None:
    """A batch's events go out after its answer is on its way (the recorder's answer does
    not wait for the fan-out); a recorder that leaves before its answer does not keep
    them back: the host gets an event for every turn that was committed, then `ended`."""
    bot = await peers.agent()
    watcher = await peers.host_role()
    for _ in range(3):
        run_id = await start(bot)
        await watcher.result("runs.subscribe", {"run_id": run_id})
        request = {"run_id": run_id, "turns": turns(256)}
        await bot.send(
            {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns", "params": request}
        )
        bot.drop()
        cursors = []
        while (event := await watcher.expect_notification(TRACE_EVENT))["record"][
            "record"
        ] == "turn":
            cursors.append(event["cursor"])
        assert event["status"] == "incomplete"
        trace = await watcher.result("runs.get_trace", {"run_id": run_id})
        committed = sum(1 for r in trace["records"] if r["record"] == "turn")
        assert committed in (0, 256)  # a batch is appended whole or not at all
        assert cursors == list(range(1, committed + 1))
        bot = await peers.agent()


async def test_a_writer_that_leaves_before_its_answer_does_not_hold_back_a_live_run(
    peers: Peers,
) -> None:
    """As above, but the batch comes from a second session of the run's agent, which
    closes right after sending it, while the run's owner stays: nothing ends the run to
    release what was held, and the host still gets an event for every turn at once."""
    owner = await peers.agent()
    watcher = await peers.host_role()
    run_id = await start(owner)
    await watcher.result("runs.subscribe", {"run_id": run_id})
    for round_ in range(3):
        writer = await peers.agent()
        request = {"run_id": run_id, "turns": turns(256)}
        await writer.send(
            {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns", "params": request}
        )
        await writer.ws.close()  # the request is read before the close: it is committed
        events = [await watcher.expect_notification(TRACE_EVENT) for _ in range(256)]
        assert [e["record"]["record"] for e in events] == ["turn"] * 256
        assert [e["cursor"] for e in events] == list(range(256 * round_ + 1, 256 * round_ + 257))
