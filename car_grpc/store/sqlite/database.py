"""The embedded database: one SQLite file under the state root, its threads and its schema.

SQL runs on two dedicated threads, each owning a connection, so the event loop never
blocks on disk: the store thread writes (serialized), the read thread reads. The database
is in WAL mode with `synchronous=FULL`: a transaction is on disk once its COMMIT returns,
which is what "acknowledged after commit" needs, and a reader never waits for a writer
(nor its fsync). Several processes may open the same file (the CLI's `agents add` writes
while a server runs).

Group commit: `write(fn)` queues `fn`, and the store thread, whenever it is free, takes
every write queued by then (up to GroupLimits.max_group writes and max_group_bytes) and
runs them in one transaction, each under its own savepoint, with one COMMIT, so one
fsync, for all of them. A write that raises is rolled back to its savepoint and fails
alone; the others commit. Every caller is answered only after that COMMIT returned (and
the group's answers reach the event loop in one hand-off). A write that arrives while a
group commits joins the next one ("natural" group commit). And when the group before had
k writes, the writers then in flight are expected back (a writer with one write in flight
writes again once answered): the store thread waits until k writes are queued, as long
as each comes within GroupLimits.window (1 ms) of the one before, 4 windows at most,
before it commits; waits that run out in a row make it skip the next chances to wait,
more and more of them. A lone writer (k = 1) never waits (a fixed window
for every group did, and did not pay); many writers in a loop make their groups about
twice as large, so fewer commits, and their answers go back together: less CPU a write
through the whole server (bench/README.md, branch `rec8`).

Merged writes: `write_merged(apply, item)` is a write given as data, and writes of the
same `apply` queued one after another in a group run as ONE call `apply(conn, items)`
(one statement for all their rows, rather than several per write), under one savepoint.
If that call raises, it is rolled back and each item runs again alone, so a bad item
fails alone as any write does. Each statement hands the GIL to a busy event loop and
waits to get it back, so statements per group, not per write, is what keeps a group
short (bench/README.md).

`read(fn)` runs `fn` on the read thread's connection (`query_only`), in a read
transaction that it may share with the other reads taken with it (one snapshot, taken
after each was called): a read sees every write acknowledged before it was called, and
none half-done. It also sees every write merely queued before it (as on one thread,
where the core relies on it: a background write, then a read by another client), by
waiting for those to commit first; a `key` narrows that to what the read reads: a read
of key K waits only for the writes of key K and those without a key queued before it, so
a read of one run, goal or token does not wait for the fsync of other sessions' writes.
A write of key K may change only the data of K; a write or read without a key may touch
anything.

Schema changes are migrations: append a new entry to MIGRATIONS, never edit an old one.
`PRAGMA user_version` records how many have been applied.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")
#: What a call touches, e.g. ("run", run_id): a write of one key and a read of another do
#: not wait for each other.
Key = tuple[str, str]

#: Ordered schema migrations. Entry i brings the schema from version i to i + 1. Each is
#: plain SQL statements separated by ";" (no triggers or literals containing ";").
MIGRATIONS: list[str] = [
    # 1: per-agent tokens, stored as SHA-256 digests (tokens are 256-bit random).
    """
    CREATE TABLE agent_tokens (
        agent_id   TEXT PRIMARY KEY,
        token_hash BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    """,
    # 2: the approval ledger (car_grpc/store/sqlite/approvals.py). A row is a serialized
    # car.v1.HostApproval; status and times are copied out for queries.
    """
    CREATE TABLE approvals (
        id          TEXT PRIMARY KEY,
        status      TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        resolved_at INTEGER,
        approval    BLOB NOT NULL
    );
    CREATE INDEX approvals_by_status ON approvals(status, created_at);
    CREATE INDEX approvals_by_resolution ON approvals(resolved_at);
    """,
    # 3: agent runs and their ordered records (car_grpc/store/sqlite/runs.py). A record is a
    # serialized car.v1.RunRecord; seq 0 is `started`.
    """
    CREATE TABLE runs (
        run_id              TEXT PRIMARY KEY,
        agent_id            TEXT NOT NULL,
        intent              TEXT NOT NULL,
        outcome_description TEXT,
        started_at          INTEGER NOT NULL,
        ended_at            INTEGER,
        status              TEXT NOT NULL,
        turn_count          INTEGER NOT NULL DEFAULT 0,
        record_count        INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_by_agent ON runs(agent_id, started_at);
    CREATE INDEX runs_by_status ON runs(status);
    CREATE TABLE run_records (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        seq    INTEGER NOT NULL,
        record BLOB NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    """,
    # 4: standing goals of chat sessions (car_grpc/store/sqlite/goals.py).
    """
    CREATE TABLE goals (
        session_id     TEXT PRIMARY KEY,
        check_text     TEXT NOT NULL,
        max_iterations INTEGER NOT NULL,
        status         TEXT NOT NULL,
        last_iteration INTEGER,
        last_met       INTEGER,
        last_grounded  INTEGER,
        last_reason    TEXT,
        terminal_kind  TEXT,
        updated_at     INTEGER NOT NULL
    );
    """,
    # 5: meetings and their transcripts (car_grpc/store/sqlite/meetings.py). A meeting row is a
    # serialized car.v1.Meeting, a segment row a serialized car.v1.TranscriptSegment.
    """
    CREATE TABLE meetings (
        meeting_id TEXT PRIMARY KEY,
        status     TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        meeting    BLOB NOT NULL
    );
    CREATE INDEX meetings_by_start ON meetings(started_at);
    CREATE INDEX meetings_by_status ON meetings(status);
    CREATE TABLE meeting_segments (
        meeting_id TEXT NOT NULL REFERENCES meetings(meeting_id),
        seq        INTEGER NOT NULL,
        segment    BLOB NOT NULL,
        PRIMARY KEY (meeting_id, seq)
    ) WITHOUT ROWID;
    """,
    # 6: A2A callers' token digests and A2A tasks (car_grpc/store/sqlite/a2a.py). A task
    # row is a serialized lf.a2a.v1.Task; its owner, state and time are copied out.
    """
    CREATE TABLE a2a_clients (
        name       TEXT PRIMARY KEY,
        token_hash BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE a2a_tasks (
        task_id    TEXT PRIMARY KEY,
        agent_id   TEXT NOT NULL,
        caller     TEXT NOT NULL,
        context_id TEXT NOT NULL,
        state      INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        task       BLOB NOT NULL
    );
    CREATE INDEX a2a_tasks_by_owner ON a2a_tasks(caller, agent_id, updated_at);
    CREATE INDEX a2a_tasks_by_state ON a2a_tasks(state);
    """,
    # 7: A2UI surfaces and the remote A2A peers (car_grpc/store/sqlite/a2ui.py). A surface row
    # is a serialized car.v1.A2uiSurface with its sealed route credential; a peer row a
    # serialized car.v1.A2aPeer.
    """
    CREATE TABLE a2ui_surfaces (
        surface_id TEXT PRIMARY KEY,
        owner_key  TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        surface    BLOB NOT NULL,
        route      BLOB
    );
    CREATE INDEX a2ui_surfaces_by_expiry ON a2ui_surfaces(expires_at);
    CREATE INDEX a2ui_surfaces_by_owner ON a2ui_surfaces(owner_key, expires_at);
    CREATE TABLE a2a_peers (
        slug TEXT PRIMARY KEY,
        url  TEXT NOT NULL UNIQUE,
        peer BLOB NOT NULL
    );
    """,
    # 8: a goal's owner, the principal that set it ("daemon", "host", "agent:<id>"); goals
    # set before owners were kept are the daemon token's.
    """
    ALTER TABLE goals ADD COLUMN owner TEXT NOT NULL DEFAULT 'daemon';
    CREATE INDEX goals_by_owner ON goals(owner, session_id);
    """,
]


@dataclass(frozen=True)
class GroupLimits:
    """The bounds of the write queue and of one commit group."""

    #: Calls queued or under way (reads and writes) before a new one waits for room.
    max_pending: int = 4096
    #: Bytes of the writes queued or under way before a new one waits for room (a write
    #: larger than this alone is let in when nothing else is pending).
    max_pending_bytes: int = 64 << 20
    #: How long a call waits for room before it fails with TimeoutError.
    room_timeout: float = 30.0
    #: Writes, and their bytes, committed in one transaction at most.
    max_group: int = 256
    max_group_bytes: int = 16 << 20
    #: With fewer writes queued than the group before had, how long the store thread
    #: waits for the next of them, in seconds (4 windows in all at most; 0: never, a
    #: group is whatever was queued when the thread became free). Measured in
    #: bench/README.md (branch `rec8`).
    window: float = 0.001
    #: How long a caller waits for its call before it gives up with TimeoutError (well
    #: past SQLite's busy_timeout). The call may still be done later: a write is then
    #: committed without having been acknowledged, never the other way round.
    call_timeout: float = 120.0


#: What a write is counted as when its caller gives no size.
DEFAULT_WRITE_SIZE = 256
#: How often the idle store thread looks whether its event loop is gone (a store that
#: was never closed), in seconds.
_IDLE_TICK = 1.0
#: The most chances to wait for a group skipped after waits that ran out, and the
#: longest wait for a group, in windows.
_MAX_SKIP = 63
_MAX_WINDOWS = 4
#: Seconds to wait for the database to open (and migrate), and for close to drain.
_OPEN_TIMEOUT = 60.0
_CLOSE_TIMEOUT = 60.0


@dataclass(eq=False)
class _Call:
    """One read or write on its way through a store thread."""

    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    size: int
    #: The caller's answer (cancelled should the caller give up).
    future: asyncio.Future[Any]
    #: For a merged write: what runs the items of several such writes at once, and this
    #: write's item (`fn` runs it alone).
    merge: Callable[[sqlite3.Connection, list[Any]], None] | None = None
    item: Any = None
    #: Set on the store thread.
    outcome: Any = None
    error: BaseException | None = None
    #: Whether the store thread has handed its answer to the event loop.
    answered: bool = False
    #: What the call touches (None: anything); see the module's docstring.
    key: Key | None = None
    #: For a write a read waits for: done once the store thread answered it, whatever its
    #: caller did meanwhile (the reads queued after it wait for this, not for `future`);
    #: made by the first such read.
    settled: asyncio.Future[None] | None = None
    #: When its caller gives up (the event loop's clock).
    deadline: float = 0.0


@dataclass
class _Queue:
    """Calls waiting for one store thread (guarded by `wake`)."""

    wake: threading.Condition = field(default_factory=threading.Condition)
    calls: collections.deque[_Call] = field(default_factory=collections.deque)
    closing: bool = False
    #: GroupLimits.window for this queue's thread (0 for the reads); the size of the
    #: group it took last; the chances to wait it skips next, and the waits in a row that
    #: ran out (`wait_for`; all used on that thread only).
    window: float = 0.0
    last_group: int = 1
    skip: int = 0
    misses: int = 0

    def wait_for(self, expected: int) -> None:
        """Wait (on the queue's thread, holding `wake`) until `expected` calls are queued,
        as long as each comes within the window of the one before (on a busy machine the
        writers come back spread out, yet close to each other), _MAX_WINDOWS windows in all.
        After n waits in a row that ran out, skip the next 2^n - 2 chances to wait (0, 2,
        6, ... up to _MAX_SKIP): writers that do not come back in time (clients that pause
        between writes) are soon not waited for, writers in a loop still are when one of
        them was late once."""
        if self.skip:
            self.skip -= 1
            return
        start = time.monotonic()
        deadline, last = start + self.window, start + _MAX_WINDOWS * self.window
        count = len(self.calls)
        while len(self.calls) < expected and not self.closing:
            now = time.monotonic()
            if len(self.calls) > count:
                count, deadline = len(self.calls), min(now + self.window, last)
            remaining = deadline - now
            if remaining <= 0:
                self.misses += 1
                self.skip = min(2**self.misses - 2, _MAX_SKIP)
                return
            self.wake.wait(remaining)
        self.misses = 0


class _InDoubt(Exception):
    """A savepoint statement failed: the group's transaction may be gone (SQLite ends it
    on some I/O errors). `culprit` is the write whose failure it followed, if any."""

    def __init__(self, culprit: _Call | None) -> None:
        self.culprit = culprit


class SqliteDatabase:
    """One open database file: its writes on the store thread, its reads on the read
    thread, each thread owning its connection.

    `write(fn)` calls `fn(connection)` inside a transaction that it may share with other
    writes (group commit, above); `read(fn)` inside a read transaction. Either returns
    `fn`'s value, or raises what it raised, once done. Only the repositories of this
    package call them: the connections never leave it. The database is used from the
    event loop that opened it.

    `commits` and `committed_writes` count the write transactions committed and the
    writes in them (their ratio is the mean group size).
    """

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, limits: GroupLimits) -> None:
        self.path = path
        self.limits = limits
        self.commits = 0
        self.committed_writes = 0
        self._loop = loop
        self._writes = _Queue(window=limits.window)
        self._reads = _Queue()
        self._conn: sqlite3.Connection | None = None
        #: Calls and write bytes queued or under way (counted on the event loop).
        self._pending = 0
        self._pending_bytes = 0
        self._room = asyncio.Event()
        #: The last write queued (writes are answered in the order queued), the last
        #: without a key, and the last of each key still unanswered.
        self._last_write: _Call | None = None
        self._last_unkeyed: _Call | None = None
        self._last_by_key: dict[Key, _Call] = {}
        #: The calls queued and not yet answered on the event loop, in the order queued,
        #: and the one timer that fails those past their deadline (a timer per call cost
        #: more than the rest of a write's way through the event loop; bench/README.md).
        self._unanswered: dict[_Call, None] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._ready: asyncio.Future[None] = loop.create_future()
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._read_ready: asyncio.Future[None] = loop.create_future()
        self._read_stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._serve,
            args=(self._writes, _connect, self._execute, self._ready, self._stopped),
            name="car-store",
            daemon=False,
        )
        self._read_thread = threading.Thread(
            target=self._serve,
            args=(
                self._reads,
                _connect_reader,
                self._read_all,
                self._read_ready,
                self._read_stopped,
            ),
            name="car-store-read",
            daemon=False,
        )

    @classmethod
    async def open(cls, path: Path, limits: GroupLimits | None = None) -> SqliteDatabase:
        """Open (creating it if missing) and migrate the database at `path`."""
        # Runs, approvals and agent token digests: for the owner's eyes only.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_files(path)
        db = cls(path, asyncio.get_running_loop(), limits or GroupLimits())
        # The reader connects once the store thread has migrated the file.
        try:
            for thread, ready in ((db._thread, db._ready), (db._read_thread, db._read_ready)):
                thread.start()
                await asyncio.wait_for(asyncio.shield(ready), _OPEN_TIMEOUT)
        except BaseException:
            db._stop_threads()
            raise
        return db

    # ------------------------------------------------------------ the event loop's side

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        size: int = DEFAULT_WRITE_SIZE,
        key: Key | None = None,
    ) -> T:
        """Run `fn` in a write transaction; returns once that transaction is committed.
        `size` is what the write holds in bytes (its share of the queue's byte bound);
        `key` what it changes (None: anything)."""
        call = _Call(fn, True, size, self._loop.create_future(), key=key)
        return cast(T, await self._submit(call))

    async def write_merged(
        self,
        merge: Callable[[sqlite3.Connection, list[Item]], None],
        item: Item,
        size: int = DEFAULT_WRITE_SIZE,
        key: Key | None = None,
    ) -> None:
        """Write `item` with `merge(connection, items)`, which the store thread calls once
        for the items of every write of the same `merge` queued one after another in a
        group (in the order they were queued), and for `[item]` alone should that call
        fail. `merge` applies all of its items or raises. Returns once committed."""
        call = _Call(lambda conn: merge(conn, [item]), True, size, self._loop.create_future())
        call.merge, call.item, call.key = merge, item, key
        await self._submit(call)

    async def read(self, fn: Callable[[sqlite3.Connection], T], key: Key | None = None) -> T:
        """Run `fn` in a read transaction (one consistent state, no write) that sees every
        write queued before it (of `key` and without a key, if `key` is given)."""
        call = _Call(fn, False, 0, self._loop.create_future(), key=key)
        return cast(T, await self._submit(call))

    async def _submit(self, call: _Call) -> Any:
        if self._closed:
            raise RuntimeError("the store is closed")
        before = None if call.write else self._writes_before(call.key)
        size = call.size
        if not self._fits(size):
            await self._wait_for_room(size)
        call.deadline = self._loop.time() + self.limits.call_timeout
        if before:
            async with asyncio.timeout_at(call.deadline):
                await asyncio.wait(before)  # their outcome is their callers' business
        self._enqueue(call)
        # Should the caller give up, only its own future is cancelled: the reads queued
        # after a write wait for `settled`, which only the store thread sets. Past its
        # deadline, `_sweep` fails the future with TimeoutError.
        return await call.future

    def _writes_before(self, key: Key | None) -> list[asyncio.Future[Any]]:
        """The answers a read of `key` waits for: the writes queued so far that it must see
        (writes are answered in order, so the last of each kind stands for all)."""
        if key is None:
            lasts = [self._last_write]
        else:
            lasts = [self._last_unkeyed, self._last_by_key.get(key)]
        waits = []
        for call in lasts:
            if call is not None and call in self._unanswered:
                if call.settled is None:
                    call.settled = self._loop.create_future()
                waits.append(call.settled)
        return waits

    def _enqueue(self, call: _Call) -> None:
        queue = self._writes if call.write else self._reads
        with queue.wake:
            if queue.closing:  # closing, or its store thread is gone
                raise RuntimeError("the store is closed")
            queue.calls.append(call)
            queue.wake.notify()
        self._pending += 1
        self._pending_bytes += call.size
        self._unanswered[call] = None
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(call.deadline, self._sweep)
        if call.write:
            self._last_write = call
            if call.key is None:
                self._last_unkeyed = call
            else:
                self._last_by_key[call.key] = call

    @property
    def pending(self) -> tuple[int, int]:
        """Calls, and bytes of writes, queued or under way (those waiting for room aside)."""
        return self._pending, self._pending_bytes

    def _fits(self, size: int) -> bool:
        limits = self.limits
        if self._pending >= limits.max_pending:
            return False
        return self._pending == 0 or self._pending_bytes + size <= limits.max_pending_bytes

    async def _wait_for_room(self, size: int) -> None:
        async with asyncio.timeout(self.limits.room_timeout):
            while not self._fits(size):
                self._room.clear()
                await self._room.wait()
                if self._closed:
                    raise RuntimeError("the store is closed")

    def _sweep(self) -> None:
        """On the event loop: fail the callers whose calls are past their deadline (the
        calls themselves may still be done later), and look again at the next deadline."""
        self._sweeper = None
        now = self._loop.time()
        for call in self._unanswered:
            if call.deadline <= now and not call.future.done():
                call.future.set_exception(TimeoutError("the store did not answer in time"))
        waiting = [c.deadline for c in self._unanswered if not c.future.done()]
        if waiting:
            self._sweeper = self._loop.call_at(min(waiting), self._sweep)

    def _settle(self, calls: list[_Call]) -> None:
        """On the event loop: answer the callers of a group, and make room."""
        for call in calls:
            self._pending -= 1
            self._pending_bytes -= call.size
            self._unanswered.pop(call, None)
            if call.key is not None and self._last_by_key.get(call.key) is call:
                del self._last_by_key[call.key]
            if call.settled is not None:
                call.settled.set_result(None)
            if call.future.done():  # a caller that went away
                continue
            if call.error is not None:
                call.future.set_exception(call.error)
            else:
                call.future.set_result(call.outcome)
        self._room.set()

    def _hand_back(self, calls: list[_Call]) -> None:
        for call in calls:
            call.answered = True
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody waits
            self._loop.call_soon_threadsafe(self._settle, calls)

    def size_bytes(self) -> int:
        """Bytes of the database on disk: the file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):  # no write-ahead log right now
                total += path.stat().st_size
        return total

    async def close(self) -> None:
        """Refuse new calls, let the store threads finish every call queued, and close:
        the read thread first, so that the write connection closes last and folds the
        write-ahead log away (two connections closing at once may each leave that to the
        other, and the log stays behind)."""
        self._closed = True
        self._room.set()  # callers waiting for room give up
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for queue, stopped, thread in (
            (self._reads, self._read_stopped, self._read_thread),
            (self._writes, self._stopped, self._thread),
        ):
            _stop_thread(queue)
            await asyncio.wait_for(asyncio.shield(stopped), _CLOSE_TIMEOUT)
            thread.join(_IDLE_TICK)  # it has nothing left to do but return

    def _stop_threads(self) -> None:
        for queue in (self._writes, self._reads):
            _stop_thread(queue)

    # ------------------------------------------------------------ the store threads

    def _serve(
        self,
        queue: _Queue,
        connect: Callable[[Path], sqlite3.Connection],
        execute: Callable[[sqlite3.Connection, list[_Call]], None],
        ready: asyncio.Future[None],
        stopped: asyncio.Future[None],
    ) -> None:
        try:
            conn = connect(self.path)
        except BaseException as e:
            with queue.wake:
                queue.closing = True
            self._signal(ready, e)
            self._signal(stopped, None)
            return
        if queue is self._writes:
            self._conn = conn
        self._signal(ready, None)
        calls: list[_Call] = []
        try:
            while calls := self._take(queue):
                execute(conn, calls)
        finally:  # left early only through a fault of this thread: fail what is left
            conn.close()
            with queue.wake:
                queue.closing = True
                dropped = [c for c in calls if not c.answered] + list(queue.calls)
                queue.calls.clear()
            if dropped:
                error = RuntimeError("the store thread stopped")
                for call in dropped:
                    call.outcome, call.error = None, error
                self._hand_back(dropped)
            self._signal(stopped, None)

    def _signal(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        with contextlib.suppress(RuntimeError):  # the event loop is gone
            self._loop.call_soon_threadsafe(settle)

    def _take(self, queue: _Queue) -> list[_Call]:
        """The next calls in order: every one queued, up to a group's bounds; [] once
        closing and drained (or the event loop is gone)."""
        limits = self.limits
        with queue.wake:
            while not queue.calls:
                if queue.closing or self._loop.is_closed():
                    return []
                queue.wake.wait(_IDLE_TICK)
            expected = min(queue.last_group, limits.max_group)
            if queue.window > 0 and len(queue.calls) < expected:
                queue.wait_for(expected)
            taken: list[_Call] = []
            size = 0
            while queue.calls and len(taken) < limits.max_group:
                call = queue.calls[0]
                if taken and size + call.size > limits.max_group_bytes:
                    break
                taken.append(queue.calls.popleft())
                size += call.size
            queue.last_group = len(taken)
            return taken

    def _read_all(self, conn: sqlite3.Connection, reads: list[_Call]) -> None:
        """On the read thread: `reads` in one read transaction (one snapshot, taken after
        each of them was queued)."""
        for call in reads:
            try:
                if not conn.in_transaction:
                    conn.execute("BEGIN")
                call.outcome = call.fn(conn)
            except Exception as e:
                call.outcome, call.error = None, e
        if conn.in_transaction:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                _roll_back(conn)
        self._hand_back(reads)

    def _execute(self, conn: sqlite3.Connection, writes: list[_Call]) -> None:
        if len(writes) == 1:
            self._alone(writes[0])
        elif writes[0].merge is not None and all(c.merge is writes[0].merge for c in writes):
            self._merged_group(writes)
        else:
            self._group(writes)
        self._hand_back(writes)

    def _alone(self, call: _Call) -> None:
        """`call` in a transaction of its own."""
        conn = self._connection
        try:
            conn.execute("BEGIN IMMEDIATE")
            call.outcome = call.fn(conn)
            conn.execute("COMMIT")
        except Exception as e:
            call.outcome, call.error = None, e
            _roll_back(conn)
            return
        self.commits += 1
        self.committed_writes += 1

    def _merged_group(self, writes: list[_Call]) -> None:
        """A group of merged writes of one kind: one call for all, no savepoint; should
        it fail, the group again with a savepoint each."""
        conn = self._connection
        merge = writes[0].merge
        assert merge is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            merge(conn, [c.item for c in writes])
            conn.execute("COMMIT")
        except Exception:
            _roll_back(conn)
            self._group(writes, merging=False)
            return
        for call in writes:
            call.outcome = None
        self.commits += 1
        self.committed_writes += len(writes)

    def _group(self, writes: list[_Call], merging: bool = True) -> None:
        """`writes` in one transaction, each under a savepoint (the merged writes queued
        one after another under one), one COMMIT for all."""
        conn = self._connection
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as e:  # e.g. another process held the database past busy_timeout
            for call in writes:
                call.error = e
            return
        try:
            for segment in _segments(writes) if merging else ([c] for c in writes):
                if len(segment) == 1 or not self._merged(segment):
                    for call in segment:
                        self._savepointed(call)
        except _InDoubt as doubt:
            # The writes start again, each on its own, but for the one whose failure
            # this was.
            _roll_back(conn)
            self._one_by_one([c for c in writes if c is not doubt.culprit])
            return
        try:
            conn.execute("COMMIT")
        except Exception as e:  # nothing of the group is on disk
            _roll_back(conn)
            for call in writes:
                if call.error is None:
                    call.outcome, call.error = None, e
            return
        self.commits += 1
        self.committed_writes += sum(1 for c in writes if c.error is None)

    def _savepointed(self, call: _Call) -> None:
        """`call` under a savepoint of its own, rolled back should it raise."""
        conn = self._connection
        try:
            conn.execute("SAVEPOINT write")
        except Exception as e:
            raise _InDoubt(None) from e
        try:
            call.outcome = call.fn(conn)
        except Exception as e:
            call.outcome, call.error = None, e
            try:
                conn.execute("ROLLBACK TO write")
            except Exception as doubt:
                raise _InDoubt(call) from doubt
        try:
            conn.execute("RELEASE write")
        except Exception as e:
            raise _InDoubt(call if call.error is not None else None) from e

    def _merged(self, segment: list[_Call]) -> bool:
        """The merged writes `segment` in one call under one savepoint; False (and nothing
        of them left) if that call raised."""
        conn = self._connection
        merge = segment[0].merge
        assert merge is not None
        try:
            conn.execute("SAVEPOINT merged")
            try:
                merge(conn, [c.item for c in segment])
            except Exception:
                conn.execute("ROLLBACK TO merged")
                conn.execute("RELEASE merged")
                return False
            conn.execute("RELEASE merged")
        except Exception as e:
            raise _InDoubt(None) from e
        for call in segment:
            call.outcome = None
        return True

    def _one_by_one(self, writes: list[_Call]) -> None:
        for call in writes:
            call.outcome, call.error = None, None
            self._alone(call)

    @property
    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn


def _segments(writes: list[_Call]) -> list[list[_Call]]:
    """`writes` cut where the kind of write changes: the merged writes of one `merge`
    queued one after another share a segment; every other write is one of its own."""
    segments: list[list[_Call]] = []
    for call in writes:
        if segments and call.merge is not None and segments[-1][-1].merge is call.merge:
            segments[-1].append(call)
        else:
            segments.append([call])
    return segments


def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
        # A group's multi-row statements keep a statement journal (the pages they change,
        # to undo a statement that fails half-way); past 64 KiB SQLite spilled it to a
        # temporary file, created, written and deleted on every other commit (bench/
        # README.md, rec6). In memory it is bounded by a group's bounds, and it was never
        # part of what is durable. Set after the migrations, whose index builds may sort
        # whole tables and keep spilling to disk.
        conn.execute("PRAGMA temp_store=MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn


def _stop_thread(queue: _Queue) -> None:
    """Tell a store thread to finish what is queued and stop."""
    with queue.wake:
        queue.closing = True
        queue.wake.notify()


def _connect_reader(path: Path) -> sqlite3.Connection:
    """The read thread's connection: it may not write (a read that tried would fail)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if mode != "wal":  # reads beside writes need it (the store thread set it)
            raise RuntimeError(f"store journal mode is {mode!r}, not WAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _private_files(path: Path) -> None:
    """Make the database file 0600 whatever the umask: created so if missing, narrowed if
    left wider from before, and its -wal and -shm files too. SQLite creates those two
    with the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            sibling = path.with_name(path.name + suffix)
            if stat.S_IMODE(sibling.stat().st_mode) != 0o600:
                sibling.chmod(0o600)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations the database has not seen yet, each in its own transaction."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"store schema version {version} is newer than this server ({len(MIGRATIONS)})"
        )
    for number in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
