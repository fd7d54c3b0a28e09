"""A2aClientStore and A2aTaskStore on the embedded database (schema: migration 6 of
database.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from car_grpc.store.repositories import A2aClientRow, A2aTaskRow, StoreConflict
from car_grpc.store.rows import A2A_TASK_COLUMNS, a2a_task_from_row
from car_grpc.store.sqlite.database import SqliteDatabase

#: What a task row costs beside its task, in bytes (for the store's queue bound).
_ROW_OVERHEAD = 256


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


class SqliteA2aClientStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def put(self, name: str, digest: bytes, created_at: int) -> None:
        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO a2a_clients(name, token_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (name, digest, created_at),
            )

        await self._db.write(upsert)

    async def find(self, digest: bytes) -> str | None:
        def select(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT name FROM a2a_clients WHERE token_hash = ?", (digest,)
            ).fetchone()
            return str(row[0]) if row else None

        return await self._db.read(select)

    async def remove(self, name: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM a2a_clients WHERE name = ?", (name,)).rowcount > 0

        return await self._db.write(delete)

    async def list_all(self) -> list[A2aClientRow]:
        def select(conn: sqlite3.Connection) -> list[A2aClientRow]:
            rows = conn.execute("SELECT name, created_at FROM a2a_clients ORDER BY name")
            return [A2aClientRow(str(n), int(c)) for n, c in rows.fetchall()]

        return await self._db.read(select)


class SqliteA2aTaskStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def put(self, row: A2aTaskRow) -> None:
        def upsert(conn: sqlite3.Connection) -> None:
            owner = conn.execute(
                "SELECT agent_id, caller FROM a2a_tasks WHERE task_id = ?", (row.task_id,)
            ).fetchone()
            if owner is not None and tuple(owner) != (row.agent_id, row.caller):
                raise StoreConflict(f"task {row.task_id!r} belongs to another agent or caller")
            conn.execute(
                f"INSERT OR REPLACE INTO a2a_tasks({A2A_TASK_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.task_id, row.agent_id, row.caller, row.context_id, row.state,
                    row.updated_at, row.task,
                ),
            )  # fmt: skip

        await self._db.write(upsert, _ROW_OVERHEAD + len(row.task), ("a2a_task", row.task_id))

    async def get(self, task_id: str) -> A2aTaskRow | None:
        def select(conn: sqlite3.Connection) -> A2aTaskRow | None:
            found = conn.execute(
                f"SELECT {A2A_TASK_COLUMNS} FROM a2a_tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            return a2a_task_from_row(found) if found else None

        return await self._db.read(select, ("a2a_task", task_id))

    async def page(
        self,
        agent_id: str,
        caller: str,
        *,
        context_id: str | None,
        state: int | None,
        limit: int,
        offset: int,
    ) -> tuple[list[A2aTaskRow], int]:
        where = "caller = ? AND agent_id = ?"
        args: list[object] = [caller, agent_id]
        if context_id is not None:
            where += " AND context_id = ?"
            args.append(context_id)
        if state is not None:
            where += " AND state = ?"
            args.append(state)

        def select(conn: sqlite3.Connection) -> tuple[list[A2aTaskRow], int]:
            (total,) = conn.execute(
                f"SELECT count(*) FROM a2a_tasks WHERE {where}", args
            ).fetchone()
            rows = conn.execute(
                f"SELECT {A2A_TASK_COLUMNS} FROM a2a_tasks WHERE {where}"
                " ORDER BY updated_at DESC, task_id DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return [a2a_task_from_row(r) for r in rows], int(total)

        return await self._db.read(select)

    async def delete(self, task_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM a2a_tasks WHERE task_id = ?", (task_id,)).rowcount > 0

        return await self._db.write(delete, key=("a2a_task", task_id))

    async def prune(self, caller: str, keep: int, terminal: Sequence[int]) -> int:
        states = list(terminal)

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"DELETE FROM a2a_tasks WHERE task_id IN (SELECT task_id FROM a2a_tasks"
                f" WHERE caller = ? AND state IN ({_marks(states)}) AND task_id NOT IN"
                " (SELECT task_id FROM a2a_tasks WHERE caller = ?"
                " ORDER BY updated_at DESC, task_id DESC LIMIT ?))",
                [caller, *states, caller, keep],
            ).rowcount

        return await self._db.write(delete)

    async def in_states(self, states: Sequence[int]) -> list[A2aTaskRow]:
        wanted = list(states)

        def select(conn: sqlite3.Connection) -> list[A2aTaskRow]:
            rows = conn.execute(
                f"SELECT {A2A_TASK_COLUMNS} FROM a2a_tasks WHERE state IN ({_marks(wanted)})"
                " ORDER BY updated_at, task_id",
                wanted,
            ).fetchall()
            return [a2a_task_from_row(r) for r in rows]

        return await self._db.read(select)
