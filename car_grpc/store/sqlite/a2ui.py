"""A2uiStore on the embedded database (schema: migration 7 of database.py).

A surface row is one car.v1.A2uiSurface, serialized whole in `surface` (owner key,
creation and expiry copied out for queries), with its sealed route credential in `route`;
a peer row is one serialized car.v1.A2aPeer. Each method is atomic (a transaction, or a
savepoint in a group commit).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from car_grpc.store.repositories import SurfaceRow
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.v1 import a2ui_pb2

#: What a row costs beside its blobs, in bytes (for the store's queue bound).
_ROW_OVERHEAD = 64

_COLUMNS = "surface, owner_key, route"


def _row(values: tuple[bytes, str, bytes | None]) -> SurfaceRow:
    return SurfaceRow(a2ui_pb2.A2uiSurface.FromString(values[0]), values[1], values[2])


_Values = tuple[str, str, int, int, bytes, bytes | None]


def _values(row: SurfaceRow) -> _Values:
    s = row.surface
    return (
        s.surface_id,
        row.owner_key,
        s.created_at,
        s.expires_at,
        s.SerializeToString(),
        row.route,
    )


def _put(conn: sqlite3.Connection, values: _Values) -> None:
    conn.execute(
        "INSERT INTO a2ui_surfaces (surface_id, owner_key, created_at, expires_at, surface, route)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (surface_id) DO UPDATE SET"
        " owner_key = excluded.owner_key, created_at = excluded.created_at,"
        " expires_at = excluded.expires_at, surface = excluded.surface, route = excluded.route",
        values,
    )


def _reap(conn: sqlite3.Connection, now: int) -> list[str]:
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT surface_id FROM a2ui_surfaces WHERE expires_at <= ? ORDER BY created_at", (now,)
        )
    ]
    conn.execute("DELETE FROM a2ui_surfaces WHERE expires_at <= ?", (now,))
    return ids


def _add_peer(conn: sqlite3.Connection, slug: str, url: str, blob: bytes) -> bool:
    cur = conn.execute(
        "INSERT INTO a2a_peers (slug, url, peer) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (slug, url, blob),
    )
    return cur.rowcount == 1


class SqliteA2uiStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def put_surface(self, row: SurfaceRow) -> None:
        values = _values(row)
        size = len(values[4]) + len(row.route or b"") + _ROW_OVERHEAD
        await self._db.write(lambda conn: _put(conn, values), size)

    async def get_surface(self, surface_id: str, now: int) -> SurfaceRow | None:
        def read(conn: sqlite3.Connection) -> SurfaceRow | None:
            found = conn.execute(
                f"SELECT {_COLUMNS} FROM a2ui_surfaces WHERE surface_id = ? AND expires_at > ?",
                (surface_id, now),
            ).fetchone()
            return None if found is None else _row(found)

        return await self._db.read(read)

    async def live_surfaces(self, now: int) -> list[SurfaceRow]:
        def read(conn: sqlite3.Connection) -> list[SurfaceRow]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM a2ui_surfaces WHERE expires_at > ?"
                " ORDER BY created_at, surface_id",
                (now,),
            )
            return [_row(r) for r in rows]

        return await self._db.read(read)

    async def count_surfaces(self, now: int, owner_key: str) -> tuple[int, int]:
        def read(conn: sqlite3.Connection) -> tuple[int, int]:
            (owned,) = conn.execute(
                "SELECT COUNT(*) FROM a2ui_surfaces WHERE owner_key = ? AND expires_at > ?",
                (owner_key, now),
            ).fetchone()
            (total,) = conn.execute(
                "SELECT COUNT(*) FROM a2ui_surfaces WHERE expires_at > ?", (now,)
            ).fetchone()
            return int(owned), int(total)

        return await self._db.read(read)

    async def delete_surface(self, surface_id: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM a2ui_surfaces WHERE surface_id = ?", (surface_id,))
            return cur.rowcount == 1

        return await self._db.write(write)

    async def write_surfaces(self, put: Sequence[SurfaceRow], delete: Sequence[str]) -> None:
        rows = [_values(row) for row in put]
        gone = list(delete)

        def write(conn: sqlite3.Connection) -> None:
            for values in rows:
                _put(conn, values)
            for surface_id in gone:
                conn.execute("DELETE FROM a2ui_surfaces WHERE surface_id = ?", (surface_id,))

        size = sum(len(v[4]) + len(v[5] or b"") for v in rows) + _ROW_OVERHEAD * (len(rows) + 1)
        await self._db.write(write, size)

    async def reap(self, now: int) -> list[str]:
        return await self._db.write(lambda conn: _reap(conn, now))

    async def add_peer(self, peer: a2ui_pb2.A2aPeer) -> bool:
        blob = peer.SerializeToString()
        return await self._db.write(
            lambda conn: _add_peer(conn, peer.slug, peer.url, blob), len(blob) + _ROW_OVERHEAD
        )

    async def peers(self) -> list[a2ui_pb2.A2aPeer]:
        def read(conn: sqlite3.Connection) -> list[a2ui_pb2.A2aPeer]:
            rows = conn.execute("SELECT peer FROM a2a_peers ORDER BY rowid")
            return [a2ui_pb2.A2aPeer.FromString(r[0]) for r in rows]

        return await self._db.read(read)

    async def remove_peer(self, slug: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM a2a_peers WHERE slug = ?", (slug,)).rowcount == 1

        return await self._db.write(write)
