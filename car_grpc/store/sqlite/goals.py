"""GoalStore on the embedded database (schema: migrations 4 and 8 of database.py).

A goal is keyed by its chat session_id and belongs to the principal that set it; its
status follows the chats of that session (see car_grpc.core.chats). Statuses are stored
by name.
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


def _mine(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its parameter) for `owner`'s goals; every goal for None."""
    return ("", ()) if owner is None else (" AND owner = ?", (owner,))


def _get(
    conn: sqlite3.Connection, session_id: str, owner: str | None
) -> chats_pb2.StoredGoal | None:
    mine, param = _mine(owner)
    row = conn.execute(
        f"SELECT {GOAL_COLUMNS} FROM goals WHERE session_id = ?{mine}", (session_id, *param)
    )
    found = row.fetchone()
    return goal_from_row(found) if found else None


class SqliteGoalStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def put(
        self, session_id: str, check: str, max_iterations: int, owner: str, *, any_owner: bool
    ) -> chats_pb2.StoredGoal | None:
        def upsert(conn: sqlite3.Connection) -> chats_pb2.StoredGoal | None:
            # The whole row but its owner is replaced: no evaluation of an earlier goal is
            # carried over. Another owner's goal is left alone unless `any_owner`.
            conn.execute(
                f"INSERT INTO goals({GOAL_COLUMNS}, owner) VALUES (?, ?, ?, 'active',"
                " NULL, NULL, NULL, NULL, NULL, ?, ?)"
                " ON CONFLICT (session_id) DO UPDATE SET check_text = excluded.check_text,"
                " max_iterations = excluded.max_iterations, status = excluded.status,"
                " last_iteration = NULL, last_met = NULL, last_grounded = NULL,"
                " last_reason = NULL, terminal_kind = NULL, updated_at = excluded.updated_at"
                " WHERE goals.owner = excluded.owner OR ?",
                (session_id, check, max_iterations, now_ms(), owner, any_owner),
            )
            return _get(conn, session_id, None if any_owner else owner)

        size = len(check) + len(session_id) + len(owner) + _ROW_OVERHEAD
        return await self._db.write(upsert, size, ("goal", session_id))

    async def get(self, session_id: str, owner: str | None = None) -> chats_pb2.StoredGoal | None:
        return await self._db.read(lambda conn: _get(conn, session_id, owner), ("goal", session_id))

    async def list_all(self, owner: str | None = None) -> list[chats_pb2.StoredGoal]:
        where = "" if owner is None else " WHERE owner = ?"

        def select(conn: sqlite3.Connection) -> list[chats_pb2.StoredGoal]:
            rows = conn.execute(
                f"SELECT {GOAL_COLUMNS} FROM goals{where} ORDER BY session_id",
                () if owner is None else (owner,),
            ).fetchall()
            return [goal_from_row(r) for r in rows]

        return await self._db.read(select)

    async def clear(self, session_id: str, owner: str | None = None) -> bool:
        mine, param = _mine(owner)

        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"DELETE FROM goals WHERE session_id = ?{mine}", (session_id, *param)
            )
            return cur.rowcount > 0

        return await self._db.write(delete, key=("goal", session_id))

    async def clear_all(self, owner: str | None = None) -> int:
        where = "" if owner is None else " WHERE owner = ?"

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"DELETE FROM goals{where}", () if owner is None else (owner,)
            ).rowcount

        return await self._db.write(delete)

    async def set_status(
        self,
        session_id: str,
        status: GoalStatus.ValueType,
        terminal_kind: str | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        mine, param = _mine(owner)

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE goals SET status = ?, terminal_kind = COALESCE(?, terminal_kind),"
                f" updated_at = ? WHERE session_id = ?{mine}",
                (goal_status_name(status), terminal_kind, now_ms(), session_id, *param),
            )

        await self._db.write(update, key=("goal", session_id))

    async def record_evaluation(
        self,
        session_id: str,
        event: chats_pb2.ChatEvent,
        status: GoalStatus.ValueType,
        *,
        owner: str | None = None,
    ) -> None:
        mine, param = _mine(owner)
        reason = event.reason if event.HasField("reason") else None
        values = (
            goal_status_name(status),
            event.iteration if event.HasField("iteration") else None,
            event.met if event.HasField("met") else None,
            event.grounded if event.HasField("grounded") else None,
            reason,
            now_ms(),
            session_id,
            *param,
        )

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE goals SET status = ?, last_iteration = ?, last_met = ?,"
                f" last_grounded = ?, last_reason = ?, updated_at = ? WHERE session_id = ?{mine}",
                values,
            )

        await self._db.write(update, len(reason or "") + _ROW_OVERHEAD, ("goal", session_id))

    async def reset_running(self) -> int:
        def update(conn: sqlite3.Connection) -> int:
            cur = conn.execute("UPDATE goals SET status = 'active' WHERE status = 'running'")
            return cur.rowcount

        return await self._db.write(update)
