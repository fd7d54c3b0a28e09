"""Group commit in the embedded store (car_grpc/store/sqlite/database.py), on a real file.

Concurrent writes share a transaction and its fsync, yet each returns only once its
transaction is committed, fails alone, and keeps the order in which it was queued. An
independent sqlite3 connection (as another process would have) reads what each write left
the moment it returns. To hold a group together, a "gate" write occupies the store thread
until the test has queued what it wants in the next group.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from car_grpc.store import RunRow, StoreConflict
from car_grpc.store.sqlite import SqliteStore
from car_grpc.store.sqlite.database import DEFAULT_WRITE_SIZE, GroupLimits, Key, SqliteDatabase
from car_grpc.v1 import host_pb2, runs_pb2
from tests.bounded import WAIT_BOUND, bounded

IN_PROGRESS = runs_pb2.RUN_STATUS_IN_PROGRESS
STARTED = runs_pb2.RUN_RECORD_KIND_STARTED
TURN = runs_pb2.RUN_RECORD_KIND_TURN


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite3"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def reader(path: Path, store: SqliteStore) -> Iterator[sqlite3.Connection]:
    """An independent connection to the store's file: it sees only what is committed."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def turn(at: int) -> bytes:
    """A turn record, as the store takes it."""
    return runs_pb2.RunRecord(record=TURN, timestamp=at).SerializeToString()


async def create_runs(store: SqliteStore, count: int) -> list[str]:
    run_ids = [f"run-{i}" for i in range(count)]
    for run_id in run_ids:
        row = RunRow(run_id, "bot", "intent", None, 1, None, IN_PROGRESS, 0, 1)
        await store.runs.create(row, runs_pb2.RunRecord(record=STARTED, timestamp=1))
    return run_ids


def stored(reader: sqlite3.Connection, run_id: str) -> list[tuple[int, int]]:
    """(seq, timestamp) of the run's records, as committed."""
    rows = reader.execute(
        "SELECT seq, record FROM run_records WHERE run_id = ? ORDER BY seq", (run_id,)
    ).fetchall()
    return [(seq, runs_pb2.RunRecord.FromString(blob).timestamp) for seq, blob in rows]


class Gate:
    """A write that holds the store thread until `open`: what is queued meanwhile is
    taken as one group when it returns."""

    def __init__(self, db: SqliteDatabase, key: Key | None = None) -> None:
        self._entered = threading.Event()
        self._released = threading.Event()
        self.task = asyncio.create_task(db.write(self._hold, key=key))

    def _hold(self, conn: sqlite3.Connection) -> None:
        self._entered.set()
        assert self._released.wait(10), "the test never opened the gate"

    async def closed(self) -> None:
        """Wait until the store thread is inside the gate."""
        assert await asyncio.to_thread(self._entered.wait, 10)

    def release(self) -> None:
        self._released.set()

    async def open(self) -> None:
        self.release()
        await self.task


@contextlib.asynccontextmanager
async def gated(db: SqliteDatabase, key: Key | None = None) -> AsyncIterator[Gate]:
    gate = Gate(db, key)
    await gate.closed()
    try:
        yield gate
    finally:
        await gate.open()


async def settle(tasks: Sequence[asyncio.Task[Any]]) -> list[object]:
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def queued() -> None:
    """Let the tasks just created queue their calls (each does on its first step)."""
    await asyncio.sleep(0)


async def test_concurrent_writes_share_transactions(
    store: SqliteStore, reader: sqlite3.Connection
) -> None:
    db = store.database
    run_ids = await create_runs(store, 16)
    commits, writes = db.commits, db.committed_writes
    # No gate: the writes come as they come, and those queued while a group commits
    # join the next one.
    await asyncio.gather(*(store.runs.append(r, 1, [turn(2)]) for r in run_ids))
    assert db.committed_writes - writes == 16
    assert db.commits - commits < 16
    # Held together: one transaction for all of them.
    commits = db.commits
    async with gated(db):
        tasks = [asyncio.create_task(store.runs.append(r, 2, [turn(3)])) for r in run_ids]
        await queued()
    assert await settle(tasks) == [None] * 16
    assert db.commits - commits == 2  # the gate, then the 16
    for run_id in run_ids:
        assert stored(reader, run_id) == [(0, 1), (1, 2), (2, 3)]


async def test_each_write_is_committed_when_it_returns(
    store: SqliteStore, reader: sqlite3.Connection
) -> None:
    run_ids = await create_runs(store, 16)
    seen: list[str] = []

    async def record(run_id: str) -> None:
        for seq in range(1, 6):
            await store.runs.append(run_id, seq, [turn(seq)])
            # At once, and through another connection: committed before it returned.
            assert stored(reader, run_id)[-1] == (seq, seq)
        seen.append(run_id)

    await asyncio.gather(*(record(r) for r in run_ids))
    assert sorted(seen) == sorted(run_ids)
    assert store.database.commits < store.database.committed_writes  # and grouped
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_failing_write_fails_alone(store: SqliteStore, reader: sqlite3.Connection) -> None:
    db = store.database
    run_ids = await create_runs(store, 2)
    approval = host_pb2.HostApproval(id="a", action="x", status=host_pb2.APPROVAL_STATUS_PENDING)
    await store.approvals.insert(approval)

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO agent_tokens VALUES ('half', x'00', 1)")
        raise ValueError("changed its mind")

    commits = db.commits
    async with gated(db):
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(store.runs.append(run_ids[0], 1, [turn(2)])),
            asyncio.create_task(store.runs.append(run_ids[1], 7, [turn(2)])),  # not at 7
            asyncio.create_task(store.approvals.insert(approval)),  # taken
            asyncio.create_task(db.write(half_done)),
            asyncio.create_task(store.runs.append(run_ids[1], 1, [turn(3)])),
            asyncio.create_task(store.agent_tokens.put("bot", b"d" * 32, 5)),
        ]
        await queued()
    results = await settle(tasks)
    assert db.commits - commits == 2  # the gate, then one group
    assert results[0] is None and results[4] is None and results[5] is None
    assert isinstance(results[1], StoreConflict) and isinstance(results[2], StoreConflict)
    assert isinstance(results[3], ValueError)
    assert stored(reader, run_ids[0]) == [(0, 1), (1, 2)]
    assert stored(reader, run_ids[1]) == [(0, 1), (1, 3)]
    tokens = reader.execute("SELECT agent_id FROM agent_tokens ORDER BY agent_id").fetchall()
    assert tokens == [("bot",)]  # nothing of the failed write's insert is kept
    assert reader.execute("SELECT COUNT(*) FROM approvals").fetchone() == (1,)


async def test_a_write_that_loses_the_transaction_fails_alone(
    store: SqliteStore, reader: sqlite3.Connection
) -> None:
    """A failure that ends the whole transaction (as SQLite does on some I/O errors):
    the rest of the group is written again, each on its own."""
    db = store.database
    run_ids = await create_runs(store, 2)

    def ruinous(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    async with gated(db):
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(store.runs.append(run_ids[0], 1, [turn(2)])),
            asyncio.create_task(db.write(ruinous)),
            asyncio.create_task(store.runs.append(run_ids[1], 1, [turn(2)])),
        ]
        await queued()
    results = await settle(tasks)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], sqlite3.OperationalError)
    for run_id in run_ids:
        assert stored(reader, run_id) == [(0, 1), (1, 2)]
    assert (await store.runs.get(run_ids[0])) is not None  # the store goes on


async def test_the_writes_of_a_run_keep_their_order(
    store: SqliteStore, reader: sqlite3.Connection
) -> None:
    db = store.database
    run_ids = await create_runs(store, 4)
    # Queued back to back into one group: each expects the one before it.
    async with gated(db):
        tasks = [
            asyncio.create_task(store.runs.append(run_ids[0], seq, [turn(seq)]))
            for seq in range(1, 11)
        ]
        await queued()
    assert await settle(tasks) == [None] * 10
    assert stored(reader, run_ids[0]) == [(0, 1)] + [(seq, seq) for seq in range(1, 11)]

    # One writer per run, each awaiting its own writes (as runs.py's per-run lock does),
    # all at once: every run's records come in its order.
    async def record_run(run_id: str) -> None:
        seq = 1
        for n in range(20):
            batch = [turn(1000 + seq + i) for i in range(n % 3 + 1)]
            await store.runs.append(run_id, seq, batch)
            seq += len(batch)

    await asyncio.gather(*(record_run(r) for r in run_ids[1:]))
    for run_id in run_ids[1:]:
        records = stored(reader, run_id)
        assert [seq for seq, _ in records] == list(range(len(records)))
        assert [at for _, at in records[1:]] == [1000 + seq for seq in range(1, len(records))]


async def test_close_drains_what_is_queued(path: Path) -> None:
    store = await SqliteStore.open(path)
    db = store.database
    run_ids = await create_runs(store, 8)
    gate = Gate(db)
    await gate.closed()
    tasks = [
        asyncio.create_task(store.runs.append(run_id, seq, [turn(seq)]))
        for seq in range(1, 4)
        for run_id in run_ids
    ]
    await queued()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closed"):
        await store.runs.append(run_ids[0], 4, [turn(4)])  # refused once closing
    await gate.open()
    await bounded(closing, "the store's close")
    assert await settle(tasks) == [None] * len(tasks)  # every queued write went in
    again = await SqliteStore.open(path)
    try:
        for run_id in run_ids:
            got = await again.runs.get(run_id)
            assert got is not None and got.record_count == 4
    finally:
        await again.close()


async def test_the_queue_is_bounded_in_calls_and_bytes(path: Path) -> None:
    limits = GroupLimits(max_pending=4, max_pending_bytes=10_000, room_timeout=5.0)
    db = await SqliteDatabase.open(path, limits)
    ran: list[int] = []

    def note(n: int) -> Callable[[sqlite3.Connection], None]:
        return lambda _: ran.append(n)

    try:
        commits = db.commits
        async with gated(db):  # the gate is the first of 4 calls pending
            first = [asyncio.create_task(db.write(note(n), 10)) for n in range(3)]
            fifth = asyncio.create_task(db.write(note(3), 10))
            await queued()
            # The fifth waits outside: the queue holds the gate and the three.
            assert db.pending == (4, 30 + DEFAULT_WRITE_SIZE) and not fifth.done()
        await asyncio.gather(*first, fifth)
        assert ran == [0, 1, 2, 3]
        # Let in once the gate was answered, the fifth commits with the three or after them.
        assert 2 <= db.commits - commits <= 3

        commits = db.commits
        async with gated(db):
            big = asyncio.create_task(db.write(note(4), 9_000))
            over = asyncio.create_task(db.write(note(5), 2_000))  # over 10,000 bytes
            await queued()
            assert db.pending == (2, 9_000 + DEFAULT_WRITE_SIZE) and not over.done()
        await asyncio.gather(big, over)
        assert ran[4:] == [4, 5] and 2 <= db.commits - commits <= 3

        # Alone, a write larger than the byte bound still goes in.
        await db.write(note(6), 50_000)
        assert ran[-1] == 6
    finally:
        await db.close()


async def test_a_call_that_finds_no_room_in_time_fails(path: Path) -> None:
    db = await SqliteDatabase.open(path, GroupLimits(max_pending=1, room_timeout=0.2))
    try:
        async with gated(db):
            with pytest.raises(TimeoutError):
                await db.write(lambda _: None)
        await db.write(lambda _: None)  # room again
    finally:
        await db.close()


async def test_a_call_that_waits_too_long_fails_and_may_still_be_done(path: Path) -> None:
    db = await SqliteDatabase.open(path, GroupLimits(call_timeout=0.3))
    try:
        gate = Gate(db)
        await gate.closed()
        with pytest.raises(TimeoutError):
            await db.write(
                lambda conn: conn.execute("INSERT INTO agent_tokens VALUES ('late', x'00', 1)")
            )
        gate.release()
        with pytest.raises(TimeoutError):
            await gate.task  # it waited too long as well
        await db.write(lambda _: None)  # committed with the late one or after it
        # Done after all, and committed: unacknowledged, which the contract allows (an
        # acknowledged write that is not committed it does not).
        rows = await db.read(
            lambda conn: conn.execute("SELECT agent_id FROM agent_tokens").fetchall()
        )
        assert rows == [("late",)]
    finally:
        await db.close()


async def test_a_read_sees_the_writes_queued_before_it(store: SqliteStore) -> None:
    """As on one thread: a read waits for the writes of its key (and those without a key)
    queued before it, so it sees them. Reads have a thread and a connection of their own,
    and do not wait for the writes of other keys: one returns while the store thread is
    inside a write transaction."""
    db = store.database
    run_ids = await create_runs(store, 2)
    async with gated(db, ("gate", "g")) as gate:
        write = asyncio.create_task(store.runs.append(run_ids[0], 1, [turn(2)]))
        await queued()
        same_run = asyncio.create_task(store.runs.records(run_ids[0], 0, 10))
        everything = asyncio.create_task(store.runs.list_for_agent("bot"))
        other_run = await store.runs.records(run_ids[1], 0, 10)  # at once
        assert [r.record for r in other_run] == [STARTED]
        await asyncio.sleep(0.05)
        assert not (gate.task.done() or write.done() or same_run.done() or everything.done())
    await bounded(write, "the gated write")
    assert [r.timestamp for r in await bounded(same_run)] == [1, 2]
    assert {r.run_id: r.record_count for r in await bounded(everything)} == {
        run_ids[0]: 2,
        run_ids[1]: 1,
    }
    # A write without a key may touch anything: every read queued after it waits.
    async with gated(db) as gate:
        read = asyncio.create_task(store.runs.get(run_ids[1]))
        await asyncio.sleep(0.05)
        assert not (gate.task.done() or read.done())
    assert await bounded(read, "the read queued behind a write") is not None


async def test_a_read_waits_for_a_write_queued_before_it_whose_caller_gave_up(
    store: SqliteStore,
) -> None:
    """A write's caller may go away (cancelled) while the write is queued; the write is
    still committed, and a read of its key queued after it still waits for it and sees
    it."""
    db = store.database
    [run_id] = await create_runs(store, 1)
    async with gated(db, ("gate", "g")) as gate:
        write = asyncio.create_task(store.runs.append(run_id, 1, [turn(2)]))
        await queued()
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        read = asyncio.create_task(store.runs.records(run_id, 0, 10))
        await asyncio.sleep(0.05)
        assert not (gate.task.done() or read.done())
    assert [r.timestamp for r in await bounded(read, "the read queued behind a write")] == [1, 2]


async def test_a_group_of_appends_is_merged_and_a_bad_one_fails_alone(
    store: SqliteStore, reader: sqlite3.Connection
) -> None:
    """Appends queued together run as one statement set (database.py, merged writes); one
    that is not where it thinks fails alone, and the rest commit in the same group."""
    db = store.database
    run_ids = await create_runs(store, 8)
    commits = db.commits
    async with gated(db):
        tasks = [asyncio.create_task(store.runs.append(r, 1, [turn(2), turn(3)])) for r in run_ids]
        tasks.insert(4, asyncio.create_task(store.runs.append(run_ids[0], 9, [turn(9)])))
        tasks.append(asyncio.create_task(store.runs.append(run_ids[0], 3, [turn(4)])))
        await queued()
    results = await settle(tasks)
    assert isinstance(results.pop(4), StoreConflict)
    assert results == [None] * 9
    assert db.commits - commits == 2  # the gate, then one group
    assert stored(reader, run_ids[0]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for run_id in run_ids[1:]:
        assert stored(reader, run_id) == [(0, 1), (1, 2), (2, 3)]
        got = await store.runs.get(run_id)
        assert got is not None and (got.turn_count, got.record_count) == (2, 3)


async def test_after_a_group_of_k_the_store_waits_for_k_writes(path: Path) -> None:
    """Writers in a loop come back: after a group of 3, a write alone is held (up to the
    window, here longer than the test) until two more join it, and the three commit
    together; a lone writer's groups are of one, so it never waits."""
    db = await SqliteDatabase.open(path, GroupLimits(window=10 * WAIT_BOUND))
    ran: list[int] = []

    def note(n: int) -> Callable[[sqlite3.Connection], None]:
        return lambda _: ran.append(n)

    try:
        for n in range(5):  # one writer: each write alone, none waits for company
            await bounded(db.write(note(n)), "a lone writer's write")
        async with gated(db):
            three = [asyncio.create_task(db.write(note(n))) for n in range(5, 8)]
            await queued()
        await bounded(asyncio.gather(*three))
        commits, writes = db.commits, db.committed_writes
        fourth = asyncio.create_task(db.write(note(8)))
        await asyncio.sleep(0.2)
        assert not fourth.done()  # held for two more writes
        rest = [asyncio.create_task(db.write(note(n))) for n in (9, 10)]
        await bounded(asyncio.gather(fourth, *rest))
        assert (db.commits - commits, db.committed_writes - writes) == (1, 3)
        assert ran == list(range(11))
    finally:
        await db.close()


async def test_close_ends_the_wait_for_a_group(path: Path) -> None:
    """A write held for company (after a group of 3) when the store closes is committed
    and answered at once: close does not wait out the window (here longer than the test),
    and reads of other keys go on meanwhile (their thread never waits for a group)."""
    db = await SqliteDatabase.open(path, GroupLimits(window=10 * WAIT_BOUND))
    await db.write(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
    async with gated(db):
        three = [
            asyncio.create_task(db.write(lambda conn: conn.execute("INSERT INTO t VALUES (0)")))
            for _ in range(3)
        ]
        await queued()
    await bounded(asyncio.gather(*three))
    insert = "INSERT INTO t VALUES (1)"
    held = asyncio.create_task(db.write(lambda conn: conn.execute(insert), key=("t", "1")))
    await asyncio.sleep(0.2)
    assert not held.done()  # waiting for two more
    count = "SELECT count(*) FROM t"
    assert await bounded(db.read(lambda conn: conn.execute(count).fetchone()[0], key=("t", "0")))
    await bounded(db.close(), "close while a write waits for company")
    await bounded(held)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT n, count(*) FROM t GROUP BY n").fetchall() == [(0, 3), (1, 1)]
    finally:
        conn.close()


async def test_every_read_sees_the_writes_acknowledged_before_it(store: SqliteStore) -> None:
    """Read-your-writes across the two connections: each writer reads its run right after
    each acknowledged append (16 at once, so reads and group commits overlap)."""
    run_ids = await create_runs(store, 16)

    async def write_then_read(run_id: str) -> None:
        for seq in range(1, 21):
            await store.runs.append(run_id, seq, [turn(seq)])
            got = await store.runs.get(run_id)
            assert got is not None and got.record_count == seq + 1
            last = await store.runs.records(run_id, seq, 10)
            assert [r.timestamp for r in last] == [seq]

    await asyncio.gather(*(write_then_read(r) for r in run_ids))


async def test_a_read_may_not_write(store: SqliteStore, reader: sqlite3.Connection) -> None:
    def sneaky(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO agent_tokens VALUES ('sneaky', x'00', 1)")

    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await store.database.read(sneaky)
    assert reader.execute("SELECT COUNT(*) FROM agent_tokens").fetchone() == (0,)
    assert await store.agent_tokens.digest("sneaky") is None  # the reads go on
