"""SQL of the approval ledger (the logic lives in car_grpc.core.approvals).

A row is one car.v1.HostApproval, serialized whole in `approval`; `status` and the times
are copied out of it so that the ledger can be queried. Every function runs inside a
transaction of the store thread (`await store.run(fn)`).
"""

from __future__ import annotations

import sqlite3

from car_grpc.v1 import host_pb2

HostApproval = host_pb2.HostApproval

PENDING = "pending"


def _status(approval: HostApproval) -> str:
    return host_pb2.ApprovalStatus.Name(approval.status).removeprefix("APPROVAL_STATUS_").lower()


def insert(conn: sqlite3.Connection, approval: HostApproval) -> None:
    conn.execute(
        "INSERT INTO approvals (id, status, created_at, resolved_at, approval)"
        " VALUES (?, ?, ?, NULL, ?)",
        (approval.id, _status(approval), approval.created_at, approval.SerializeToString()),
    )


def get(conn: sqlite3.Connection, approval_id: str) -> HostApproval | None:
    row = conn.execute("SELECT approval FROM approvals WHERE id = ?", (approval_id,)).fetchone()
    return None if row is None else HostApproval.FromString(row[0])


def finish(conn: sqlite3.Connection, resolved: HostApproval) -> tuple[HostApproval | None, bool]:
    """Write `resolved` over its row if the row is still pending.

    Returns the row as it now stands (None for an unknown id) and whether this call was
    the one that resolved it: of two racing resolutions, exactly one wins.
    """
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
    return get(conn, resolved.id), changed == 1


def pending(conn: sqlite3.Connection) -> list[HostApproval]:
    rows = conn.execute(
        "SELECT approval FROM approvals WHERE status = ? ORDER BY created_at, rowid", (PENDING,)
    )
    return [HostApproval.FromString(r[0]) for r in rows]


def history(conn: sqlite3.Connection, limit: int) -> list[HostApproval]:
    """Resolved approvals, most recently resolved first."""
    rows = conn.execute(
        "SELECT approval FROM approvals WHERE status != ?"
        " ORDER BY resolved_at DESC, rowid DESC LIMIT ?",
        (PENDING, limit),
    )
    return [HostApproval.FromString(r[0]) for r in rows]
