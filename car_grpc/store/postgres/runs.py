"""RunStore on PostgreSQL (schema: migration 3 of database.py).

One row per run in `runs` and its ordered records in `run_records`, each a serialized
car.v1.RunRecord. Every write is one transaction that also moves the run's counters, so a
crash leaves either the whole batch or none of it, and the row always agrees with its
records. A write names the record it starts at: the counter update matches only a run at
that record (a concurrent write of the same run waits for the row, then finds it moved).
"""

from __future__ import annotations

from collections.abc import Sequence

from car_grpc.store.postgres.database import Cursor, PostgresDatabase, rows_affected
from car_grpc.store.repositories import RunAgentRow, RunRow, StoreConflict
from car_grpc.store.rows import IN_PROGRESS, RUN_COLUMNS, run_from_row, run_status_name
from car_grpc.v1 import runs_pb2

RunStatus = runs_pb2.RunStatus


async def _insert_records(
    cur: Cursor, run_id: str, first_seq: int, records: Sequence[bytes]
) -> None:
    """Store `records` (serialized RunRecords) from seq `first_seq`, in one statement."""
    await cur.execute(
        "INSERT INTO run_records(run_id, seq, record)"
        " SELECT %s, %s + n - 1, r FROM unnest(%s::bytea[]) WITH ORDINALITY AS t(r, n)",
        (run_id, first_seq, list(records)),
    )


async def _advance(cur: Cursor, run_id: str, first_seq: int, sql_set: str, *args: object) -> None:
    """Move the run's counters past `first_seq`, or fail when it is not where we think."""
    await cur.execute(
        f"UPDATE runs SET {sql_set} WHERE run_id = %s AND record_count = %s",
        (*args, run_id, first_seq),
    )
    if rows_affected(cur) != 1:
        raise StoreConflict(f"run {run_id!r} is not at record {first_seq}")


_END = "status = %s, ended_at = %s, record_count = record_count + 1"


class PostgresRunStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def create(self, row: RunRow, started: runs_pb2.RunRecord) -> None:
        async def insert(cur: Cursor) -> None:
            await cur.execute(
                f"INSERT INTO runs({RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, NULL, %s, 0, 1)"
                " ON CONFLICT (run_id) DO NOTHING",
                (
                    row.run_id,
                    row.agent_id,
                    row.intent,
                    row.outcome_description,
                    row.started_at,
                    run_status_name(row.status),
                ),
            )
            if rows_affected(cur) != 1:
                raise StoreConflict(f"run {row.run_id!r} exists")
            await _insert_records(cur, row.run_id, 0, [started.SerializeToString()])

        await self._db.run(insert)

    async def append(self, run_id: str, first_seq: int, turns: Sequence[bytes]) -> None:
        count = len(turns)

        async def insert(cur: Cursor) -> None:
            await _advance(
                cur,
                run_id,
                first_seq,
                "turn_count = turn_count + %s, record_count = record_count + %s",
                count,
                count,
            )
            await _insert_records(cur, run_id, first_seq, turns)

        await self._db.run(insert)

    async def end(
        self, run_id: str, seq: int, ended: runs_pb2.RunRecord, status: RunStatus.ValueType
    ) -> None:
        async def insert(cur: Cursor) -> None:
            await _advance(cur, run_id, seq, _END, run_status_name(status), ended.timestamp)
            await _insert_records(cur, run_id, seq, [ended.SerializeToString()])

        await self._db.run(insert)

    async def get(self, run_id: str) -> RunRow | None:
        async def select(cur: Cursor) -> RunRow | None:
            await cur.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = %s", (run_id,))
            found = await cur.fetchone()
            return None if found is None else run_from_row(found)

        return await self._db.run(select)

    async def list_for_agent(self, agent_id: str) -> list[RunRow]:
        async def select(cur: Cursor) -> list[RunRow]:
            await cur.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE agent_id = %s"
                " ORDER BY started_at DESC, ord DESC",
                (agent_id,),
            )
            return [run_from_row(r) for r in await cur.fetchall()]

        return await self._db.run(select)

    async def agents(self, limit: int) -> list[RunAgentRow]:
        async def select(cur: Cursor) -> list[RunAgentRow]:
            await cur.execute(
                "SELECT agent_id, COUNT(*), COUNT(*) FILTER (WHERE status = %s),"
                " MAX(started_at) FROM runs"
                " GROUP BY agent_id ORDER BY MAX(started_at) DESC, agent_id LIMIT %s",
                (IN_PROGRESS, limit),
            )
            rows = await cur.fetchall()
            return [RunAgentRow(str(a), int(n), int(o), int(t)) for a, n, o, t in rows]

        return await self._db.run(select)

    async def records(self, run_id: str, start: int, limit: int) -> list[runs_pb2.RunRecord]:
        async def select(cur: Cursor) -> list[runs_pb2.RunRecord]:
            await cur.execute(
                "SELECT record FROM run_records WHERE run_id = %s AND seq >= %s"
                " ORDER BY seq LIMIT %s",
                (run_id, start, limit),
            )
            return [runs_pb2.RunRecord.FromString(blob) for (blob,) in await cur.fetchall()]

        return await self._db.run(select)

    async def abandon_open(self, ended: runs_pb2.RunRecord) -> list[str]:
        status = run_status_name(ended.ended.status)

        async def close_all(cur: Cursor) -> list[str]:
            await cur.execute(
                # This core's own (a cluster's other cores hold theirs), and those of no
                # core (stored before the cluster's migration).
                "SELECT run_id, record_count FROM runs WHERE status = %s"
                " AND core_id IN ('', COALESCE(current_setting('car.core_id', true), ''))"
                " ORDER BY ord FOR UPDATE",
                (IN_PROGRESS,),
            )
            open_runs = [(str(run_id), int(seq)) for run_id, seq in await cur.fetchall()]
            for run_id, seq in open_runs:
                await _advance(cur, run_id, seq, _END, status, ended.timestamp)
                await _insert_records(cur, run_id, seq, [ended.SerializeToString()])
            return [run_id for run_id, _ in open_runs]

        return await self._db.run(close_all)
