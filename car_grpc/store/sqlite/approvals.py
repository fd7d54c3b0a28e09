"""ApprovalStore on the embedded database (schema: migration 2 of database.py).

A row is one car.v1.HostApproval, serialized whole in `approval`; `status` and the times
are copied out of it so that the ledger can be queried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from car_grpc.store.repositories import StoreConflict
from car_grpc.store.rows import approval_status_name
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.v1 import host_pb2

HostApproval = host_pb2.HostApproval

PENDING = "pending"


def _get(conn: sqlite3.Connection, approval_id: str) -> HostApproval | None:
    row = conn.execute("SELECT approval FROM approvals WHERE id = ?", (approval_id,)).fetchone()
    return None if row is None else HostApproval.FromString(row[0])


def _row(resolved: HostApproval) -> tuple[str, int, bytes, str, str]:
    """The values `_finish` writes (built by the caller, before the write is queued)."""
    return (
        approval_status_name(resolved.status),
        resolved.resolved_at,
        resolved.SerializeToString(),
        resolved.id,
        PENDING,
    )


def _finish(conn: sqlite3.Connection, row: tuple[str, int, bytes, str, str]) -> bool:
    """Write a resolved approval (`_row`) over its row if that is still pending; whether
    it was."""
    changed = conn.execute(
        "UPDATE approvals SET status = ?, resolved_at = ?, approval = ?"
        " WHERE id = ? AND status = ?",
        row,
    ).rowcount
    return changed == 1


def _size(row: tuple[str, int, bytes, str, str]) -> int:
    return len(row[2]) + _ROW_OVERHEAD


#: What a row costs beside its serialized approval, in bytes (for the store's queue bound).
_ROW_OVERHEAD = 64


class SqliteApprovalStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def insert(self, approval: HostApproval) -> None:
        values = (
            approval.id,
            approval_status_name(approval.status),
            approval.created_at,
            approval.SerializeToString(),
        )

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO approvals (id, status, created_at, resolved_at, approval)"
                    " VALUES (?, ?, ?, NULL, ?)",
                    values,
                )
            except sqlite3.IntegrityError as e:
                raise StoreConflict(f"approval {approval.id!r} exists") from e

        await self._db.write(insert, len(values[3]) + _ROW_OVERHEAD, ("approval", approval.id))

    async def get(self, approval_id: str) -> HostApproval | None:
        return await self._db.read(lambda conn: _get(conn, approval_id), ("approval", approval_id))

    async def finish(self, resolved: HostApproval) -> tuple[HostApproval | None, bool]:
        row, approval_id = _row(resolved), resolved.id

        def update(conn: sqlite3.Connection) -> tuple[HostApproval | None, bool]:
            won = _finish(conn, row)
            return _get(conn, approval_id), won

        return await self._db.write(update, _size(row), ("approval", approval_id))

    async def finish_all(self, resolved: Sequence[HostApproval]) -> int:
        rows = [_row(r) for r in resolved]
        return await self._db.write(
            lambda conn: sum(_finish(conn, row) for row in rows), sum(map(_size, rows))
        )

    async def pending(self) -> list[HostApproval]:
        def select(conn: sqlite3.Connection) -> list[HostApproval]:
            rows = conn.execute(
                "SELECT approval FROM approvals WHERE status = ? ORDER BY created_at, rowid",
                (PENDING,),
            )
            return [HostApproval.FromString(r[0]) for r in rows]

        return await self._db.read(select)

    async def history(self, limit: int) -> list[HostApproval]:
        def select(conn: sqlite3.Connection) -> list[HostApproval]:
            rows = conn.execute(
                "SELECT approval FROM approvals WHERE status != ?"
                " ORDER BY resolved_at DESC, rowid DESC LIMIT ?",
                (PENDING, limit),
            )
            return [HostApproval.FromString(r[0]) for r in rows]

        return await self._db.read(select)
