"""Durable state: the repository Protocols (repositories.py) and where a store is opened.

The core imports the Protocols; only `open_store` (called where the core starts, and by
the CLI) chooses an implementation.
"""

from __future__ import annotations

from pathlib import Path

from car_grpc.store.repositories import (
    AgentTokenRow,
    AgentTokenStore,
    ApprovalStore,
    GoalStore,
    MeetingStore,
    RunAgentRow,
    RunRow,
    RunStore,
    Store,
    StoreConflict,
)


def database_path(state_root: Path) -> Path:
    """The embedded store's database file under a state root (`$CAR_HOME`)."""
    return state_root / "car-grpc" / "store.sqlite3"


async def open_store(state_root: Path) -> Store:
    """Open the store of a state root: today the embedded SQLite database in it."""
    from car_grpc.store.sqlite import SqliteStore  # only the store that is opened loads

    return await SqliteStore.open(database_path(state_root))


__all__ = [
    "AgentTokenRow",
    "AgentTokenStore",
    "ApprovalStore",
    "GoalStore",
    "MeetingStore",
    "RunAgentRow",
    "RunRow",
    "RunStore",
    "Store",
    "StoreConflict",
    "database_path",
    "open_store",
]
