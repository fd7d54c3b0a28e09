"""The embedded database: one SQLite file under the state root, its thread and its schema.

All SQL runs on one dedicated thread that owns the connection, so the event loop never
blocks on disk and writes are serialized. The database is in WAL mode with
`synchronous=FULL`: a transaction is on disk when `run` returns, which is what
"acknowledged after commit" needs. Several processes may open the same file (the CLI's
`agents add` writes while a server runs).

Schema changes are migrations: append a new entry to MIGRATIONS, never edit an old one.
`PRAGMA user_version` records how many have been applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

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
]


class SqliteDatabase:
    """One open database file. `run(fn)` calls `fn(connection)` inside one transaction.

    Only the repositories of this package call `run`: the connection never leaves it.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._conn = conn
        self._executor = executor
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        """Open (creating it if missing) and migrate the database at `path`."""
        # Runs, approvals and agent token digests: for the owner's eyes only.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_files(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="car-store")
        try:
            loop = asyncio.get_running_loop()
            conn = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, conn, executor)

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a transaction on the store thread; returns once committed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._in_transaction, fn)

    def size_bytes(self) -> int:
        """Bytes of the database on disk: the file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):  # no write-ahead log right now
                total += path.stat().st_size
        return total

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


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
