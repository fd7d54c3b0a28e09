"""ApprovalStore on the embedded database (schema: migration 2 of database.py).

A row is one car.v1.HostApproval, serialized whole in `approval`; `status` and the times
are copied out of it so that the ledger can be queried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from car_grpc.store.repositories import StoreConflict
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.v1 import host_pb2

HostApproval = host_pb2.HostApproval

PENDING = "pending"


def _status(approval: HostApproval) -> str:
    return host_pb2.ApprovalStatus.Name(approval.status).removeprefix("APPROVAL_STATUS_").lower()


def _get(conn: sqlite3.Connection, approval_id: str) -> HostApproval | None:
    row = conn.execute("SELECT approval FROM approvals WHERE id = ?", (approval_id,)).fetchone()
    return None if row is None else HostApproval.FromString(row[0])


def _finish(conn: sqlite3.Connection, resolved: HostApproval) -> bool:
    """Write `resolved` over its row if that is still pending; whether it was."""
    changed = conn.execute(
        "UPDATE approvals SET status = ?, resolved_at = ?, approval = ?"
        " WHERE id = ? AND status = ?",
        (
            _status(resolved),
            resolved.resolved_at,
            resolved.SerializeToString(),
            resolved.id,
            PENDING,
        ),
    ).rowcount
    return changed == 1


class SqliteApprovalStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def insert(self, approval: HostApproval) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO approvals (id, status, created_at, resolved_at, approval)"
                    " VALUES (?, ?, ?, NULL, ?)",
                    (
                        approval.id,
                        _status(approval),
                        approval.created_at,
                        approval.SerializeToString(),
                    ),
                )
            except sqlite3.IntegrityError as e:
                raise StoreConflict(f"approval {approval.id!r} exists") from e

        await self._db.run(insert)

    async def get(self, approval_id: str) -> HostApproval | None:
        return await self._db.run(lambda conn: _get(conn, approval_id))

    async def finish(self, resolved: HostApproval) -> tuple[HostApproval | None, bool]:
        def update(conn: sqlite3.Connection) -> tuple[HostApproval | None, bool]:
            won = _finish(conn, resolved)
            return _get(conn, resolved.id), won

        return await self._db.run(update)

    async def finish_all(self, resolved: Sequence[HostApproval]) -> int:
        return await self._db.run(lambda conn: sum(_finish(conn, r) for r in resolved))

    async def pending(self) -> list[HostApproval]:
        def select(conn: sqlite3.Connection) -> list[HostApproval]:
            rows = conn.execute(
                "SELECT approval FROM approvals WHERE status = ? ORDER BY created_at, rowid",
                (PENDING,),
            )
            return [HostApproval.FromString(r[0]) for r in rows]

        return await self._db.run(select)

    async def history(self, limit: int) -> list[HostApproval]:
        def select(conn: sqlite3.Connection) -> list[HostApproval]:
            rows = conn.execute(
                "SELECT approval FROM approvals WHERE status != ?"
                " ORDER BY resolved_at DESC, rowid DESC LIMIT ?",
                (PENDING, limit),
            )
            return [HostApproval.FromString(r[0]) for r in rows]

        return await self._db.run(select)
