"""Durability across a hard crash: the core as a real process, killed with SIGKILL while an
agent streams turns, then restarted on the same state root."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from car_grpc.core.runs import ENDED, IN_PROGRESS, INCOMPLETE, STARTED, TURN, ended_record
from car_grpc.store import RunRow, open_store
from car_grpc.v1 import runs_pb2
from tests.processes import Process, car_grpc
from tests.runs_helpers import record, start, summaries, trace
from tests.session_client import SessionClient, connect
from tests.test_faults_processes import mint_agent_token


@contextlib.asynccontextmanager
async def core_process(home: Path) -> AsyncIterator[tuple[Process, str]]:
    """`car-grpc core --grpc-port 0` with CAR_HOME=home; yields it and its gRPC address."""
    async with car_grpc(home, "core", "--grpc-port", "0") as core:
        [address] = await core.listeners(1)
        yield core, address


async def stream_turns(
    client: SessionClient, run_id: str, acked: list[str], enough: asyncio.Event
) -> None:
    """Record batches, four in flight at a time, noting the prompts of acknowledged turns;
    set `enough` once 400 are acknowledged, and go on."""

    async def one(batch: int) -> None:
        prompts = [f"b{batch}-t{i}" for i in range(8)]
        reply = await record(client, run_id, [runs_pb2.RunTurn(prompt=p) for p in prompts])
        assert reply.ok
        acked.extend(prompts)
        if len(acked) >= 400:
            enough.set()

    batch = 0
    while True:
        await asyncio.gather(*(one(batch + i) for i in range(4)))
        batch += 4


async def test_acknowledged_turns_survive_sigkill(tmp_path: Path) -> None:
    home = tmp_path / "car-home"
    token = await mint_agent_token(home, "bot")
    acked: list[str] = []

    enough = asyncio.Event()
    async with core_process(home) as (core, address), grpc.aio.insecure_channel(address) as channel:
        bot = await connect(channel, token=token, agent_id="bot")
        run_id = await start(bot, "survive a crash")
        writer = asyncio.create_task(stream_turns(bot, run_id, acked, enough))
        async with asyncio.timeout(20):
            await enough.wait()
        core.kill()  # mid-stream: batches are in flight
        await core.wait()
        with pytest.raises(ConnectionError):
            await writer  # batches were in flight when the server died
        await bot.close()

    async with core_process(home) as (_, address), grpc.aio.insecure_channel(address) as channel:
        bot = await connect(channel, token=token, agent_id="bot")
        got = await trace(bot, run_id)
        kinds = [r.record for r in got.records]
        stored = [r.turn.prompt for r in got.records if r.record == runs_pb2.RUN_RECORD_KIND_TURN]
        assert set(acked) <= set(stored)
        assert [r.turn.index for r in got.records[1:-1]] == list(range(len(stored)))
        assert len(stored) % 8 == 0  # whole batches only: no torn batch
        assert kinds[0] == runs_pb2.RUN_RECORD_KIND_STARTED
        assert kinds[-1] == runs_pb2.RUN_RECORD_KIND_ENDED
        assert got.records[-1].ended.status == runs_pb2.RUN_STATUS_INCOMPLETE
        [summary] = await summaries(bot, "bot")
        assert (summary.status, summary.turn_count) == (
            runs_pb2.RUN_STATUS_INCOMPLETE,
            len(stored),
        )
        await bot.close()


async def test_the_store_ends_runs_left_open(tmp_path: Path) -> None:
    """The store ends every run left in_progress, once."""
    store = await open_store(tmp_path / "home")
    runs = store.runs
    row = RunRow("left-open", "bot", "i", None, 1, None, IN_PROGRESS, 0, 1)
    await runs.create(row, runs_pb2.RunRecord(record=STARTED, timestamp=1))
    await runs.append("left-open", 1, [runs_pb2.RunRecord(record=TURN).SerializeToString()])

    assert await runs.abandon_open(ended_record(INCOMPLETE)) == ["left-open"]
    assert await runs.abandon_open(ended_record(INCOMPLETE)) == []
    got = await runs.get("left-open")
    assert got is not None
    assert (got.status, got.turn_count, got.record_count) == (INCOMPLETE, 1, 3)
    assert got.ended_at is not None
    records = await runs.records("left-open", 0, 10)
    assert [r.record for r in records] == [STARTED, TURN, ENDED]
    await store.close()
