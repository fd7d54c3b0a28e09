"""RunStore on the embedded database (schema: migration 3 of database.py).

One row per run in `runs` and its ordered records in `run_records`, each a serialized
car.v1.RunRecord. Every write is atomic (a transaction, or a savepoint in a group commit)
and also moves the run's counters, so a crash leaves either the whole batch or none of it,
and the row always agrees with its records.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from car_grpc.store.repositories import RunAgentRow, RunRow, StoreConflict
from car_grpc.store.rows import IN_PROGRESS, RUN_COLUMNS, run_from_row, run_status_name
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.v1 import runs_pb2

RunStatus = runs_pb2.RunStatus


def _serialized(records: Sequence[runs_pb2.RunRecord]) -> tuple[list[bytes], int]:
    """The records as stored (serialized by the caller: the write carries bytes, which
    its caller may not change, and the queue knows their size), and that size."""
    blobs = [r.SerializeToString() for r in records]
    return blobs, sum(map(len, blobs)) + _ROW_OVERHEAD * len(blobs)


#: What a row costs beside its record, in bytes (for the store's queue bound).
_ROW_OVERHEAD = 64


def _insert_records(
    conn: sqlite3.Connection, run_id: str, first_seq: int, blobs: Sequence[bytes]
) -> None:
    """Insert the run's records from `first_seq`."""
    rows: list[object] = []
    for i, blob in enumerate(blobs):
        rows += (run_id, first_seq + i, blob)
    _insert_rows(conn, rows)


def _insert_rows(conn: sqlite3.Connection, rows: list[object]) -> None:
    """Insert `rows` (run_id, seq, record, flattened) with few statements: one for up to
    _EXACT rows, else one per power of two in their count (256 rows: one). Not
    executemany, which steps once per row, and the sqlite3 module lets go of the GIL
    around every step: on a busy server each step then waits for the event loop to hand
    the GIL back (a batch of 256 took 4-8 ms on the store thread so, against 2 ms like
    this; bench/README.md)."""
    for start, size in _chunks(len(rows) // 3, _MAX_INSERT):
        conn.execute(_insert_sql(size), rows[start * 3 : (start + size) * 3])


def _chunks(count: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the statements for `count` rows: all in one up to _EXACT (a
    group of 7 appends: one statement, not three), else powers of two up to `most` (so
    that the statements stay few and in the sqlite3 module's cache of 128)."""
    done = 0
    while done < count:
        left = count - done
        size = left if left <= _EXACT else min(1 << (left.bit_length() - 1), most)
        yield done, size
        done += size


#: Rows a statement takes in their exact number; above, a power of two.
_EXACT = 32
_MAX_INSERT = 1024


@functools.cache
def _insert_sql(rows: int) -> str:
    """The INSERT of `rows` records (3 parameters each)."""
    return "INSERT INTO run_records(run_id, seq, record) VALUES " + ", ".join(["(?, ?, ?)"] * rows)


@dataclass(frozen=True)
class _Append:
    """One `append`, as the store thread merges it with others (`_append_all`)."""

    run_id: str
    first_seq: int
    blobs: list[bytes]


def _append_all(conn: sqlite3.Connection, appends: list[_Append]) -> None:
    """Append the turns of every item, in order, or raise StoreConflict: one UPDATE of the
    runs' counters and a few INSERTs of the records for many appends (a group of them
    costs a handful of statements, not four per append). Appends to the same run go in
    successive waves, each run at most once a wave."""
    wave: dict[str, _Append] = {}
    for append in appends:
        if append.run_id in wave:
            _append_wave(conn, list(wave.values()))
            wave = {}
        wave[append.run_id] = append
    _append_wave(conn, list(wave.values()))


def _append_wave(conn: sqlite3.Connection, appends: list[_Append]) -> None:
    counters: list[object] = []
    records: list[object] = []
    for append in appends:
        counters += (append.run_id, append.first_seq, len(append.blobs))
        for i, blob in enumerate(append.blobs):
            records += (append.run_id, append.first_seq + i, blob)
    moved = 0
    for start, size in _chunks(len(appends), _MAX_ADVANCE):
        moved += conn.execute(_advance_sql(size), counters[start * 3 : (start + size) * 3]).rowcount
    if moved != len(appends):
        # Which one is not where we think is found when each runs alone (the database
        # runs them so once this raised).
        first = appends[0]
        raise StoreConflict(f"run {first.run_id!r} is not at record {first.first_seq}")
    _insert_rows(conn, records)


_MAX_ADVANCE = 256


@functools.cache
def _advance_sql(runs: int) -> str:
    """The UPDATE moving the counters of `runs` runs, each only if it is at the record
    given (run_id, first_seq, count): what does not match is not updated."""
    return (
        "UPDATE runs SET turn_count = turn_count + v.column3,"
        " record_count = record_count + v.column3"
        " FROM (VALUES " + ", ".join(["(?, ?, ?)"] * runs) + ") AS v"
        " WHERE runs.run_id = v.column1 AND runs.record_count = v.column2"
    )


def _advance(
    conn: sqlite3.Connection, run_id: str, first_seq: int, sql_set: str, *args: object
) -> None:
    """Move the run's counters past `first_seq`, or fail when it is not where we think."""
    cur = conn.execute(
        f"UPDATE runs SET {sql_set} WHERE run_id = ? AND record_count = ?",
        (*args, run_id, first_seq),
    )
    if cur.rowcount != 1:
        raise StoreConflict(f"run {run_id!r} is not at record {first_seq}")


class SqliteRunStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def create(self, row: RunRow, started: runs_pb2.RunRecord) -> None:
        blobs, size = _serialized([started])

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO runs({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, ?, 0, 1)",
                    (
                        row.run_id,
                        row.agent_id,
                        row.intent,
                        row.outcome_description,
                        row.started_at,
                        run_status_name(row.status),
                    ),
                )
            except sqlite3.IntegrityError as e:
                raise StoreConflict(f"run {row.run_id!r} exists") from e
            _insert_records(conn, row.run_id, 0, blobs)

        await self._db.write(insert, size, ("run", row.run_id))

    async def append(self, run_id: str, first_seq: int, turns: Sequence[bytes]) -> None:
        blobs = list(turns)  # the caller's list is its own
        size = sum(map(len, blobs)) + _ROW_OVERHEAD * len(blobs)
        append = _Append(run_id, first_seq, blobs)
        await self._db.write_merged(_append_all, append, size, ("run", run_id))

    async def end(
        self, run_id: str, seq: int, ended: runs_pb2.RunRecord, status: RunStatus.ValueType
    ) -> None:
        blobs, size = _serialized([ended])

        def insert(conn: sqlite3.Connection) -> None:
            _advance(
                conn,
                run_id,
                seq,
                "status = ?, ended_at = ?, record_count = record_count + 1",
                run_status_name(status),
                ended.timestamp,
            )
            _insert_records(conn, run_id, seq, blobs)

        await self._db.write(insert, size, ("run", run_id))

    async def get(self, run_id: str) -> RunRow | None:
        def select(conn: sqlite3.Connection) -> RunRow | None:
            found = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            return None if found is None else run_from_row(found)

        return await self._db.read(select, ("run", run_id))

    async def list_for_agent(self, agent_id: str) -> list[RunRow]:
        def select(conn: sqlite3.Connection) -> list[RunRow]:
            rows = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE agent_id = ?"
                " ORDER BY started_at DESC, rowid DESC",
                (agent_id,),
            ).fetchall()
            return [run_from_row(r) for r in rows]

        return await self._db.read(select)

    async def agents(self, limit: int) -> list[RunAgentRow]:
        def select(conn: sqlite3.Connection) -> list[RunAgentRow]:
            rows = conn.execute(
                "SELECT agent_id, COUNT(*), SUM(status = ?), MAX(started_at) FROM runs"
                " GROUP BY agent_id ORDER BY MAX(started_at) DESC, agent_id LIMIT ?",
                (IN_PROGRESS, limit),
            ).fetchall()
            return [RunAgentRow(str(a), int(n), int(o), int(t)) for a, n, o, t in rows]

        return await self._db.read(select)

    async def records(self, run_id: str, start: int, limit: int) -> list[runs_pb2.RunRecord]:
        def select(conn: sqlite3.Connection) -> list[runs_pb2.RunRecord]:
            rows = conn.execute(
                "SELECT record FROM run_records WHERE run_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
                (run_id, start, limit),
            ).fetchall()
            return [runs_pb2.RunRecord.FromString(blob) for (blob,) in rows]

        return await self._db.read(select, ("run", run_id))

    async def abandon_open(self, ended: runs_pb2.RunRecord) -> list[str]:
        blobs, _ = _serialized([ended])

        def close_all(conn: sqlite3.Connection) -> list[str]:
            open_runs = conn.execute(
                "SELECT run_id, record_count FROM runs WHERE status = ?",
                (IN_PROGRESS,),
            ).fetchall()
            for run_id, seq in open_runs:
                _advance(
                    conn,
                    run_id,
                    seq,
                    "status = ?, ended_at = ?, record_count = record_count + 1",
                    run_status_name(ended.ended.status),
                    ended.timestamp,
                )
                _insert_records(conn, run_id, seq, blobs)
            return [str(run_id) for run_id, _ in open_runs]

        return await self._db.write(close_all)
