"""Runs over time: disconnects, slow subscribers, and RunService (typed RPCs, WatchRun)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import errors_pb2, runs_pb2, runs_pb2_grpc, session_pb2
from car_grpc.wire.errors import ERROR_TRAILER, INVALID_PARAMS
from tests.bounded import stopped
from tests.conftest import make_config
from tests.roles import agent, host_role
from tests.runs_helpers import (
    complete,
    next_event,
    record,
    start,
    state_of,
    summaries,
    trace,
    turns,
    wait_for_status,
)
from tests.ws_helpers import running_core

IN_PROGRESS = runs_pb2.RUN_STATUS_IN_PROGRESS
COMPLETED = runs_pb2.RUN_STATUS_COMPLETED
INCOMPLETE = runs_pb2.RUN_STATUS_INCOMPLETE
STARTED = runs_pb2.RUN_RECORD_KIND_STARTED
TURN = runs_pb2.RUN_RECORD_KIND_TURN
ENDED = runs_pb2.RUN_RECORD_KIND_ENDED


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, run_complete_grace=0.05)


# ---------------------------------------------------------------- disconnects


async def test_disconnect_makes_the_run_incomplete(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    boss = await host_role(core, channel)
    run_id = await start(bot)
    assert (await record(bot, run_id, turns(3))).ok
    await bot.close()

    await wait_for_status(boss, "bot", run_id, INCOMPLETE)
    got = await trace(boss, run_id)
    assert [r.record for r in got.records] == [STARTED, TURN, TURN, TURN, ENDED]
    ended = got.records[-1].ended
    assert ended.status == INCOMPLETE and not ended.HasField("outcome")

    back = await agent(core, channel, "bot")
    assert (await record(back, run_id, turns(1))).dropped == runs_pb2.RUN_DROP_REASON_RUN_TERMINAL


async def test_a_complete_in_flight_wins_over_the_disconnect(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    boss = await host_role(core, channel)
    run_id = await start(bot)
    frame = session_pb2.ClientFrame(id="last-words")
    frame.runs_complete.run_id = run_id
    frame.runs_complete.outcome.status = "success"
    await bot.send(frame)
    await bot.close()  # without waiting for the answer

    await wait_for_status(boss, "bot", run_id, COMPLETED)
    records = (await trace(boss, run_id)).records
    assert [r.record for r in records] == [STARTED, ENDED]
    assert records[-1].ended.outcome.status == "success"


async def test_resuming_within_the_grace_keeps_the_run(
    tmp_path: Path,
) -> None:
    # A grace long enough to reconnect in, on any machine.
    async with (
        running_core(make_config(tmp_path, run_complete_grace=0.5).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        first = await agent(core, channel, "bot")
        kept = await start(first, idempotency_key="kept")
        dropped = await start(first, idempotency_key="dropped")
        await first.close()

        again = await agent(core, channel, "bot")
        assert await start(again, idempotency_key="kept") == "kept"
        # Both graces began together; once one has fired the other has too.
        await wait_for_status(again, "bot", dropped, INCOMPLETE)
        statuses = {s.run_id: s.status for s in await summaries(again, "bot")}
        assert statuses == {"kept": IN_PROGRESS, "dropped": INCOMPLETE}
        assert (await record(again, kept, turns(1))).ok


async def test_stop_ends_open_runs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    core = Core(config.core)
    await core.start()
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        bot = await agent(core, channel, "bot")
        run_id = await start(bot)
        await record(bot, run_id, turns(2))
    await stopped(core.stop(grace=0))

    async with (
        running_core(config.core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        boss = await host_role(core, channel)
        got = await trace(boss, run_id)
        assert [r.record for r in got.records] == [STARTED, TURN, TURN, ENDED]
        assert got.records[-1].ended.status == INCOMPLETE


# ---------------------------------------------------------------- a slow subscriber


async def test_a_subscriber_that_stops_reading_slows_no_one(tmp_path: Path) -> None:
    config = make_config(tmp_path, session_outbound_queue=32, run_subscriber_queue=32)
    async with (
        running_core(config.core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
        # Its own connection, as a separate client would have, whose receive window
        # stays at its initial 64 KiB (no BDP probing): what it does not read backs up.
        grpc.aio.insecure_channel(
            core.grpc_address, options=[("grpc.http2.bdp_probe", 0)]
        ) as slow_channel,
    ):
        await _slow_subscriber_scenario(core, channel, slow_channel)


async def _slow_subscriber_scenario(
    core: Core, channel: grpc.aio.Channel, slow_channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    fast = await host_role(core, channel)
    slow = await host_role(core, slow_channel)
    run_id = await start(bot)
    subscribe = runs_pb2.SubscribeRunRequest(run_id=run_id)
    await fast.request("runs_subscribe", subscribe)
    await slow.request("runs_subscribe", subscribe)
    slow.pause_reading()

    prompt = "x" * 1024  # 2000 events of 1 KiB: far more than the buffers on the way
    for batch in range(100):
        reply = await record(bot, run_id, turns(20, prompt=prompt))
        assert (reply.ok, reply.base_index) == (True, batch * 20)
        # The fast subscriber has every event, in order, before the next batch.
        cursors = [(await next_event(fast)).cursor for _ in range(20)]
        assert cursors == list(range(batch * 20 + 1, batch * 20 + 21))
    # The writer and the fast subscriber are done; the slow one has read nothing since it
    # paused (but the one frame its reader was already waiting for).
    assert slow.notifications.qsize() <= 1

    slow.resume_reading()
    seen: list[int] = []
    while not seen or seen[-1] != 2000:  # the newest event always arrives
        seen.append((await next_event(slow)).cursor)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert len(seen) < 2000  # events were dropped: a visible gap
    assert any(b - a > 1 for a, b in zip([0, *seen], seen, strict=False))

    snap = await slow.request("runs_subscribe", subscribe)
    assert (snap.cursor, snap.status) == (2000, IN_PROGRESS)
    assert [t.index for t in snap.turns_so_far] == list(range(2000))
    await complete(bot, run_id)
    for client in (fast, slow):
        ended = await next_event(client)
        assert (ended.record.record, ended.cursor, ended.status) == (ENDED, 2000, COMPLETED)


# ---------------------------------------------------------------- RunService


Metadata = tuple[tuple[str, str], ...]


def _bearer(token: str, agent_id: str | None = None) -> Metadata:
    meta = (("authorization", f"Bearer {token}"),)
    return (*meta, ("car-agent-id", agent_id)) if agent_id else meta


def _error_of(err: grpc.aio.AioRpcError) -> errors_pb2.Error:
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_TRAILER:
            assert isinstance(value, bytes)
            return errors_pb2.Error.FromString(value)
    raise AssertionError(f"no {ERROR_TRAILER} trailer")


async def _watch(
    stub: runs_pb2_grpc.RunServiceAsyncStub, meta: Metadata, run_id: str, cursor: int = 0
) -> AsyncIterator[runs_pb2.WatchRunResponse]:
    call = stub.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id, cursor=cursor), metadata=meta)
    async for item in call:
        yield item


async def _read(call: grpc.aio.UnaryStreamCall[Any, Any]) -> runs_pb2.WatchRunResponse:
    item = await call.read()
    assert isinstance(item, runs_pb2.WatchRunResponse), item
    return item


async def test_unary_rpcs_as_the_agent(core: Core, channel: grpc.aio.Channel) -> None:
    token = await state_of(core).agent_tokens.add("bot")
    meta = _bearer(token, "bot")
    stub = runs_pb2_grpc.RunServiceStub(channel)
    started = await stub.StartRun(runs_pb2.StartRunRequest(intent="typed"), metadata=meta)
    assert started.agent_id == "bot"
    run_id = started.run_id
    reply = await stub.RecordTurns(
        runs_pb2.RecordTurnsRequest(run_id=run_id, turns=turns(2)), metadata=meta
    )
    assert (reply.ok, reply.base_index, reply.count) == (True, 0, 2)

    host_meta = _bearer(state_of(core).tokens.host)
    by_host = await stub.RecordTurns(
        runs_pb2.RecordTurnsRequest(run_id=run_id, turns=turns(1)), metadata=host_meta
    )
    assert by_host.dropped == runs_pb2.RUN_DROP_REASON_RUN_NOT_FOUND
    listed = await stub.ListRuns(runs_pb2.ListRunsRequest(agent_id="bot"), metadata=host_meta)
    # One-call sessions own no connection: their runs stay open after the call.
    assert [(s.run_id, s.status, s.turn_count) for s in listed.runs] == [(run_id, IN_PROGRESS, 2)]

    await stub.CompleteRun(
        runs_pb2.CompleteRunRequest(run_id=run_id, outcome=runs_pb2.RunOutcome(status="ok")),
        metadata=meta,
    )
    got = await stub.GetTrace(runs_pb2.GetTraceRequest(run_id=run_id, cursor=3), metadata=meta)
    assert [r.record for r in got.records] == [ENDED] and got.cursor == 4

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordTurns(runs_pb2.RecordTurnsRequest(run_id=run_id), metadata=meta)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_of(err.value).code == INVALID_PARAMS


async def test_watch_run_resumes_from_a_cursor_exactly_once(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    await record(bot, run_id, turns(4))
    stub = runs_pb2_grpc.RunServiceStub(channel)
    meta = _bearer(state_of(core).tokens.host)

    seen: list[tuple[int, int, int]] = []  # (cursor, kind, turn index)

    def note(item: runs_pb2.WatchRunResponse) -> None:
        assert (item.run_id, item.agent_id) == (run_id, "bot")
        seen.append((item.cursor, item.record.record, item.record.turn.index))

    # A first connection reads three records, then goes away.
    call = stub.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id), metadata=meta)
    for _ in range(3):
        note(await _read(call))
    call.cancel()

    # More is written while no one watches.
    await record(bot, run_id, turns(3))
    resumed = stub.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id, cursor=3), metadata=meta)
    for _ in range(5):  # the rest of the stored records
        item = await _read(resumed)
        assert item.status == IN_PROGRESS
        note(item)
    await record(bot, run_id, turns(2))  # live ones
    for _ in range(2):
        note(await _read(resumed))
    await complete(bot, run_id)
    last = await _read(resumed)
    note(last)
    assert (last.status, last.record.ended.outcome.status) == (COMPLETED, "success")
    assert await resumed.read() == grpc.aio.EOF  # the stream ends after `ended`

    kinds = [STARTED] + [TURN] * 9 + [ENDED]
    assert [s[0] for s in seen] == list(range(1, 12))
    assert [s[1] for s in seen] == kinds
    assert [s[2] for s in seen[1:10]] == list(range(9))

    # An ended run replays from any cursor and ends.
    replay = [i.cursor async for i in _watch(stub, meta, run_id, cursor=9)]
    assert replay == [10, 11]


async def test_watch_run_refuses_unknown_forbidden_and_bad_cursors(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    stub = runs_pb2_grpc.RunServiceStub(channel)
    intruder = _bearer(await state_of(core).agent_tokens.add("intruder"), "intruder")
    boss = _bearer(state_of(core).tokens.host)

    messages = []
    for meta, target, cursor, status in (
        (intruder, run_id, 0, grpc.StatusCode.NOT_FOUND),
        (boss, "nope", 0, grpc.StatusCode.NOT_FOUND),
        (boss, run_id, 5, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [i async for i in _watch(stub, meta, target, cursor)]
        assert err.value.code() == status
        messages.append(_error_of(err.value).message)
    assert messages[0] == f"invalid params: unknown run {run_id!r}: run_id"
    assert messages[1] == "invalid params: unknown run 'nope': run_id"
    assert "cursor" in messages[2]


async def test_a_slow_watcher_is_served_from_the_store(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    stub = runs_pb2_grpc.RunServiceStub(channel)
    call = stub.WatchRun(
        runs_pb2.WatchRunRequest(run_id=run_id), metadata=_bearer(state_of(core).tokens.host)
    )
    first = await _read(call)
    assert first.cursor == 1
    # The watcher reads nothing while 2000 turns are written: the writer is not held up.
    for _ in range(8):
        assert (await record(bot, run_id, turns(250, prompt="y" * 1024))).ok
    await complete(bot, run_id)

    cursors = [first.cursor]
    while (item := await call.read()) != grpc.aio.EOF:
        assert isinstance(item, runs_pb2.WatchRunResponse)
        cursors.append(item.cursor)
    assert cursors == list(range(1, 2003))
