"""AgentTokenStore on the embedded database (schema: migration 1 of database.py)."""

from __future__ import annotations

import sqlite3

from car_grpc.store.repositories import AgentTokenRow
from car_grpc.store.sqlite.database import SqliteDatabase


class SqliteAgentTokenStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def put(self, agent_id: str, digest: bytes, created_at: int) -> None:
        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO agent_tokens(agent_id, token_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(agent_id) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (agent_id, digest, created_at),
            )

        await self._db.write(upsert, key=("agent", agent_id))

    async def digest(self, agent_id: str) -> bytes | None:
        def select(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT token_hash FROM agent_tokens WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            return bytes(row[0]) if row else None

        return await self._db.read(select, ("agent", agent_id))

    async def remove(self, agent_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM agent_tokens WHERE agent_id = ?", (agent_id,))
            return cur.rowcount > 0

        return await self._db.write(delete, key=("agent", agent_id))

    async def list_all(self) -> list[AgentTokenRow]:
        def select(conn: sqlite3.Connection) -> list[AgentTokenRow]:
            rows = conn.execute(
                "SELECT agent_id, created_at FROM agent_tokens ORDER BY agent_id"
            ).fetchall()
            return [AgentTokenRow(str(a), int(c)) for a, c in rows]

        return await self._db.read(select)
