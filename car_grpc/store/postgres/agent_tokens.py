"""AgentTokenStore on PostgreSQL (schema: migration 1 of database.py)."""

from __future__ import annotations

from car_grpc.store.postgres.database import Cursor, PostgresDatabase, rows_affected
from car_grpc.store.repositories import AgentTokenRow


class PostgresAgentTokenStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def put(self, agent_id: str, digest: bytes, created_at: int) -> None:
        async def upsert(cur: Cursor) -> None:
            await cur.execute(
                "INSERT INTO agent_tokens(agent_id, token_hash, created_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (agent_id) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (agent_id, digest, created_at),
            )

        await self._db.run(upsert)

    async def digest(self, agent_id: str) -> bytes | None:
        async def select(cur: Cursor) -> bytes | None:
            await cur.execute(
                "SELECT token_hash FROM agent_tokens WHERE agent_id = %s", (agent_id,)
            )
            row = await cur.fetchone()
            return bytes(row[0]) if row else None

        return await self._db.run(select)

    async def remove(self, agent_id: str) -> bool:
        async def delete(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM agent_tokens WHERE agent_id = %s", (agent_id,))
            return rows_affected(cur) > 0

        return await self._db.run(delete)

    async def list_all(self) -> list[AgentTokenRow]:
        async def select(cur: Cursor) -> list[AgentTokenRow]:
            await cur.execute("SELECT agent_id, created_at FROM agent_tokens ORDER BY agent_id")
            return [AgentTokenRow(str(a), int(c)) for a, c in await cur.fetchall()]

        return await self._db.run(select)
