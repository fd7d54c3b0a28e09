"""The embedded database: one SQLite file under the state root, its thread and its schema.

All SQL runs on one dedicated thread that owns the connection, so the event loop never
blocks on disk and writes are serialized. The database is in WAL mode with
`synchronous=FULL`: a transaction is on disk once its COMMIT returns, which is what
"acknowledged after commit" needs. Several processes may open the same file (the CLI's
`agents add` writes while a server runs).

Group commit: `write(fn)` queues `fn`, and the store thread, whenever it is free, takes
every write queued by then (up to GroupLimits.max_group writes and max_group_bytes) and
runs them in one transaction, each under its own savepoint, with one COMMIT, so one
fsync, for all of them. A write that raises is rolled back to its savepoint and fails
alone; the others commit. Every caller is answered only after that COMMIT returned (and
the group's answers reach the event loop in one hand-off). There is no timer: a write
that arrives while a group commits joins the next one ("natural" group commit; a window
that waited for more writes did not pay, bench/README.md). `read(fn)` runs `fn` in a
read transaction of its own (no fsync), on the same thread, before the writes taken with
it.

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
    #: Seconds the store thread waits for more writes after the first of a group (0: no
    #: timer, a group is whatever was queued when the thread became free).
    window: float = 0.0
    #: How long a caller waits for its call before it gives up with TimeoutError (well
    #: past SQLite's busy_timeout). The call may still be done later: a write is then
    #: committed without having been acknowledged, never the other way round.
    call_timeout: float = 120.0


#: What a write is counted as when its caller gives no size.
DEFAULT_WRITE_SIZE = 256
#: How often the idle store thread looks whether its event loop is gone (a store that
#: was never closed), in seconds.
_IDLE_TICK = 1.0
#: Seconds to wait for the database to open (and migrate), and for close to drain.
_OPEN_TIMEOUT = 60.0
_CLOSE_TIMEOUT = 60.0


@dataclass(eq=False)
class _Call:
    """One read or write on its way through the store thread."""

    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    size: int
    future: asyncio.Future[Any]
    #: Set on the store thread.
    outcome: Any = None
    error: BaseException | None = None
    #: Whether the store thread has handed its answer to the event loop.
    answered: bool = False


@dataclass
class _Queue:
    """Calls waiting for the store thread (guarded by `wake`)."""

    wake: threading.Condition = field(default_factory=threading.Condition)
    calls: collections.deque[_Call] = field(default_factory=collections.deque)
    closing: bool = False


class SqliteDatabase:
    """One open database file, its connection owned by one store thread.

    `write(fn)` calls `fn(connection)` inside a transaction that it may share with other
    writes (group commit, above); `read(fn)` inside a read transaction. Either returns
    `fn`'s value, or raises what it raised, once done. Only the repositories of this
    package call them: the connection never leaves it. The database is used from the
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
        self._queue = _Queue()
        self._conn: sqlite3.Connection | None = None
        #: Calls and write bytes queued or under way (counted on the event loop).
        self._pending = 0
        self._pending_bytes = 0
        self._room = asyncio.Event()
        self._closed = False
        self._ready: asyncio.Future[None] = loop.create_future()
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._serve, name="car-store", daemon=False)

    @classmethod
    async def open(cls, path: Path, limits: GroupLimits | None = None) -> SqliteDatabase:
        """Open (creating it if missing) and migrate the database at `path`."""
        # Runs, approvals and agent token digests: for the owner's eyes only.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_files(path)
        db = cls(path, asyncio.get_running_loop(), limits or GroupLimits())
        db._thread.start()
        try:
            await asyncio.wait_for(asyncio.shield(db._ready), _OPEN_TIMEOUT)
        except BaseException:
            db._stop_thread()
            raise
        return db

    # ------------------------------------------------------------ the event loop's side

    async def write(
        self, fn: Callable[[sqlite3.Connection], T], size: int = DEFAULT_WRITE_SIZE
    ) -> T:
        """Run `fn` in a write transaction; returns once that transaction is committed.
        `size` is what the write holds in bytes (its share of the queue's byte bound)."""
        return cast(T, await self._submit(fn, True, size))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a read transaction (one consistent state, no write)."""
        return cast(T, await self._submit(fn, False, 0))

    async def _submit(self, fn: Callable[[sqlite3.Connection], Any], write: bool, size: int) -> Any:
        if self._closed:
            raise RuntimeError("the store is closed")
        if not self._fits(size):
            await self._wait_for_room(size)
        future = self._loop.create_future()
        call = _Call(fn, write, size, future)
        queue = self._queue
        with queue.wake:
            if queue.closing:  # closing, or the store thread is gone
                raise RuntimeError("the store is closed")
            queue.calls.append(call)
            queue.wake.notify()
        self._pending += 1
        self._pending_bytes += size
        async with asyncio.timeout(self.limits.call_timeout):
            return await future

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

    def _settle(self, calls: list[_Call]) -> None:
        """On the event loop: answer the callers of a group, and make room."""
        for call in calls:
            self._pending -= 1
            self._pending_bytes -= call.size
            if call.future.done():  # its caller went away
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
        """Refuse new calls, let the store thread finish every call queued, and close."""
        self._closed = True
        self._room.set()  # callers waiting for room give up
        self._stop_thread()
        await asyncio.wait_for(asyncio.shield(self._stopped), _CLOSE_TIMEOUT)
        self._thread.join(_IDLE_TICK)  # it has nothing left to do but return

    def _stop_thread(self) -> None:
        queue = self._queue
        with queue.wake:
            queue.closing = True
            queue.wake.notify()

    # ------------------------------------------------------------ the store thread

    def _serve(self) -> None:
        try:
            self._conn = _connect(self.path)
        except BaseException as e:
            self._signal(self._ready, e)
            self._signal(self._stopped, None)
            return
        self._signal(self._ready, None)
        calls: list[_Call] = []
        try:
            while calls := self._take():
                self._execute(calls)
        finally:  # left early only through a fault of this thread: fail what is left
            self._conn.close()
            with self._queue.wake:
                self._queue.closing = True
                dropped = [c for c in calls if not c.answered] + list(self._queue.calls)
                self._queue.calls.clear()
            if dropped:
                error = RuntimeError("the store thread stopped")
                for call in dropped:
                    call.outcome, call.error = None, error
                self._hand_back(dropped)
            self._signal(self._stopped, None)

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

    def _take(self) -> list[_Call]:
        """The next calls in order: every one queued, up to a group's bounds; [] once
        closing and drained (or the event loop is gone)."""
        queue, limits = self._queue, self.limits
        with queue.wake:
            while not queue.calls:
                if queue.closing or self._loop.is_closed():
                    return []
                queue.wake.wait(_IDLE_TICK)
            if limits.window > 0:
                deadline = time.monotonic() + limits.window
                while len(queue.calls) < limits.max_group and not queue.closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    queue.wake.wait(remaining)
            taken: list[_Call] = []
            size = 0
            while queue.calls and len(taken) < limits.max_group:
                call = queue.calls[0]
                if taken and size + call.size > limits.max_group_bytes:
                    break
                taken.append(queue.calls.popleft())
                size += call.size
            return taken

    def _execute(self, calls: list[_Call]) -> None:
        reads = [c for c in calls if not c.write]
        writes = [c for c in calls if c.write]
        if reads:
            for call in reads:
                self._alone(call, "BEGIN")
            self._hand_back(reads)
        if writes:
            if len(writes) == 1:
                self._alone(writes[0], "BEGIN IMMEDIATE")
            else:
                self._group(writes)
            self._hand_back(writes)

    def _alone(self, call: _Call, begin: str) -> None:
        """`call` in a transaction of its own."""
        conn = self._connection
        try:
            conn.execute(begin)
            call.outcome = call.fn(conn)
            conn.execute("COMMIT")
        except Exception as e:
            call.outcome, call.error = None, e
            self._roll_back()
            return
        if call.write:
            self.commits += 1
            self.committed_writes += 1

    def _group(self, writes: list[_Call]) -> None:
        """`writes` in one transaction, each under a savepoint, one COMMIT for all."""
        conn = self._connection
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as e:  # e.g. another process held the database past busy_timeout
            for call in writes:
                call.error = e
            return
        failed = 0
        for call in writes:
            culprit: _Call | None = None
            try:
                conn.execute("SAVEPOINT write")
                try:
                    call.outcome = call.fn(conn)
                except Exception as e:
                    call.outcome, call.error = None, e
                    failed += 1
                    culprit = call
                    conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
            except Exception:
                # A savepoint statement failed: the transaction is in doubt (SQLite ends
                # it on some I/O errors). The writes start again, each on its own, but
                # for the one whose failure this was.
                self._roll_back()
                self._one_by_one([c for c in writes if c is not culprit])
                return
        try:
            conn.execute("COMMIT")
        except Exception as e:  # nothing of the group is on disk
            self._roll_back()
            for call in writes:
                if call.error is None:
                    call.outcome, call.error = None, e
            return
        self.commits += 1
        self.committed_writes += len(writes) - failed

    def _one_by_one(self, writes: list[_Call]) -> None:
        for call in writes:
            call.outcome, call.error = None, None
            self._alone(call, "BEGIN IMMEDIATE")

    def _roll_back(self) -> None:
        conn = self._connection
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    @property
    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
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
