"""Standing goals in the store (docs/protocol.md §5): the SQL, as functions of a connection.

Each function runs inside one `SqliteStore.run` transaction. A goal is keyed by its chat
session_id; its status follows the chats of that session (see car_grpc.core.chats).
"""

from __future__ import annotations

import sqlite3
import time

from car_grpc.v1 import chats_pb2

GoalStatus = chats_pb2.GoalStatus

_STATUS_NAMES: dict[GoalStatus.ValueType, str] = {
    chats_pb2.GOAL_STATUS_ACTIVE: "active",
    chats_pb2.GOAL_STATUS_RUNNING: "running",
    chats_pb2.GOAL_STATUS_MET: "met",
    chats_pb2.GOAL_STATUS_UNEVALUATED: "unevaluated",
    chats_pb2.GOAL_STATUS_ERROR: "error",
}
_STATUS_NUMBERS = {name: number for number, name in _STATUS_NAMES.items()}

_COLUMNS = (
    "session_id, check_text, max_iterations, status, last_iteration, last_met,"
    " last_grounded, last_reason, terminal_kind, updated_at"
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _goal_from_row(row: tuple[object, ...]) -> chats_pb2.StoredGoal:
    sid, check, max_iter, status, iteration, met, grounded, reason, terminal, updated = row
    goal = chats_pb2.StoredGoal(
        session_id=str(sid),
        check=str(check),
        max_iterations=int(str(max_iter)),
        status=_STATUS_NUMBERS.get(str(status), chats_pb2.GOAL_STATUS_UNSPECIFIED),
        updated_at=int(str(updated)),
    )
    if iteration is not None:
        goal.last_iteration = int(str(iteration))
    if met is not None:
        goal.last_met = bool(met)
    if grounded is not None:
        goal.last_grounded = bool(grounded)
    if reason is not None:
        goal.last_reason = str(reason)
    if terminal is not None:
        goal.terminal_kind = str(terminal)
    return goal


def put(conn: sqlite3.Connection, session_id: str, check: str, max_iterations: int) -> None:
    """Set (or replace) the goal of `session_id`: active, with no evaluation yet."""
    conn.execute(
        f"INSERT OR REPLACE INTO goals({_COLUMNS}) VALUES (?, ?, ?, 'active',"
        " NULL, NULL, NULL, NULL, NULL, ?)",
        (session_id, check, max_iterations, _now_ms()),
    )


def get(conn: sqlite3.Connection, session_id: str) -> chats_pb2.StoredGoal | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM goals WHERE session_id = ?", (session_id,))
    found = row.fetchone()
    return _goal_from_row(found) if found else None


def list_all(conn: sqlite3.Connection) -> list[chats_pb2.StoredGoal]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM goals ORDER BY session_id").fetchall()
    return [_goal_from_row(r) for r in rows]


def clear(conn: sqlite3.Connection, session_id: str) -> bool:
    return conn.execute("DELETE FROM goals WHERE session_id = ?", (session_id,)).rowcount > 0


def clear_all(conn: sqlite3.Connection) -> int:
    return conn.execute("DELETE FROM goals").rowcount


def set_status(
    conn: sqlite3.Connection,
    session_id: str,
    status: GoalStatus.ValueType,
    terminal_kind: str | None = None,
) -> None:
    """Move the goal to `status`; `terminal_kind` is recorded when given."""
    conn.execute(
        "UPDATE goals SET status = ?, terminal_kind = COALESCE(?, terminal_kind),"
        " updated_at = ? WHERE session_id = ?",
        (_STATUS_NAMES[status], terminal_kind, _now_ms(), session_id),
    )


def record_evaluation(
    conn: sqlite3.Connection,
    session_id: str,
    event: chats_pb2.ChatEvent,
    status: GoalStatus.ValueType,
) -> None:
    """Record a `goal_evaluated` event's fields (absent ones become NULL) and the status."""
    conn.execute(
        "UPDATE goals SET status = ?, last_iteration = ?, last_met = ?, last_grounded = ?,"
        " last_reason = ?, updated_at = ? WHERE session_id = ?",
        (
            _STATUS_NAMES[status],
            event.iteration if event.HasField("iteration") else None,
            event.met if event.HasField("met") else None,
            event.grounded if event.HasField("grounded") else None,
            event.reason if event.HasField("reason") else None,
            _now_ms(),
            session_id,
        ),
    )


def reset_running(conn: sqlite3.Connection) -> int:
    """After a restart no chat runs any goal: `running` goals become `active` again."""
    return conn.execute("UPDATE goals SET status = 'active' WHERE status = 'running'").rowcount
