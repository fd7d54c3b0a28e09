"""GoalStore on PostgreSQL (schema: migrations 4 and 9 of database.py).

A goal is keyed by its chat session_id and belongs to the principal that set it; its
status follows the chats of that session (see car_grpc.core.chats). Statuses are stored
by name.
"""

from __future__ import annotations

from car_grpc.clock import now_ms
from car_grpc.store.postgres.database import Cursor, PostgresDatabase, rows_affected
from car_grpc.store.rows import GOAL_COLUMNS, goal_from_row, goal_status_name
from car_grpc.v1 import chats_pb2

GoalStatus = chats_pb2.GoalStatus


def _mine(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its parameter) for `owner`'s goals; every goal for None."""
    return ("", ()) if owner is None else (" AND owner = %s", (owner,))


async def _get(cur: Cursor, session_id: str, owner: str | None) -> chats_pb2.StoredGoal | None:
    mine, param = _mine(owner)
    await cur.execute(
        f"SELECT {GOAL_COLUMNS} FROM goals WHERE session_id = %s{mine}", (session_id, *param)
    )
    found = await cur.fetchone()
    return goal_from_row(found) if found else None


#: A goal's status is moved by the core whose chat runs it: that core is recorded, so
#: that a restart (or the release of a dead core) resets only its own `running` goals.
_THIS_CORE = "core_id = COALESCE(current_setting('car.core_id', true), '')"


class PostgresGoalStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def put(
        self, session_id: str, check: str, max_iterations: int, owner: str, *, any_owner: bool
    ) -> chats_pb2.StoredGoal | None:
        async def upsert(cur: Cursor) -> chats_pb2.StoredGoal | None:
            # The whole row but its owner is replaced: no evaluation of an earlier goal is
            # carried over. Another owner's goal is left alone unless `any_owner`.
            await cur.execute(
                f"INSERT INTO goals({GOAL_COLUMNS}, owner) VALUES (%s, %s, %s, 'active',"
                " NULL, NULL, NULL, NULL, NULL, %s, %s)"
                " ON CONFLICT (session_id) DO UPDATE SET check_text = excluded.check_text,"
                " max_iterations = excluded.max_iterations, status = excluded.status,"
                " last_iteration = NULL, last_met = NULL, last_grounded = NULL,"
                " last_reason = NULL, terminal_kind = NULL, updated_at = excluded.updated_at"
                " WHERE goals.owner = excluded.owner OR %s"
                f" RETURNING {GOAL_COLUMNS}",
                (session_id, check, max_iterations, now_ms(), owner, any_owner),
            )
            stored = await cur.fetchone()
            return None if stored is None else goal_from_row(stored)

        return await self._db.run(upsert)

    async def get(self, session_id: str, owner: str | None = None) -> chats_pb2.StoredGoal | None:
        return await self._db.run(lambda cur: _get(cur, session_id, owner))

    async def list_all(self, owner: str | None = None) -> list[chats_pb2.StoredGoal]:
        where = "" if owner is None else " WHERE owner = %s"

        async def select(cur: Cursor) -> list[chats_pb2.StoredGoal]:
            await cur.execute(
                f"SELECT {GOAL_COLUMNS} FROM goals{where} ORDER BY session_id",
                () if owner is None else (owner,),
            )
            return [goal_from_row(r) for r in await cur.fetchall()]

        return await self._db.run(select)

    async def clear(self, session_id: str, owner: str | None = None) -> bool:
        mine, param = _mine(owner)

        async def delete(cur: Cursor) -> bool:
            await cur.execute(
                f"DELETE FROM goals WHERE session_id = %s{mine}", (session_id, *param)
            )
            return rows_affected(cur) > 0

        return await self._db.run(delete)

    async def clear_all(self, owner: str | None = None) -> int:
        where = "" if owner is None else " WHERE owner = %s"

        async def delete(cur: Cursor) -> int:
            await cur.execute(f"DELETE FROM goals{where}", () if owner is None else (owner,))
            return rows_affected(cur)

        return await self._db.run(delete)

    async def set_status(
        self,
        session_id: str,
        status: GoalStatus.ValueType,
        terminal_kind: str | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        mine, param = _mine(owner)

        async def update(cur: Cursor) -> None:
            await cur.execute(
                "UPDATE goals SET status = %s,"
                " terminal_kind = COALESCE(%s::text, terminal_kind),"
                f" updated_at = %s, {_THIS_CORE} WHERE session_id = %s{mine}",
                (goal_status_name(status), terminal_kind, now_ms(), session_id, *param),
            )

        await self._db.run(update)

    async def record_evaluation(
        self,
        session_id: str,
        event: chats_pb2.ChatEvent,
        status: GoalStatus.ValueType,
        *,
        owner: str | None = None,
    ) -> None:
        mine, param = _mine(owner)
        values = (
            goal_status_name(status),
            event.iteration if event.HasField("iteration") else None,
            event.met if event.HasField("met") else None,
            event.grounded if event.HasField("grounded") else None,
            event.reason if event.HasField("reason") else None,
            now_ms(),
            session_id,
            *param,
        )

        async def update(cur: Cursor) -> None:
            await cur.execute(
                "UPDATE goals SET status = %s, last_iteration = %s, last_met = %s,"
                " last_grounded = %s, last_reason = %s, updated_at = %s,"
                f" {_THIS_CORE} WHERE session_id = %s{mine}",
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
