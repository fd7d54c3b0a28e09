"""End-to-end on PostgreSQL: a real core (`Core`) whose store is `postgresql://...`, on the
test session's PostgreSQL server (tests/postgres_server.py), each test in a database of its
own. Runs and the approval ledger outlive a restart of the core; `car-grpc agents ...
--store URL` (or CAR_STORE) mints tokens that the core honours, naming the store without
its password; and a restart of PostgreSQL mid-traffic fails the requests it meets clearly
and quickly (-32603, UNAVAILABLE on typed RPCs), then the same sessions work again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2, host_pb2, runs_pb2, runs_pb2_grpc, session_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import INTERNAL, INVALID_PARAMS, CarError
from tests.bounded import bounded
from tests.conftest import make_config
from tests.error_details import error_info
from tests.postgres_server import PostgresServer
from tests.processes import completed
from tests.roles import agent, host_role
from tests.runs_helpers import complete, record, start, summaries, trace, turns
from tests.session_client import SessionClient, connect
from tests.ws_helpers import running_core

CAR_GRPC = str(Path(sys.executable).with_name("car-grpc"))
UNAVAILABLE_MESSAGE = "the store is unavailable, try again later"


@pytest.fixture
def store_url(postgres_server: PostgresServer) -> str:
    """A new database of the session's server."""
    return postgres_server.create_database("e2e")


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Core, grpc.aio.Channel]]:
    async with (
        running_core(config.core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        yield core, channel


def tokens(core: Core) -> Any:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens


def embedded_file(config: Config) -> Path:
    return config.core.state_root / "car-grpc" / "store.sqlite3"


# ---------------------------------------------------------------- runs


async def test_runs_are_recorded_and_read_back_after_a_core_restart(
    tmp_path: Path, postgres_server: PostgresServer, store_url: str
) -> None:
    config = make_config(tmp_path, store=store_url)
    async with running(config) as (core, channel):
        bot = await agent(core, channel, "bot")
        done = await start(bot, "finished")
        await record(bot, done, turns(3))
        await complete(bot, done)
        left = await start(bot, "left open")
        await record(bot, left, turns(2))
        # Acknowledged means committed: another connection sees it while the core runs.
        rows = postgres_server.execute(store_url, "SELECT run_id, turn_count FROM runs")
        assert sorted(rows) == sorted([(done, 3), (left, 2)])
    # The core used PostgreSQL only: no embedded file appeared under its CAR_HOME.
    assert not embedded_file(config).exists()

    async with running(config) as (core, channel):
        reader = await host_role(core, channel)
        listed = {s.run_id: s for s in await summaries(reader, "bot")}
        assert (listed[done].status, listed[done].turn_count) == (runs_pb2.RUN_STATUS_COMPLETED, 3)
        # Left open when the first core went away: ended `incomplete`, its turns kept.
        assert (listed[left].status, listed[left].turn_count) == (runs_pb2.RUN_STATUS_INCOMPLETE, 2)
        got = await trace(reader, done)
        assert [r.record for r in got.records] == [
            runs_pb2.RUN_RECORD_KIND_STARTED,
            *[runs_pb2.RUN_RECORD_KIND_TURN] * 3,
            runs_pb2.RUN_RECORD_KIND_ENDED,
        ]
        assert [r.turn.prompt for r in got.records[1:4]] == ["p0", "p1", "p2"]
        assert [r.record for r in (await trace(reader, left)).records][-1] == (
            runs_pb2.RUN_RECORD_KIND_ENDED
        )
        await reader.close()


# ---------------------------------------------------------------- approvals


async def next_requested(client: SessionClient) -> host_pb2.HostApproval:
    while True:
        event = (await client.next_notification()).host_event
        if event.kind == "approval.requested":
            approval = host_pb2.HostApproval()
            codec.json_to_message(codec.value_to_json(event.payload), approval)
            return approval


async def ledger(client: SessionClient) -> dict[str, host_pb2.HostApproval]:
    reply = await client.request("host_approvals", host_pb2.ListApprovalsRequest())
    return {a.id: a for a in reply.approvals}


async def test_the_approval_ledger_lives_in_postgresql(
    tmp_path: Path, postgres_server: PostgresServer, store_url: str
) -> None:
    config = make_config(tmp_path, store=store_url, gated_methods={"host.register_agent"})
    register = host_pb2.RegisterAgentRequest(id="a1", name="Agent", kind="assistant")
    async with running(config) as (core, channel):
        caller = await connect(channel, token=tokens(core).daemon)
        person = await connect(channel, host_token=tokens(core).host)
        await person.request("host_subscribe", host_pb2.SubscribeHostRequest())
        parked = asyncio.create_task(caller.request("host_register_agent", register))
        gated = await next_requested(person)
        approve = host_pb2.ResolveApprovalRequest(approval_id=gated.id, approved=True, notes="ok")
        await person.request("host_resolve_approval", approve)
        assert (await parked).agent.id == "a1"
        # Still pending when the core stops.
        parked = asyncio.create_task(caller.request("host_register_agent", register))
        open_one = await next_requested(person)
        rows = postgres_server.execute(store_url, "SELECT id, status FROM approvals")
        assert sorted(rows) == sorted([(gated.id, "approved"), (open_one.id, "pending")])
    with pytest.raises(ConnectionError):
        await parked

    async with running(config) as (core, channel):
        reader = await connect(channel, host_token=tokens(core).host)
        rows_after = await ledger(reader)
        assert rows_after[gated.id].status == host_pb2.APPROVAL_STATUS_APPROVED
        assert rows_after[gated.id].notes == "ok"
        assert rows_after[open_one.id].status == host_pb2.APPROVAL_STATUS_EXPIRED
        await reader.close()


async def test_a_value_postgresql_cannot_keep_is_a_precise_invalid_params(
    tmp_path: Path, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL text holds no NUL character: a goal keyed by one is refused -32602, with
    no handler failure logged, and the session goes on."""
    config = make_config(tmp_path, store=store_url)
    goal = chats_pb2.SetGoalRequest(session_id="chat\x00one", check="tests pass")
    async with running(config) as (core, channel):
        client = await connect(channel, token=tokens(core).daemon)
        with pytest.raises(CarError) as refused:
            await client.request("goal_set", goal)
        assert refused.value.code == INVALID_PARAMS
        assert "NUL" in refused.value.message
        goal.session_id = "chat-one"
        assert (await client.request("goal_set", goal)).set
        await client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------- agent tokens, the CLI


async def cli(
    *args: str, car_home: Path, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CAR_", "PG"))}
    environ |= {"CAR_HOME": str(car_home), **(env or {})}
    return await completed([CAR_GRPC, *args], environ)


async def test_agent_tokens_through_the_cli_with_store(
    tmp_path: Path, postgres_server: PostgresServer, store_url: str
) -> None:
    home = tmp_path / "cli-home"
    password = postgres_server.password
    shown = store_url.replace(f":{password}@", ":***@")

    code, out, err = await cli("agents", "add", "bot", "--store", store_url, car_home=home)
    assert code == 0, err
    token = out.strip()
    assert f"agent tokens of the store {shown} (--store or CAR_STORE)" in err
    code, out, err = await cli("agents", "list", car_home=home, env={"CAR_STORE": store_url})
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()] == ["bot"]
    assert not (home / "car-grpc").exists()  # nothing embedded was created

    config = make_config(tmp_path, store=store_url)
    async with running(config) as (_core, channel):
        client = SessionClient(channel)
        auth = session_pb2.AuthenticateRequest(token=token, agent_id="bot")
        assert (await client.request("session_auth", auth)).agent_id == "bot"
        await client.close()
        code, _, err = await cli("agents", "remove", "bot", "--store", store_url, car_home=home)
        assert code == 0, err
        refused = SessionClient(channel)
        with pytest.raises(CarError) as failed:
            await refused.request("session_auth", auth)
        assert "token mismatch" in failed.value.message
        await refused.close()

    # A store that cannot be reached: a clear failure, and the password stays out of it.
    unreachable = f"postgresql://car:{password}@127.0.0.1:1/nowhere"
    code, out, err = await cli("agents", "list", "--store", unreachable, car_home=home)
    assert code == 1 and out == ""
    assert "car-grpc: store postgresql://car:***@127.0.0.1:1/nowhere:" in err
    code, _, err = await cli("agents", "list", "--store", "mysql://x", car_home=home)
    assert code == 2 and "unknown store" in err
    code, _, err = await cli(
        "core", "--grpc-port", "0", "--no-auth", "--store", unreachable, car_home=home
    )
    assert code == 1 and "car-grpc: store postgresql://car:***@127.0.0.1:1/nowhere:" in err
    for output in (out, err):
        assert password not in output


# ---------------------------------------------------------------- PostgreSQL restarting


@dataclass
class Outcome:
    began: float
    took: float
    error: CarError | None


async def until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await asyncio.sleep(0.05)


async def traffic(
    writer: SessionClient, reader: SessionClient, outcomes: list[Outcome], stop: asyncio.Event
) -> None:
    """Writes (a run, a turn) and reads (runs.list) in turn, each outcome recorded."""
    run_id: str | None = None
    while not stop.is_set():
        began = time.monotonic()
        error: CarError | None = None
        try:
            if run_id is None:
                run_id = await start(writer, "steady")
            else:
                await record(writer, run_id, turns(1))
                await summaries(reader, "bot")
        except CarError as e:
            error, run_id = e, None  # start a new run after a failed write
        outcomes.append(Outcome(began, time.monotonic() - began, error))
        await asyncio.sleep(0.02)


async def test_a_postgresql_restart_fails_requests_clearly_then_they_work_again(
    tmp_path: Path,
    postgres_server: PostgresServer,
    store_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    timeout = 1.0
    config = make_config(tmp_path, store=store_url, store_timeout=timeout)
    async with running(config) as (core, channel):
        bot = await agent(core, channel, "bot")
        reader = await host_role(core, channel)
        before = await start(bot, "acknowledged before the restart")
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(bot, reader, outcomes, stop))
        await asyncio.sleep(0.3)
        down_at = time.monotonic()
        await asyncio.to_thread(postgres_server.stop, "fast")  # sessions ended, as a restart
        try:
            await asyncio.sleep(timeout + 1.0)
            # A typed RPC meets the outage too: UNAVAILABLE, with a standard ErrorInfo.
            runs = runs_pb2_grpc.RunServiceStub(channel)
            meta = (("authorization", f"Bearer {tokens(core).host}"),)
            with pytest.raises(grpc.aio.AioRpcError) as typed:
                await runs.ListRuns(runs_pb2.ListRunsRequest(agent_id="bot"), metadata=meta)
            assert typed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(typed.value).reason == "UNAVAILABLE"
            assert UNAVAILABLE_MESSAGE in (typed.value.details() or "")
        finally:
            await asyncio.to_thread(postgres_server.start)
        up_at = time.monotonic()

        def seen() -> str:
            return f"down for {up_at - down_at:.2f}s; requests (began, took, error): " + str(
                [
                    (round(o.began - down_at, 2), round(o.took, 2), o.error and o.error.message)
                    for o in outcomes
                ]
            )

        try:
            async with asyncio.timeout(15):  # the pool finds the server again
                await until(lambda: outcomes[-1].began > up_at and outcomes[-1].error is None)
                recovered = len(outcomes)
                await until(lambda: len(outcomes) >= recovered + 20)
        except TimeoutError:
            raise AssertionError(f"no recovery: {seen()}") from None
        finally:
            stop.set()
            await bounded(load, "the load's end")
        print(seen())  # shown when an assertion below fails
        failed = [o for o in outcomes if o.error is not None]
        assert failed, "no request met the outage"
        for o in failed:
            assert o.error is not None
            assert o.error.code == INTERNAL
            assert o.error.message.endswith(UNAVAILABLE_MESSAGE), o.error.message
        # None hangs: each request ends within the store's timeout (and some slack for a
        # loaded machine), failed or not.
        assert max(o.took for o in outcomes) < timeout + 2.0
        # Those that ended before the stop began did not fail (one begun just before may
        # still be in flight then: on a loaded machine a write and read begun 0.28 s before
        # were).
        assert all(o.error is None for o in outcomes if o.began + o.took < down_at)
        assert all(o.error is None for o in outcomes[recovered:])
        # The same sessions go on, and what was acknowledged before is still there.
        assert before in {s.run_id for s in await summaries(reader, "bot")}
        await bot.close()
        await reader.close()
    # The log says which store failed and why, never with its password.
    assert "core: store postgresql://car:***@127.0.0.1:" in caplog.text
    assert "failed: store postgresql://car:***@" in caplog.text
    assert postgres_server.password not in caplog.text
