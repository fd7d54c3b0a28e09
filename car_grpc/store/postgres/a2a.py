"""A2aClientStore and A2aTaskStore on PostgreSQL (schema: migration 6 of database.py)."""

from __future__ import annotations

from collections.abc import Sequence

from car_grpc.store.postgres.database import Cursor, PostgresDatabase, rows_affected
from car_grpc.store.repositories import A2aClientRow, A2aTaskRow, StoreConflict
from car_grpc.store.rows import A2A_TASK_COLUMNS, a2a_task_from_row


class PostgresA2aClientStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def put(self, name: str, digest: bytes, created_at: int) -> None:
        async def upsert(cur: Cursor) -> None:
            await cur.execute(
                "INSERT INTO a2a_clients(name, token_hash, created_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (name, digest, created_at),
            )

        await self._db.run(upsert)

    async def find(self, digest: bytes) -> str | None:
        async def select(cur: Cursor) -> str | None:
            await cur.execute("SELECT name FROM a2a_clients WHERE token_hash = %s", (digest,))
            row = await cur.fetchone()
            return str(row[0]) if row else None

        return await self._db.run(select)

    async def remove(self, name: str) -> bool:
        async def delete(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM a2a_clients WHERE name = %s", (name,))
            return rows_affected(cur) > 0

        return await self._db.run(delete)

    async def list_all(self) -> list[A2aClientRow]:
        async def select(cur: Cursor) -> list[A2aClientRow]:
            await cur.execute("SELECT name, created_at FROM a2a_clients ORDER BY name")
            return [A2aClientRow(str(n), int(c)) for n, c in await cur.fetchall()]

        return await self._db.run(select)


class PostgresA2aTaskStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def put(self, row: A2aTaskRow) -> None:
        async def upsert(cur: Cursor) -> None:
            await cur.execute(
                f"INSERT INTO a2a_tasks({A2A_TASK_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (task_id) DO UPDATE SET context_id = excluded.context_id,"
                " state = excluded.state, updated_at = excluded.updated_at,"
                " task = excluded.task"
                " WHERE a2a_tasks.agent_id = excluded.agent_id"
                " AND a2a_tasks.caller = excluded.caller",
                (
                    row.task_id, row.agent_id, row.caller, row.context_id, row.state,
                    row.updated_at, row.task,
                ),
            )  # fmt: skip
            if rows_affected(cur) == 0:
                raise StoreConflict(f"task {row.task_id!r} belongs to another agent or caller")

        await self._db.run(upsert)

    async def get(self, task_id: str) -> A2aTaskRow | None:
        async def select(cur: Cursor) -> A2aTaskRow | None:
            await cur.execute(
                f"SELECT {A2A_TASK_COLUMNS} FROM a2a_tasks WHERE task_id = %s", (task_id,)
            )
            row = await cur.fetchone()
            return a2a_task_from_row(row) if row else None

        return await self._db.run(select)

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
        where = "caller = %s AND agent_id = %s"
        args: list[object] = [caller, agent_id]
        if context_id is not None:
            where += " AND context_id = %s"
            args.append(context_id)
        if state is not None:
            where += " AND state = %s"
            args.append(state)

        async def select(cur: Cursor) -> tuple[list[A2aTaskRow], int]:
            await cur.execute(f"SELECT count(*) FROM a2a_tasks WHERE {where}", args)
            counted = await cur.fetchone()
            assert counted is not None
            await cur.execute(
                f"SELECT {A2A_TASK_COLUMNS} FROM a2a_tasks WHERE {where}"
                " ORDER BY updated_at DESC, task_id DESC LIMIT %s OFFSET %s",
                [*args, limit, offset],
            )
            return [a2a_task_from_row(r) for r in await cur.fetchall()], int(counted[0])

        return await self._db.run(select)

    async def delete(self, task_id: str) -> bool:
        async def delete(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM a2a_tasks WHERE task_id = %s", (task_id,))
            return rows_affected(cur) > 0

        return await self._db.run(delete)

    async def prune(self, caller: str, keep: int, terminal: Sequence[int]) -> int:
        async def delete(cur: Cursor) -> int:
            await cur.execute(
                "DELETE FROM a2a_tasks WHERE caller = %s AND state = ANY(%s) AND task_id NOT IN"
                " (SELECT task_id FROM a2a_tasks WHERE caller = %s"
                " ORDER BY updated_at DESC, task_id DESC LIMIT %s)",
                (caller, list(terminal), caller, keep),
            )
            return rows_affected(cur)

        return await self._db.run(delete)

    async def in_states(self, states: Sequence[int]) -> list[A2aTaskRow]:
        async def select(cur: Cursor) -> list[A2aTaskRow]:
            # This core's tasks and those of no core: in a cluster the other cores'
            # tasks are theirs (migration 8 stamps each task with the core that made it).
            await cur.execute(
                f"SELECT {A2A_TASK_COLUMNS} FROM a2a_tasks WHERE state = ANY(%s)"
                " AND core_id IN ('', COALESCE(current_setting('car.core_id', true), ''))"
                " ORDER BY updated_at, task_id",
                (list(states),),
            )
            return [a2a_task_from_row(r) for r in await cur.fetchall()]

        return await self._db.run(select)
