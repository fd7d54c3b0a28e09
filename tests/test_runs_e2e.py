"""Runs end to end (docs/protocol.md §4): a real core on loopback, sessions over Connect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from car_grpc.core.run_turns import FIELD_CAP, TRUNCATED, TURN_REPLACED
from car_grpc.core.runs import RECORD_TURNS_USAGE
from car_grpc.core.server import Core
from car_grpc.v1 import runs_pb2, runs_pb2_grpc
from car_grpc.wire.codec import message_to_json, to_value, value_to_json
from car_grpc.wire.errors import INTERNAL, INVALID_PARAMS, CarError
from tests.conftest import make_config
from tests.error_details import error_info
from tests.roles import agent, host_role, ordinary
from tests.runs_helpers import (
    complete,
    next_event,
    record,
    start,
    state_of,
    summaries,
    trace,
    turns,
)
from tests.ws_helpers import running_core

IN_PROGRESS = runs_pb2.RUN_STATUS_IN_PROGRESS
COMPLETED = runs_pb2.RUN_STATUS_COMPLETED
STARTED = runs_pb2.RUN_RECORD_KIND_STARTED
TURN = runs_pb2.RUN_RECORD_KIND_TURN
ENDED = runs_pb2.RUN_RECORD_KIND_ENDED
NOT_FOUND = runs_pb2.RUN_DROP_REASON_RUN_NOT_FOUND
TERMINAL = runs_pb2.RUN_DROP_REASON_RUN_TERMINAL
TURN_LIMIT = runs_pb2.RUN_DROP_REASON_RUN_TURN_LIMIT
TOO_LARGE = runs_pb2.RUN_DROP_REASON_TURN_TOO_LARGE


# ---------------------------------------------------------------- runs.start


async def test_agent_id_is_explicit_then_attached_then_named(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    plain = await ordinary(core, channel)

    explicit = await plain.request(
        "runs_start", runs_pb2.StartRunRequest(intent="i", agent_id="other", agent_name="N")
    )
    attached = await bot.request("runs_start", runs_pb2.StartRunRequest(intent="i", agent_name="N"))
    named = await plain.request(
        "runs_start", runs_pb2.StartRunRequest(intent="i", agent_name="My Agent 2!")
    )
    assert (explicit.agent_id, attached.agent_id, named.agent_id) == (
        "other",
        "bot",
        "name:my-agent-2",
    )
    assert len({explicit.run_id, attached.run_id, named.run_id}) == 3

    with pytest.raises(CarError) as err:
        await plain.request("runs_start", runs_pb2.StartRunRequest(intent="i"))
    assert err.value.code == INVALID_PARAMS
    assert "agent_id" in err.value.message
    with pytest.raises(CarError) as err:
        await plain.request("runs_start", runs_pb2.StartRunRequest(intent="i", agent_name="!!"))
    assert err.value.code == INVALID_PARAMS and "agent_id" in err.value.message
    with pytest.raises(CarError) as err:
        await bot.request("runs_start", runs_pb2.StartRunRequest())
    assert err.value.code == INVALID_PARAMS and "intent" in err.value.message


async def test_start_makes_the_run_current_and_appends_started(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot, "fix the bug", outcome_description="tests pass")
    assert state_of(core).registry.attached["bot"].current_run == run_id

    got = await trace(bot, run_id)
    assert got.agent_id == "bot" and got.cursor == 1
    [started] = got.records
    assert started.record == STARTED and started.timestamp > 0
    assert message_to_json(started.started) == {
        "run_id": run_id,
        "agent_id": "bot",
        "intent": "fix the bug",
        "outcome_description": "tests pass",
    }


async def test_idempotency_key_returns_the_live_or_stored_run(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    first = await start(bot, idempotency_key="mission-7")
    again = await start(bot, idempotency_key="mission-7")
    assert first == again == "mission-7"
    other = await start(bot)
    assert state_of(core).registry.attached["bot"].current_run == other

    await complete(bot, "mission-7")  # now stored only
    bot2 = await agent(core, channel, "bot")
    stored = await bot2.request(
        "runs_start", runs_pb2.StartRunRequest(intent="again", idempotency_key="mission-7")
    )
    assert (stored.run_id, stored.agent_id) == ("mission-7", "bot")
    assert state_of(core).registry.attached["bot"].current_run == "mission-7"

    records = (await trace(bot2, "mission-7")).records
    assert [r.record for r in records] == [STARTED, ENDED]  # no second `started`
    assert [s.run_id for s in await summaries(bot2, "bot")].count("mission-7") == 1


async def test_concurrent_starts_with_one_key_make_one_run(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    ids = await asyncio.gather(*(start(bot, idempotency_key="k") for _ in range(10)))
    assert set(ids) == {"k"}
    assert [s.run_id for s in await summaries(bot, "bot")] == ["k"]


async def test_an_agent_cannot_take_over_another_agents_run(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bob = await agent(core, channel, "bob")
    alice = await agent(core, channel, "alice")
    run_id = await start(bob, idempotency_key="bobs-mission")

    with pytest.raises(CarError) as as_bob:
        await start(alice, agent_id="bob")
    assert as_bob.value.code == INVALID_PARAMS
    assert "agent_id does not match the attached agent" in as_bob.value.message
    with pytest.raises(CarError) as resumed:
        await start(alice, idempotency_key=run_id)
    assert resumed.value.code == INVALID_PARAMS
    assert "idempotency_key names a run this session may not resume" in resumed.value.message

    await alice.close()
    await asyncio.sleep(state_of(core).config.run_complete_grace * 3)
    assert (await record(bob, run_id, turns(1))).ok  # still bob's, still open
    assert (await summaries(bob, "bob"))[0].status == IN_PROGRESS


async def test_a_plain_session_completes_the_run_it_started_and_nobody_else_does(
    core: Core, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    script = await ordinary(core, channel)
    other = await ordinary(core, channel)
    run_id = await start(script, agent_name="demo", idempotency_key="one-shot")

    with pytest.raises(CarError) as foreign:
        await complete(other, run_id)
    assert foreign.value.message == f"invalid params: unknown run {run_id!r}: run_id"
    with pytest.raises(CarError) as resumed:
        await start(other, agent_name="demo", idempotency_key=run_id)
    assert "may not resume" in resumed.value.message
    # A client's mistake is not a server error: nothing at ERROR in the log.
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text

    assert await start(script, agent_name="demo", idempotency_key=run_id) == run_id  # its own
    await complete(script, run_id)
    boss = await host_role(core, channel)
    assert (await summaries(boss, "name:demo"))[0].status == COMPLETED


# ---------------------------------------------------------------- runs.complete


async def test_complete_appends_ended_and_refuses_a_second_time(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    outcome = runs_pb2.RunOutcome(status="success", summary="done", timestamp=123)
    outcome.evidence.CopyFrom(to_value(["log.txt"]))
    await bot.request("runs_complete", runs_pb2.CompleteRunRequest(run_id=run_id, outcome=outcome))

    got = await trace(bot, run_id)
    ended = got.records[-1]
    assert ended.record == ENDED
    assert ended.ended.status == COMPLETED
    assert message_to_json(ended.ended.outcome) == {
        "status": "success",
        "summary": "done",
        "evidence": ["log.txt"],
        "timestamp": 123,
    }
    [summary] = await summaries(bot, "bot")
    assert summary.status == COMPLETED and summary.HasField("ended_at")

    with pytest.raises(CarError) as err:
        await complete(bot, run_id)
    assert err.value.code == INTERNAL
    assert "already ended (completed)" in err.value.message


async def test_complete_of_unknown_or_foreign_run_is_the_same_error(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    intruder = await agent(core, channel, "intruder")
    boss = await host_role(core, channel)
    run_id = await start(bot)

    errors = []
    for client, target in ((bot, "no-such-run"), (intruder, run_id), (boss, run_id)):
        with pytest.raises(CarError) as err:
            await complete(client, target)
        errors.append((err.value.code, err.value.message.replace(target, "<id>")))
    assert errors == [(INVALID_PARAMS, "invalid params: unknown run '<id>': run_id")] * 3

    with pytest.raises(CarError) as err:
        await bot.request("runs_complete", runs_pb2.CompleteRunRequest(run_id=run_id))
    assert err.value.code == INVALID_PARAMS and "outcome" in err.value.message
    assert (await summaries(bot, "bot"))[0].status == IN_PROGRESS


# ---------------------------------------------------------------- runs.record_turns


async def test_turns_are_appended_and_restamped(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    first = await record(bot, run_id, turns(3, index=77))
    second = await record(bot, run_id, [runs_pb2.RunTurn(tool="shell", verifier_verdict="passed")])
    assert message_to_json(first) == {"run_id": run_id, "base_index": 0, "count": 3, "ok": True}
    assert (second.base_index, second.count, second.ok) == (3, 1, True)

    got = await trace(bot, run_id)
    assert [r.record for r in got.records] == [STARTED, TURN, TURN, TURN, TURN]
    assert [r.turn.index for r in got.records[1:]] == [0, 1, 2, 3]
    assert [r.turn.prompt for r in got.records[1:4]] == ["p0", "p1", "p2"]
    assert [r.turn.verifier_verdict for r in got.records[1:]] == ["not_run"] * 3 + ["passed"]
    assert (await summaries(bot, "bot"))[0].turn_count == 4


@pytest.mark.parametrize(
    ("run_id", "count", "field"),
    [("", 1, "run_id"), ("r", 0, "turns"), ("r", 257, "turns")],
)
async def test_record_turns_validation(
    core: Core, channel: grpc.aio.Channel, run_id: str, count: int, field: str
) -> None:
    bot = await agent(core, channel, "bot")
    real = await start(bot, idempotency_key="r")
    with pytest.raises(CarError) as err:
        await record(bot, run_id, turns(count))
    assert err.value.code == INVALID_PARAMS
    assert err.value.message == RECORD_TURNS_USAGE
    assert err.value.data is not None and value_to_json(err.value.data) == {"field": field}
    assert (await trace(bot, real)).cursor == 1  # nothing appended


async def test_record_turns_accepts_exactly_256(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    reply = await record(bot, run_id, turns(256))
    assert (reply.ok, reply.count) == (True, 256)


async def test_long_fields_are_truncated(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    long = "a" * (FIELD_CAP * 2)
    turn = runs_pb2.RunTurn(prompt=long)
    turn.parameters.CopyFrom(to_value({"path": long, "n": 3}))
    turn.output.string_value = long
    assert (await record(bot, run_id, [turn])).ok

    stored = (await trace(bot, run_id)).records[1].turn
    capped = "a" * FIELD_CAP + TRUNCATED
    assert stored.prompt == capped
    assert value_to_json(stored.parameters) == {"path": capped, "n": 3}
    assert stored.output.string_value == capped


async def test_turn_over_256_kib(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    big = runs_pb2.RunTurn(prompt="p", tool="search")
    big.output.CopyFrom(to_value([{"chunk": "o" * 10_000} for _ in range(40)]))  # ~400 KiB
    reply = await record(bot, run_id, [runs_pb2.RunTurn(prompt="small"), big])
    assert (reply.ok, reply.count) == (True, 2)
    stored = (await trace(bot, run_id)).records[2].turn
    assert stored.tool == "search"
    assert stored.prompt == TURN_REPLACED
    assert value_to_json(stored.parameters) == TURN_REPLACED
    assert value_to_json(stored.output) == TURN_REPLACED

    # Too big even then: the whole batch is dropped.
    hopeless = runs_pb2.RunTurn()
    hopeless.cli_outcome.string_value = "c" * (300 * 1024)
    dropped = await record(bot, run_id, [runs_pb2.RunTurn(prompt="fine"), hopeless])
    assert message_to_json(dropped) == {
        "run_id": run_id,
        "base_index": 0,
        "count": 0,
        "ok": False,
        "dropped": "turn_too_large",
    }
    assert (await trace(bot, run_id)).cursor == 3


async def test_writes_are_for_the_owning_agent_only(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    intruder = await agent(core, channel, "intruder")
    boss = await host_role(core, channel)
    plain = await ordinary(core, channel)
    run_id = await start(bot)

    unknown = await record(bot, "no-such-run", turns(1))
    answers = [await record(c, run_id, turns(1)) for c in (intruder, boss, plain)]
    assert [(a.ok, a.dropped, a.count, a.base_index) for a in [unknown, *answers]] == [
        (False, NOT_FOUND, 0, 0)
    ] * 4
    # A host-role session started by the same client still cannot write the agent's run.
    assert (await trace(boss, run_id)).cursor == 1


async def test_writes_to_an_ended_run_are_refused(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    intruder = await agent(core, channel, "intruder")
    run_id = await start(bot)
    await complete(bot, run_id)
    assert (await record(bot, run_id, turns(1))).dropped == TERMINAL
    # Not the owner: the same answer as for an unknown run, ended or not.
    assert (await record(intruder, run_id, turns(1))).dropped == NOT_FOUND


async def test_pipelined_batches_reach_exactly_2000(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    replies = await asyncio.gather(*(record(bot, run_id, turns(200)) for _ in range(15)))

    accepted = [r for r in replies if r.ok]
    refused = [r for r in replies if not r.ok]
    assert len(accepted) == 10
    assert sorted(r.base_index for r in accepted) == list(range(0, 2000, 200))
    assert {(r.dropped, r.count) for r in refused} == {(TURN_LIMIT, 0)}

    got = await trace(bot, run_id, cursor=1)
    assert [r.turn.index for r in got.records] == list(range(2000))
    assert (await record(bot, run_id, turns(1))).dropped == TURN_LIMIT


async def test_a_batch_that_would_pass_2000_is_refused_whole(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    for _ in range(7):
        assert (await record(bot, run_id, turns(256))).ok
    assert (await record(bot, run_id, turns(206))).ok  # 1998
    assert (await record(bot, run_id, turns(3))).dropped == TURN_LIMIT
    last = await record(bot, run_id, turns(2))
    assert (last.ok, last.base_index) == (True, 1998)
    assert (await summaries(bot, "bot"))[0].turn_count == 2000


# ---------------------------------------------------------------- readers


async def test_list_is_newest_first_and_for_readers_only(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    intruder = await agent(core, channel, "intruder")
    boss = await host_role(core, channel)
    plain = await ordinary(core, channel)
    ids = [await start(bot, f"intent {i}") for i in range(3)]
    await record(bot, ids[1], turns(2))
    await complete(bot, ids[0])

    mine = await summaries(bot, "bot")
    assert [s.run_id for s in mine] == ids[::-1]
    assert [(s.intent, s.status, s.turn_count) for s in mine] == [
        ("intent 2", IN_PROGRESS, 0),
        ("intent 1", IN_PROGRESS, 2),
        ("intent 0", COMPLETED, 0),
    ]
    assert [s.run_id for s in await summaries(boss, "bot")] == ids[::-1]
    assert await summaries(intruder, "bot") == []
    assert await summaries(plain, "bot") == []
    assert await summaries(bot, "nobody") == []


async def test_get_trace_pages_with_cursor_and_limit(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    await record(bot, run_id, turns(5))
    await complete(bot, run_id)

    whole = await trace(bot, run_id)
    assert [r.record for r in whole.records] == [STARTED] + [TURN] * 5 + [ENDED]
    assert whole.cursor == 7

    pages, cursor = [], 0
    while True:
        page = await trace(bot, run_id, cursor=cursor, limit=3)
        if not page.records:
            break
        pages.append([r.record for r in page.records])
        cursor = page.cursor
    assert pages == [[STARTED, TURN, TURN], [TURN, TURN, TURN], [ENDED]]
    assert cursor == 7
    empty = await trace(bot, run_id, cursor=2, limit=0)
    assert (list(empty.records), empty.cursor) == ([], 2)


async def test_get_trace_answers_not_found_for_unknown_and_forbidden(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    intruder = await agent(core, channel, "intruder")
    plain = await ordinary(core, channel)
    boss = await host_role(core, channel)
    run_id = await start(bot)

    answers = [
        message_to_json(await trace(intruder, run_id)),
        message_to_json(await trace(plain, run_id)),
        message_to_json(await trace(bot, "no-such-run")),
    ]
    assert answers[0] == answers[1] == {"run_id": run_id, "records": [], "not_found": True}
    assert answers[2] == {"run_id": "no-such-run", "records": [], "not_found": True}
    assert (await trace(boss, run_id)).agent_id == "bot"

    # The typed RPC answers the same refusal idiomatically: NOT_FOUND.
    stub = runs_pb2_grpc.RunServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as typed:
        await stub.GetTrace(
            runs_pb2.GetTraceRequest(run_id=run_id),
            metadata=(("authorization", f"Bearer {state_of(core).tokens.daemon}"),),
        )
    assert typed.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(typed.value).reason == "NOT_FOUND"


async def test_subscribe_snapshot_then_events(core: Core, channel: grpc.aio.Channel) -> None:
    bot = await agent(core, channel, "bot")
    watcher = await host_role(core, channel)
    run_id = await start(bot)
    await record(bot, run_id, turns(2))

    snap = await watcher.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    assert (snap.run_id, snap.agent_id, snap.cursor, snap.status) == (run_id, "bot", 2, IN_PROGRESS)
    assert [t.prompt for t in snap.turns_so_far] == ["p0", "p1"]
    assert [t.index for t in snap.turns_so_far] == [0, 1]

    await record(bot, run_id, turns(3, prompt="q"))
    events = [await next_event(watcher) for _ in range(3)]
    assert [(e.cursor, e.record.turn.prompt, e.record.turn.index) for e in events] == [
        (3, "q0", 2),
        (4, "q1", 3),
        (5, "q2", 4),
    ]
    assert {(e.run_id, e.agent_id, e.status, e.record.record) for e in events} == {
        (run_id, "bot", IN_PROGRESS, TURN)
    }
    await complete(bot, run_id)
    ended = await next_event(watcher)
    assert (ended.record.record, ended.status, ended.cursor) == (ENDED, COMPLETED, 5)
    assert ended.record.ended.outcome.status == "success"


async def test_subscribe_is_for_readers_and_unsubscribe_stops_events(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    intruder = await agent(core, channel, "intruder")
    run_id = await start(bot)
    for target in (run_id, "no-such-run"):
        with pytest.raises(CarError) as err:
            await intruder.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=target))
        assert err.value.code == INVALID_PARAMS
        assert err.value.message == f"invalid params: unknown run {target!r}: run_id"

    await bot.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    removed = await bot.request("runs_unsubscribe", runs_pb2.UnsubscribeRunRequest(run_id=run_id))
    again = await bot.request("runs_unsubscribe", runs_pb2.UnsubscribeRunRequest(run_id=run_id))
    assert (removed.removed, again.removed) == (True, False)
    await record(bot, run_id, turns(1))
    await complete(bot, run_id)
    assert bot.notifications.empty()


async def test_subscribe_to_an_ended_run_is_a_snapshot(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    run_id = await start(bot)
    await record(bot, run_id, turns(4))
    await complete(bot, run_id)
    snap = await bot.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    assert (len(snap.turns_so_far), snap.cursor, snap.status) == (4, 4, COMPLETED)


async def test_subscribe_while_appending_has_no_gap_and_no_duplicate(
    core: Core, channel: grpc.aio.Channel
) -> None:
    bot = await agent(core, channel, "bot")
    watcher = await host_role(core, channel)
    run_id = await start(bot)

    # 40 batches in flight; the subscribe lands once the first is in, among the others.
    writes = [asyncio.create_task(record(bot, run_id, turns(10))) for _ in range(40)]
    await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
    snap = await watcher.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
    assert all(r.ok for r in await asyncio.gather(*writes))
    assert snap.cursor >= 10
    await complete(bot, run_id)

    seen = list(range(1, snap.cursor + 1))
    while True:
        event = await next_event(watcher)
        if event.record.record == ENDED:
            break
        seen.append(event.cursor)
        assert event.record.turn.index == event.cursor - 1
    assert seen == list(range(1, 401))


async def test_a_session_holds_a_bounded_number_of_run_subscriptions(tmp_path: Path) -> None:
    async with (
        running_core(make_config(tmp_path, run_subscriptions_per_session=2).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        bot, boss = await agent(core, channel, "bot"), await host_role(core, channel)
        runs = [await start(bot) for _ in range(3)]
        for run_id in runs[:2]:
            await boss.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
        with pytest.raises(CarError) as refused:
            await boss.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=runs[2]))
        assert refused.value.code == INVALID_PARAMS
        assert "run_subscriptions_per_session (2)" in refused.value.message
        # Subscribing again to a run replaces its own subscription; ending one frees it.
        await boss.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=runs[0]))
        await boss.request("runs_unsubscribe", runs_pb2.UnsubscribeRunRequest(run_id=runs[1]))
        await boss.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=runs[2]))
        await bot.close()
        await boss.close()
