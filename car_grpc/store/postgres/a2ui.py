"""A2uiStore on PostgreSQL (schema: migration 7 of database.py).

A surface row is one car.v1.A2uiSurface, serialized whole in `surface` (owner key,
creation and expiry copied out for queries), with its sealed route credential in `route`;
a peer row is one serialized car.v1.A2aPeer. Each method is one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from car_grpc.store.postgres.database import Cursor, PostgresDatabase
from car_grpc.store.repositories import SurfaceRow
from car_grpc.v1 import a2ui_pb2

_COLUMNS = "surface, owner_key, route"


def _row(values: tuple[bytes, str, bytes | None]) -> SurfaceRow:
    route = None if values[2] is None else bytes(values[2])
    return SurfaceRow(a2ui_pb2.A2uiSurface.FromString(bytes(values[0])), values[1], route)


async def _put(cur: Cursor, row: SurfaceRow) -> None:
    s = row.surface
    await cur.execute(
        "INSERT INTO a2ui_surfaces (surface_id, owner_key, created_at, expires_at, surface, route)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (surface_id) DO UPDATE SET"
        " owner_key = excluded.owner_key, created_at = excluded.created_at,"
        " expires_at = excluded.expires_at, surface = excluded.surface, route = excluded.route",
        (s.surface_id, row.owner_key, s.created_at, s.expires_at, s.SerializeToString(), row.route),
    )


class PostgresA2uiStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def put_surface(self, row: SurfaceRow) -> None:
        await self._db.run(lambda cur: _put(cur, row))

    async def write_surfaces(self, put: Sequence[SurfaceRow], delete: Sequence[str]) -> None:
        async def write(cur: Cursor) -> None:
            for row in put:
                await _put(cur, row)
            for surface_id in delete:
                await cur.execute("DELETE FROM a2ui_surfaces WHERE surface_id = %s", (surface_id,))

        await self._db.run(write)

    async def get_surface(self, surface_id: str, now: int) -> SurfaceRow | None:
        async def read(cur: Cursor) -> SurfaceRow | None:
            await cur.execute(
                f"SELECT {_COLUMNS} FROM a2ui_surfaces WHERE surface_id = %s AND expires_at > %s",
                (surface_id, now),
            )
            found = await cur.fetchone()
            return None if found is None else _row(found)

        return await self._db.run(read)

    async def live_surfaces(self, now: int) -> list[SurfaceRow]:
        async def read(cur: Cursor) -> list[SurfaceRow]:
            await cur.execute(
                f"SELECT {_COLUMNS} FROM a2ui_surfaces WHERE expires_at > %s"
                " ORDER BY created_at, surface_id",
                (now,),
            )
            return [_row(r) for r in await cur.fetchall()]

        return await self._db.run(read)

    async def count_surfaces(self, now: int, owner_key: str) -> tuple[int, int]:
        async def read(cur: Cursor) -> tuple[int, int]:
            await cur.execute(
                "SELECT COUNT(*) FILTER (WHERE owner_key = %s), COUNT(*) FROM a2ui_surfaces"
                " WHERE expires_at > %s",
                (owner_key, now),
            )
            found = await cur.fetchone()
            assert found is not None
            return int(found[0]), int(found[1])

        return await self._db.run(read)

    async def delete_surface(self, surface_id: str) -> bool:
        async def write(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM a2ui_surfaces WHERE surface_id = %s", (surface_id,))
            return cur.rowcount == 1

        return await self._db.run(write)

    async def reap(self, now: int) -> list[str]:
        async def write(cur: Cursor) -> list[str]:
            await cur.execute(
                "DELETE FROM a2ui_surfaces WHERE expires_at <= %s RETURNING surface_id, created_at",
                (now,),
            )
            rows = await cur.fetchall()
            return [r[0] for r in sorted(rows, key=lambda r: (r[1], r[0]))]

        return await self._db.run(write)

    async def add_peer(self, peer: a2ui_pb2.A2aPeer) -> bool:
        async def write(cur: Cursor) -> bool:
            await cur.execute(
                "INSERT INTO a2a_peers (slug, url, peer) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (peer.slug, peer.url, peer.SerializeToString()),
            )
            return cur.rowcount == 1

        return await self._db.run(write)

    async def peers(self) -> list[a2ui_pb2.A2aPeer]:
        async def read(cur: Cursor) -> list[a2ui_pb2.A2aPeer]:
            await cur.execute("SELECT peer FROM a2a_peers ORDER BY ord")
            return [a2ui_pb2.A2aPeer.FromString(bytes(r[0])) for r in await cur.fetchall()]

        return await self._db.run(read)

    async def remove_peer(self, slug: str) -> bool:
        async def write(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM a2a_peers WHERE slug = %s", (slug,))
            return cur.rowcount == 1

        return await self._db.run(write)
