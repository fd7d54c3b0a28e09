"""GoalStore on the embedded database (schema: migration 4 of database.py).

A goal is keyed by its chat session_id; its status follows the chats of that session (see
car_grpc.core.chats). Statuses are stored by name.
"""

from __future__ import annotations

import sqlite3

from car_grpc.clock import now_ms
from car_grpc.store.rows import GOAL_COLUMNS, goal_from_row, goal_status_name
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.v1 import chats_pb2

GoalStatus = chats_pb2.GoalStatus


#: What a row costs beside its text, in bytes (for the store's queue bound).
_ROW_OVERHEAD = 256


def _get(conn: sqlite3.Connection, session_id: str) -> chats_pb2.StoredGoal | None:
    row = conn.execute(f"SELECT {GOAL_COLUMNS} FROM goals WHERE session_id = ?", (session_id,))
    found = row.fetchone()
    return goal_from_row(found) if found else None


class SqliteGoalStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def put(self, session_id: str, check: str, max_iterations: int) -> chats_pb2.StoredGoal:
        def upsert(conn: sqlite3.Connection) -> chats_pb2.StoredGoal:
            conn.execute(
                f"INSERT OR REPLACE INTO goals({GOAL_COLUMNS}) VALUES (?, ?, ?, 'active',"
                " NULL, NULL, NULL, NULL, NULL, ?)",
                (session_id, check, max_iterations, now_ms()),
            )
            stored = _get(conn, session_id)
            assert stored is not None
            return stored

        size = len(check) + len(session_id) + _ROW_OVERHEAD
        return await self._db.write(upsert, size, ("goal", session_id))

    async def get(self, session_id: str) -> chats_pb2.StoredGoal | None:
        return await self._db.read(lambda conn: _get(conn, session_id), ("goal", session_id))

    async def list_all(self) -> list[chats_pb2.StoredGoal]:
        def select(conn: sqlite3.Connection) -> list[chats_pb2.StoredGoal]:
            rows = conn.execute(f"SELECT {GOAL_COLUMNS} FROM goals ORDER BY session_id").fetchall()
            return [goal_from_row(r) for r in rows]

        return await self._db.read(select)

    async def clear(self, session_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM goals WHERE session_id = ?", (session_id,))
            return cur.rowcount > 0

        return await self._db.write(delete, key=("goal", session_id))

    async def clear_all(self) -> int:
        return await self._db.write(lambda conn: conn.execute("DELETE FROM goals").rowcount)

    async def set_status(
        self,
        session_id: str,
        status: GoalStatus.ValueType,
        terminal_kind: str | None = None,
    ) -> None:
        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE goals SET status = ?, terminal_kind = COALESCE(?, terminal_kind),"
                " updated_at = ? WHERE session_id = ?",
                (goal_status_name(status), terminal_kind, now_ms(), session_id),
            )

        await self._db.write(update, key=("goal", session_id))

    async def record_evaluation(
        self,
        session_id: str,
        event: chats_pb2.ChatEvent,
        status: GoalStatus.ValueType,
    ) -> None:
        reason = event.reason if event.HasField("reason") else None
        values = (
            goal_status_name(status),
            event.iteration if event.HasField("iteration") else None,
            event.met if event.HasField("met") else None,
            event.grounded if event.HasField("grounded") else None,
            reason,
            now_ms(),
            session_id,
        )

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE goals SET status = ?, last_iteration = ?, last_met = ?,"
                " last_grounded = ?, last_reason = ?, updated_at = ? WHERE session_id = ?",
                values,
            )

        await self._db.write(update, len(reason or "") + _ROW_OVERHEAD, ("goal", session_id))

    async def reset_running(self) -> int:
        def update(conn: sqlite3.Connection) -> int:
            cur = conn.execute("UPDATE goals SET status = 'active' WHERE status = 'running'")
            return cur.rowcount

        return await self._db.write(update)
