"""GoalStore on PostgreSQL (schema: migration 4 of database.py).

A goal is keyed by its chat session_id; its status follows the chats of that session (see
car_grpc.core.chats). Statuses are stored by name.
"""

from __future__ import annotations

from car_grpc.clock import now_ms
from car_grpc.store.postgres.database import Cursor, PostgresDatabase, rows_affected
from car_grpc.store.rows import GOAL_COLUMNS, goal_from_row, goal_status_name
from car_grpc.v1 import chats_pb2

GoalStatus = chats_pb2.GoalStatus


async def _get(cur: Cursor, session_id: str) -> chats_pb2.StoredGoal | None:
    await cur.execute(f"SELECT {GOAL_COLUMNS} FROM goals WHERE session_id = %s", (session_id,))
    found = await cur.fetchone()
    return goal_from_row(found) if found else None


#: A goal's status is moved by the core whose chat runs it: that core is recorded, so
#: that a restart (or the release of a dead core) resets only its own `running` goals.
_THIS_CORE = "core_id = COALESCE(current_setting('car.core_id', true), '')"


class PostgresGoalStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def put(self, session_id: str, check: str, max_iterations: int) -> chats_pb2.StoredGoal:
        async def upsert(cur: Cursor) -> chats_pb2.StoredGoal:
            # The whole row is replaced: no evaluation of an earlier goal is carried over.
            await cur.execute(
                f"INSERT INTO goals({GOAL_COLUMNS}) VALUES (%s, %s, %s, 'active',"
                " NULL, NULL, NULL, NULL, NULL, %s)"
                " ON CONFLICT (session_id) DO UPDATE SET check_text = excluded.check_text,"
                " max_iterations = excluded.max_iterations, status = excluded.status,"
                " last_iteration = NULL, last_met = NULL, last_grounded = NULL,"
                " last_reason = NULL, terminal_kind = NULL, updated_at = excluded.updated_at"
                f" RETURNING {GOAL_COLUMNS}",
                (session_id, check, max_iterations, now_ms()),
            )
            stored = await cur.fetchone()
            assert stored is not None
            return goal_from_row(stored)

        return await self._db.run(upsert)

    async def get(self, session_id: str) -> chats_pb2.StoredGoal | None:
        return await self._db.run(lambda cur: _get(cur, session_id))

    async def list_all(self) -> list[chats_pb2.StoredGoal]:
        async def select(cur: Cursor) -> list[chats_pb2.StoredGoal]:
            await cur.execute(f"SELECT {GOAL_COLUMNS} FROM goals ORDER BY session_id")
            return [goal_from_row(r) for r in await cur.fetchall()]

        return await self._db.run(select)

    async def clear(self, session_id: str) -> bool:
        async def delete(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM goals WHERE session_id = %s", (session_id,))
            return rows_affected(cur) > 0

        return await self._db.run(delete)

    async def clear_all(self) -> int:
        async def delete(cur: Cursor) -> int:
            await cur.execute("DELETE FROM goals")
            return rows_affected(cur)

        return await self._db.run(delete)

    async def set_status(
        self,
        session_id: str,
        status: GoalStatus.ValueType,
        terminal_kind: str | None = None,
    ) -> None:
        async def update(cur: Cursor) -> None:
            await cur.execute(
                "UPDATE goals SET status = %s,"
                " terminal_kind = COALESCE(%s::text, terminal_kind),"
                f" updated_at = %s, {_THIS_CORE} WHERE session_id = %s",
                (goal_status_name(status), terminal_kind, now_ms(), session_id),
            )

        await self._db.run(update)

    async def record_evaluation(
        self,
        session_id: str,
        event: chats_pb2.ChatEvent,
        status: GoalStatus.ValueType,
    ) -> None:
        values = (
            goal_status_name(status),
            event.iteration if event.HasField("iteration") else None,
            event.met if event.HasField("met") else None,
            event.grounded if event.HasField("grounded") else None,
            event.reason if event.HasField("reason") else None,
            now_ms(),
            session_id,
        )

        async def update(cur: Cursor) -> None:
            await cur.execute(
                "UPDATE goals SET status = %s, last_iteration = %s, last_met = %s,"
                " last_grounded = %s, last_reason = %s, updated_at = %s,"
                f" {_THIS_CORE} WHERE session_id = %s",
                values,
            )

        await self._db.run(update)

    async def reset_running(self) -> int:
        async def update(cur: Cursor) -> int:
            # This core's (a cluster's other cores run theirs), and those of no core.
            await cur.execute(
                "UPDATE goals SET status = 'active' WHERE status = 'running'"
                " AND core_id IN ('', COALESCE(current_setting('car.core_id', true), ''))"
            )
            return rows_affected(cur)

        return await self._db.run(update)
