"""The repository contract (car_grpc/store/repositories.py), against a real store.

Every test takes its stores from the `backend` fixture and runs against each store: the
embedded SQLite file and a new database of the test session's real PostgreSQL server
(tests/postgres_server.py); nothing here knows SQL. `other` is a second, independent
connection to the same store: what a write shows there has been committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from car_grpc.store import RunRow, Store, StoreConflict
from car_grpc.store.postgres import PostgresStore
from car_grpc.store.repositories import GoalStore
from car_grpc.store.sqlite import SqliteStore
from car_grpc.v1 import chats_pb2, host_pb2, runs_pb2, voice_pb2
from tests.postgres_server import PostgresServer

PENDING = host_pb2.APPROVAL_STATUS_PENDING
APPROVED = host_pb2.APPROVAL_STATUS_APPROVED
DENIED = host_pb2.APPROVAL_STATUS_DENIED
EXPIRED = host_pb2.APPROVAL_STATUS_EXPIRED
IN_PROGRESS = runs_pb2.RUN_STATUS_IN_PROGRESS
COMPLETED = runs_pb2.RUN_STATUS_COMPLETED
INCOMPLETE = runs_pb2.RUN_STATUS_INCOMPLETE
ACTIVE = chats_pb2.GOAL_STATUS_ACTIVE
RUNNING = chats_pb2.GOAL_STATUS_RUNNING
MET = chats_pb2.GOAL_STATUS_MET
LIVE = voice_pb2.MEETING_STATUS_LIVE
ENDED = voice_pb2.MEETING_STATUS_ENDED
INTERRUPTED = voice_pb2.MEETING_STATUS_INTERRUPTED


@dataclass
class Backend:
    """Where one store lives, and how to open a connection to it."""

    open: Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The embedded SQLite file, or a new database of the session's PostgreSQL server."""
    if request.param == "sqlite":
        return Backend(lambda: SqliteStore.open(tmp_path / "store.sqlite3"))
    assert request.param == "postgres"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    return Backend(lambda: PostgresStore.open(url, pool_size=4, timeout=10))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def other(backend: Backend, store: Store) -> AsyncIterator[Store]:
    """Another connection to `store` (as another process would have)."""
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- the store


async def test_a_store_reopens_with_what_was_written(backend: Backend) -> None:
    first = await backend.open()
    await first.agent_tokens.put("a", b"d" * 32, 1)
    await first.close()
    again = await backend.open()
    try:
        assert await again.agent_tokens.digest("a") == b"d" * 32
        assert await again.size_bytes() > 0
    finally:
        await again.close()


# ---------------------------------------------------------------- agent tokens


async def test_agent_tokens_put_replace_remove(store: Store, other: Store) -> None:
    tokens = store.agent_tokens
    assert await tokens.digest("bot") is None
    await tokens.put("bot", b"1" * 32, 10)
    assert await other.agent_tokens.digest("bot") == b"1" * 32  # committed on return
    await tokens.put("bot", b"2" * 32, 20)  # a new token replaces the old one
    assert await tokens.digest("bot") == b"2" * 32
    assert await tokens.remove("bot") is True
    assert await tokens.remove("bot") is False
    assert await other.agent_tokens.digest("bot") is None


async def test_agent_tokens_list_by_id_with_mint_time(store: Store) -> None:
    tokens = store.agent_tokens
    for agent_id, at in (("zed", 3), ("amy", 1), ("kim", 2)):
        await tokens.put(agent_id, agent_id.encode().ljust(32, b"."), at)
    await tokens.put("amy", b"n" * 32, 4)
    rows = await tokens.list_all()
    assert [(r.agent_id, r.created_at) for r in rows] == [("amy", 4), ("kim", 2), ("zed", 3)]


async def test_listings_sort_ids_by_their_bytes(store: Store) -> None:
    """Ids sort as their UTF-8 bytes (code points), whatever the database's collation
    would say (a natural-language one puts "a" before "B")."""
    ids = ["b", "B", "a", "_x", "A1", "é", "z"]
    for i, name in enumerate(ids):
        await store.agent_tokens.put(name, b"d" * 32, i)
        await put_goal(store.goals, name, "check", 1)
        await store.runs.create(run_row(f"r-{name}", name, 5), record(STARTED, 5))
    assert [r.agent_id for r in await store.agent_tokens.list_all()] == sorted(ids)
    assert [g.session_id for g in await store.goals.list_all()] == sorted(ids)
    # Agents whose newest runs started at the same time: by agent_id.
    assert [a.agent_id for a in await store.runs.agents(10)] == sorted(ids)


# ---------------------------------------------------------------- approvals


def approval(approval_id: str, created_at: int = 1) -> host_pb2.HostApproval:
    return host_pb2.HostApproval(
        id=approval_id,
        action="ws.method:mail.send",
        options=["approve", "deny"],
        status=PENDING,
        created_at=created_at,
    )


def resolved(
    row: host_pb2.HostApproval, status: host_pb2.ApprovalStatus.ValueType, at: int
) -> host_pb2.HostApproval:
    out = host_pb2.HostApproval()
    out.CopyFrom(row)
    out.status, out.resolved_at = status, at
    return out


async def test_an_approval_is_inserted_once(store: Store, other: Store) -> None:
    await store.approvals.insert(approval("a"))
    assert await other.approvals.get("a") == approval("a")
    with pytest.raises(StoreConflict):
        await store.approvals.insert(approval("a", created_at=2))
    assert await store.approvals.get("a") == approval("a")
    assert await store.approvals.get("nope") is None


async def test_an_approval_is_resolved_once(store: Store, other: Store) -> None:
    ledger = store.approvals
    await ledger.insert(approval("a"))
    row, won = await ledger.finish(resolved(approval("a"), APPROVED, 5))
    assert won and row == resolved(approval("a"), APPROVED, 5)
    assert await other.approvals.get("a") == row
    # Too late: the first outcome stands, and the loser is shown it.
    again, won = await ledger.finish(resolved(approval("a"), DENIED, 6))
    assert not won and again == row
    assert await ledger.finish(resolved(approval("nope"), DENIED, 6)) == (None, False)


async def test_of_racing_resolutions_exactly_one_wins(store: Store, other: Store) -> None:
    await store.approvals.insert(approval("a"))
    results = await asyncio.gather(
        store.approvals.finish(resolved(approval("a"), APPROVED, 5)),
        other.approvals.finish(resolved(approval("a"), DENIED, 5)),
    )
    assert sorted(won for _, won in results) == [False, True]
    (winner,) = [row for row, won in results if won]
    assert [row for row, _ in results] == [winner, winner]
    assert await store.approvals.get("a") == winner


async def test_finish_all_resolves_only_what_is_pending(store: Store) -> None:
    ledger = store.approvals
    for approval_id in ("a", "b", "c"):
        await ledger.insert(approval(approval_id))
    await ledger.finish(resolved(approval("b"), APPROVED, 5))
    stale = await ledger.pending()
    assert await ledger.finish_all([resolved(a, EXPIRED, 6) for a in stale]) == 2
    assert await ledger.finish_all([resolved(approval("a"), DENIED, 7)]) == 0
    statuses = [(await ledger.get(i) or approval("?")).status for i in ("a", "b", "c")]
    assert statuses == [EXPIRED, APPROVED, EXPIRED]
    assert await ledger.pending() == []


async def test_pending_oldest_first_history_newest_resolution_first(store: Store) -> None:
    ledger = store.approvals
    for approval_id, created_at in (("a", 2), ("b", 1), ("c", 2), ("d", 3), ("e", 4)):
        await ledger.insert(approval(approval_id, created_at))
    assert [a.id for a in await ledger.pending()] == ["b", "a", "c", "d", "e"]
    for approval_id, at in (("d", 10), ("a", 30), ("c", 20), ("e", 20)):
        row = await ledger.get(approval_id)
        assert row is not None
        await ledger.finish(resolved(row, APPROVED, at))
    assert [a.id for a in await ledger.pending()] == ["b"]
    # Ties (c and e at 20): the later inserted first.
    assert [a.id for a in await ledger.history(10)] == ["a", "e", "c", "d"]
    assert [a.id for a in await ledger.history(2)] == ["a", "e"]


# ---------------------------------------------------------------- runs


def run_row(run_id: str, agent_id: str = "bot", started_at: int = 1) -> RunRow:
    return RunRow(run_id, agent_id, "intent", None, started_at, None, IN_PROGRESS, 0, 1)


def record(kind: runs_pb2.RunRecordKind.ValueType, at: int = 1) -> runs_pb2.RunRecord:
    return runs_pb2.RunRecord(record=kind, timestamp=at)


def turn(at: int = 1) -> bytes:
    """A turn record, as `append` takes it (serialized)."""
    return record(TURN, at).SerializeToString()


STARTED, TURN, ENDED_RECORD = (
    runs_pb2.RUN_RECORD_KIND_STARTED,
    runs_pb2.RUN_RECORD_KIND_TURN,
    runs_pb2.RUN_RECORD_KIND_ENDED,
)


def ended(status: runs_pb2.RunStatus.ValueType, at: int) -> runs_pb2.RunRecord:
    return runs_pb2.RunRecord(
        record=ENDED_RECORD, timestamp=at, ended=runs_pb2.RunEnded(status=status)
    )


async def test_a_run_is_created_appended_and_ended(store: Store, other: Store) -> None:
    runs = store.runs
    row = RunRow("r", "bot", "fix it", "tests pass", 7, None, IN_PROGRESS, 0, 1)
    await runs.create(row, record(STARTED, 7))
    assert await other.runs.get("r") == row
    await runs.append("r", 1, [turn(8), turn(9)])
    await runs.append("r", 3, [turn(10)])
    await runs.end("r", 4, ended(COMPLETED, 11), COMPLETED)
    got = await other.runs.get("r")
    assert got is not None
    assert (got.status, got.ended_at, got.turn_count, got.record_count) == (COMPLETED, 11, 3, 5)
    assert got.summary().ended_at == 11
    kinds = [(r.record, r.timestamp) for r in await other.runs.records("r", 0, 100)]
    assert kinds == [(STARTED, 7), (TURN, 8), (TURN, 9), (TURN, 10), (ENDED_RECORD, 11)]
    assert [r.timestamp for r in await runs.records("r", 1, 2)] == [8, 9]
    assert [r.timestamp for r in await runs.records("r", 4, 2)] == [11]
    assert await runs.records("r", 5, 2) == []
    assert await runs.get("nope") is None


async def test_run_writes_that_contradict_the_store_conflict(store: Store) -> None:
    runs = store.runs
    await runs.create(run_row("r"), record(STARTED))
    with pytest.raises(StoreConflict):
        await runs.create(run_row("r"), record(STARTED))
    with pytest.raises(StoreConflict):  # not at record 1: nothing of the batch is kept
        await runs.append("r", 2, [turn(), turn()])
    with pytest.raises(StoreConflict):
        await runs.end("r", 3, ended(COMPLETED, 2), COMPLETED)
    with pytest.raises(StoreConflict):
        await runs.append("nope", 1, [turn()])
    assert await runs.get("r") == run_row("r")
    assert [r.record for r in await runs.records("r", 0, 10)] == [STARTED]


async def test_batches_of_every_size_are_stored_in_order(store: Store, other: Store) -> None:
    runs = store.runs
    await runs.create(run_row("r"), record(STARTED, 0))
    seq = 1
    for size in (1, 3, 255, 256, 600, 2):
        await runs.append("r", seq, [turn(seq + i) for i in range(size)])
        seq += size
    got = await other.runs.get("r")
    assert got is not None and (got.turn_count, got.record_count) == (seq - 1, seq)
    assert [r.timestamp for r in await other.runs.records("r", 0, 2000)] == list(range(seq))


async def test_runs_listed_newest_first_and_agents_by_latest_run(store: Store) -> None:
    runs = store.runs
    for run_id, agent_id, started_at in (
        ("r1", "bot", 1),
        ("r2", "bot", 3),
        ("r3", "bot", 3),
        ("r4", "cat", 2),
        ("r5", "ant", 3),
    ):
        await runs.create(run_row(run_id, agent_id, started_at), record(STARTED, started_at))
    await runs.end("r1", 1, ended(COMPLETED, 4), COMPLETED)
    # Ties (r2 and r3 at 3): the later created first.
    assert [r.run_id for r in await runs.list_for_agent("bot")] == ["r3", "r2", "r1"]
    assert await runs.list_for_agent("nobody") == []
    agents = [(a.agent_id, a.runs, a.in_progress, a.last_started_at) for a in await runs.agents(5)]
    assert agents == [("ant", 1, 1, 3), ("bot", 3, 2, 3), ("cat", 1, 1, 2)]
    assert [a.agent_id for a in await runs.agents(1)] == ["ant"]


async def test_runs_left_open_are_ended_once(store: Store, other: Store) -> None:
    runs = store.runs
    await runs.create(run_row("open"), record(STARTED))
    await runs.append("open", 1, [turn()])
    await runs.create(run_row("done"), record(STARTED))
    await runs.end("done", 1, ended(COMPLETED, 2), COMPLETED)
    assert await runs.abandon_open(ended(INCOMPLETE, 9)) == ["open"]
    assert await runs.abandon_open(ended(INCOMPLETE, 10)) == []
    got = await other.runs.get("open")
    assert got is not None
    assert (got.status, got.ended_at, got.turn_count, got.record_count) == (INCOMPLETE, 9, 1, 3)
    assert [r.record for r in await runs.records("open", 0, 10)] == [STARTED, TURN, ENDED_RECORD]


# ---------------------------------------------------------------- goals


async def put_goal(
    goals: GoalStore, session_id: str, check: str, max_iterations: int, owner: str = "host"
) -> chats_pb2.StoredGoal:
    stored = await goals.put(session_id, check, max_iterations, owner, any_owner=False)
    assert stored is not None
    return stored


async def test_a_goal_is_put_as_active_and_replaced_whole(store: Store, other: Store) -> None:
    goals = store.goals
    before = now_ms()
    stored = await put_goal(goals, "s", "tests pass", 5)
    assert (stored.session_id, stored.check, stored.max_iterations) == ("s", "tests pass", 5)
    assert stored.status == ACTIVE and before <= stored.updated_at <= now_ms()
    assert not stored.HasField("last_iteration") and not stored.HasField("terminal_kind")
    assert await other.goals.get("s") == stored
    event = chats_pb2.ChatEvent(kind="goal_evaluated", iteration=2, met=False, reason="no")
    await goals.record_evaluation("s", event, RUNNING)
    again = await put_goal(goals, "s", "lint clean", 3)  # no evaluation carried over
    assert (again.check, again.max_iterations, again.status) == ("lint clean", 3, ACTIVE)
    assert not again.HasField("last_iteration") and not again.HasField("last_reason")
    assert await goals.get("nope") is None


async def test_goal_status_and_evaluations(store: Store, other: Store) -> None:
    goals = store.goals
    await put_goal(goals, "s", "check", 8)
    await goals.set_status("s", RUNNING)
    full = chats_pb2.ChatEvent(
        kind="goal_evaluated", iteration=1, met=False, grounded=True, reason="not yet"
    )
    await goals.record_evaluation("s", full, RUNNING)
    got = await other.goals.get("s")
    assert got is not None and got.status == RUNNING
    assert (got.last_iteration, got.last_met, got.last_grounded, got.last_reason) == (
        1,
        False,
        True,
        "not yet",
    )
    # Fields the event does not carry are cleared.
    await goals.record_evaluation("s", chats_pb2.ChatEvent(kind="goal_evaluated", met=True), MET)
    got = await goals.get("s")
    assert got is not None and got.status == MET and got.last_met is True
    assert not got.HasField("last_iteration") and not got.HasField("last_reason")
    await goals.set_status("s", ACTIVE, "done")
    await goals.set_status("s", RUNNING)  # no kind given: the recorded one stays
    got = await goals.get("s")
    assert got is not None and (got.status, got.terminal_kind) == (RUNNING, "done")
    # Updating a goal that is gone (cleared while its chat ran) brings nothing back.
    await goals.set_status("gone", MET, "done")
    await goals.record_evaluation("gone", full, RUNNING)
    assert await goals.get("gone") is None


async def test_goal_updates_of_an_owner_leave_another_owners_goal_alone(
    store: Store, other: Store
) -> None:
    theirs = await put_goal(store.goals, "s", "theirs", 2, owner="agent:b")
    event = chats_pb2.ChatEvent(kind="goal_evaluated", iteration=1, met=True, reason="mine")
    await store.goals.record_evaluation("s", event, MET, owner="host")
    await store.goals.set_status("s", MET, "done", owner="host")
    assert await other.goals.get("s") == theirs
    await store.goals.set_status("s", RUNNING, owner="agent:b")  # its owner's update lands
    got = await other.goals.get("s")
    assert got is not None and got.status == RUNNING


async def test_goals_listed_cleared_and_reset_after_restart(store: Store, other: Store) -> None:
    goals = store.goals
    for session_id in ("c", "a", "b"):
        await put_goal(goals, session_id, f"check {session_id}", 1)
    await goals.set_status("a", RUNNING)
    await goals.set_status("c", RUNNING)
    assert [g.session_id for g in await goals.list_all()] == ["a", "b", "c"]
    assert await goals.reset_running() == 2
    assert [g.status for g in await other.goals.list_all()] == [ACTIVE, ACTIVE, ACTIVE]
    assert await goals.reset_running() == 0
    assert await goals.clear("b") is True
    assert await goals.clear("b") is False
    assert await goals.clear_all() == 2
    assert await other.goals.list_all() == []


async def test_a_goal_belongs_to_its_owner(store: Store, other: Store) -> None:
    """Calls with an owner see and change only that owner's goals; without one, all."""
    goals = store.goals
    mine = await put_goal(goals, "a", "mine", 1, owner="agent:a")
    theirs = await put_goal(goals, "b", "theirs", 1, owner="host")
    assert await goals.put("b", "taken", 2, "agent:a", any_owner=False) is None
    assert await other.goals.get("b", "agent:a") is None
    assert await other.goals.get("b", "host") == theirs  # untouched by the refused put
    assert await other.goals.get("b") == theirs
    assert await other.goals.list_all("agent:a") == [mine]
    assert [g.session_id for g in await other.goals.list_all()] == ["a", "b"]
    assert await goals.clear("b", "agent:a") is False
    assert await goals.clear_all("agent:a") == 1
    assert await other.goals.list_all() == [theirs]
    # Any owner's goal is replaced by a caller that sees all; its owner stays.
    replaced = await goals.put("b", "by the daemon", 3, "daemon", any_owner=True)
    assert replaced is not None and replaced.check == "by the daemon"
    assert await other.goals.get("b", "host") == replaced
    assert await goals.get("b", "daemon") is None
    assert await goals.clear("b") is True


# ---------------------------------------------------------------- meetings


def meeting(
    meeting_id: str, started_at: int = 1, status: voice_pb2.MeetingStatus.ValueType = LIVE
) -> voice_pb2.Meeting:
    return voice_pb2.Meeting(
        meeting_id=meeting_id, status=status, started_at=started_at, session_id="v"
    )


def segment(text: str) -> voice_pb2.TranscriptSegment:
    return voice_pb2.TranscriptSegment(text=text, session_id="v", received_at=1)


async def test_a_transcript_is_numbered_and_kept_with_its_meeting(
    store: Store, other: Store
) -> None:
    meetings = store.meetings
    await meetings.put(meeting("m"))
    assert await other.meetings.get("m") == meeting("m")
    first = segment("hello")
    assert await meetings.append_segment("m", first, 10) == 0
    assert await meetings.append_segment("m", segment("world"), 10) == 1
    found = await other.meetings.transcript("m")
    assert found is not None
    stored, segments = found
    assert stored.segment_count == 2
    assert [(s.index, s.text) for s in segments] == [(0, "hello"), (1, "world")]
    # The meeting is rewritten (continued, retitled): its transcript stays.
    stored.title = "standup"
    await meetings.put(stored)
    again = await meetings.transcript("m")
    assert again is not None and again[0].title == "standup" and len(again[1]) == 2
    assert await meetings.append_segment("nope", segment("x"), 10) is None
    assert await meetings.transcript("nope") is None
    await meetings.delete("m")
    assert await other.meetings.get("m") is None
    assert await meetings.transcript("m") is None


async def test_a_full_transcript_marks_its_meeting_truncated(store: Store) -> None:
    meetings = store.meetings
    await meetings.put(meeting("m"))
    assert [await meetings.append_segment("m", segment(str(i)), 2) for i in range(2)] == [0, 1]
    assert await meetings.append_segment("m", segment("too many"), 2) is None
    found = await meetings.transcript("m")
    assert found is not None
    assert found[0].truncated and found[0].segment_count == 2
    assert [s.text for s in found[1]] == ["0", "1"]


async def test_meetings_finish_and_recover(store: Store, other: Store) -> None:
    meetings = store.meetings
    for meeting_id in ("a", "b", "c"):
        await meetings.put(meeting(meeting_id))
    done = await meetings.finish("a", ENDED, 5, None)
    assert done is not None and (done.status, done.ended_at) == (ENDED, 5)
    assert not done.HasField("end_reason")
    cut = await meetings.finish("b", INTERRUPTED, 6, "the engine went away")
    assert cut is not None and cut.end_reason == "the engine went away"
    assert await other.meetings.get("b") == cut
    assert await meetings.finish("nope", ENDED, 7, None) is None
    assert await meetings.interrupt_live(8, "server restarted") == 1
    c = await other.meetings.get("c")
    assert c is not None and (c.status, c.ended_at, c.end_reason) == (
        INTERRUPTED,
        8,
        "server restarted",
    )
    assert await meetings.interrupt_live(9, "server restarted") == 0
    again = await meetings.finish("b", ENDED, 10, None)  # a stop clears the old reason
    assert again is not None and not again.HasField("end_reason")


async def test_recent_meetings_newest_start_first(store: Store) -> None:
    meetings = store.meetings
    for meeting_id, started_at in (("a", 1), ("b", 3), ("c", 2), ("d", 3)):
        await meetings.put(meeting(meeting_id, started_at))
    # Ties (b and d at 3): the later stored first.
    assert [m.meeting_id for m in await meetings.recent(10)] == ["d", "b", "c", "a"]
    assert [m.meeting_id for m in await meetings.recent(2)] == ["d", "b"]
