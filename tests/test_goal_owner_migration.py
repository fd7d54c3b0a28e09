"""The migration that gave goals an owner: a goal stored before it belongs to the daemon
token afterwards (only the daemon token sees it), on an embedded database of the older
schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from car_grpc.store.sqlite import SqliteStore
from car_grpc.store.sqlite.database import MIGRATIONS

#: The schema version before goals had an owner (migration 8 added it).
BEFORE_OWNERS = 7


async def test_a_goal_from_before_owners_is_the_daemon_tokens(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:BEFORE_OWNERS]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version={BEFORE_OWNERS}")
    conn.execute(
        "INSERT INTO goals(session_id, check_text, max_iterations, status, updated_at)"
        " VALUES ('old', 'tests pass', 8, 'active', 1)"
    )
    conn.commit()
    conn.close()
    store = await SqliteStore.open(path)
    try:
        assert await store.goals.get("old", "host") is None
        kept = await store.goals.get("old", "daemon")
        assert kept is not None and (kept.check, kept.max_iterations) == ("tests pass", 8)
        assert await store.goals.put("old", "mine", 1, "host", any_owner=False) is None
    finally:
        await store.close()
