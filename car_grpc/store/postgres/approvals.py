"""ApprovalStore on PostgreSQL (schema: migration 2 of database.py).

A row is one car.v1.HostApproval, serialized whole in `approval`; `status` and the times
are copied out of it so that the ledger can be queried. Of two transactions resolving the
same row, the second waits for the first's row lock, then finds the row no longer
pending (READ COMMITTED re-checks the condition on the row it waited for).
"""

from __future__ import annotations

from collections.abc import Sequence

from car_grpc.store.postgres.database import Cursor, PostgresDatabase, rows_affected
from car_grpc.store.repositories import StoreConflict
from car_grpc.store.rows import approval_status_name
from car_grpc.v1 import host_pb2

HostApproval = host_pb2.HostApproval

PENDING = "pending"


async def _get(cur: Cursor, approval_id: str) -> HostApproval | None:
    await cur.execute("SELECT approval FROM approvals WHERE id = %s", (approval_id,))
    row = await cur.fetchone()
    return None if row is None else HostApproval.FromString(row[0])


async def _finish(cur: Cursor, resolved: HostApproval) -> bool:
    """Write `resolved` over its row if that is still pending; whether it was."""
    await cur.execute(
        "UPDATE approvals SET status = %s, resolved_at = %s, approval = %s"
        " WHERE id = %s AND status = %s",
        (
            approval_status_name(resolved.status),
            resolved.resolved_at,
            resolved.SerializeToString(),
            resolved.id,
            PENDING,
        ),
    )
    return rows_affected(cur) == 1


class PostgresApprovalStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def insert(self, approval: HostApproval) -> None:
        async def insert(cur: Cursor) -> None:
            await cur.execute(
                "INSERT INTO approvals (id, status, created_at, resolved_at, approval)"
                " VALUES (%s, %s, %s, NULL, %s) ON CONFLICT (id) DO NOTHING",
                (
                    approval.id,
                    approval_status_name(approval.status),
                    approval.created_at,
                    approval.SerializeToString(),
                ),
            )
            if rows_affected(cur) != 1:
                raise StoreConflict(f"approval {approval.id!r} exists")

        await self._db.run(insert)

    async def get(self, approval_id: str) -> HostApproval | None:
        return await self._db.run(lambda cur: _get(cur, approval_id))

    async def finish(self, resolved: HostApproval) -> tuple[HostApproval | None, bool]:
        async def update(cur: Cursor) -> tuple[HostApproval | None, bool]:
            won = await _finish(cur, resolved)
            return await _get(cur, resolved.id), won

        return await self._db.run(update)

    async def finish_all(self, resolved: Sequence[HostApproval]) -> int:
        async def update(cur: Cursor) -> int:
            return sum([await _finish(cur, r) for r in resolved])

        return await self._db.run(update)

    async def pending(self) -> list[HostApproval]:
        async def select(cur: Cursor) -> list[HostApproval]:
            await cur.execute(
                "SELECT approval FROM approvals WHERE status = %s ORDER BY created_at, ord",
                (PENDING,),
            )
            return [HostApproval.FromString(r[0]) for r in await cur.fetchall()]

        return await self._db.run(select)

    async def history(self, limit: int) -> list[HostApproval]:
        async def select(cur: Cursor) -> list[HostApproval]:
            await cur.execute(
                "SELECT approval FROM approvals WHERE status != %s"
                " ORDER BY resolved_at DESC NULLS LAST, ord DESC LIMIT %s",
                (PENDING, limit),
            )
            return [HostApproval.FromString(r[0]) for r in await cur.fetchall()]

        return await self._db.run(select)
