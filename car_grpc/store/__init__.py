"""Durable state: the repository Protocols (repositories.py) and where a store is opened.

The core imports the Protocols; only `open_store` (called where the core starts, and by
the CLI) chooses an implementation, from the store URL (location.py): the embedded SQLite
database (sqlite/) or PostgreSQL (postgres/).
"""

from __future__ import annotations

from pathlib import Path

from car_grpc.store.location import (
    StoreLocation,
    StoreUrlError,
    embedded_path,
    redact,
    store_location,
)
from car_grpc.store.repositories import (
    A2aClientRow,
    A2aClientStore,
    A2aTaskRow,
    A2aTaskStore,
    AgentTokenRow,
    AgentTokenStore,
    ApprovalStore,
    ClusterStore,
    GoalStore,
    MeetingStore,
    RunAgentRow,
    RunRow,
    RunStore,
    Store,
    StoreConflict,
    StoreRefused,
    StoreUnavailable,
)


def database_path(state_root: Path) -> Path:
    """The embedded store's database file under a state root (`$CAR_HOME`)."""
    return embedded_path(state_root)


async def open_store(
    state_root: Path,
    url: str | None = None,
    *,
    pool_size: int = 10,
    timeout: float = 10.0,
    core_id: str = "",
) -> Store:
    """Open the store that `url` names (store_location: None is the embedded SQLite file
    under `state_root`). A PostgreSQL store keeps at most `pool_size` connections and
    bounds each call by `timeout` seconds; StoreUnavailable when it cannot be reached,
    StoreUrlError for a URL that names no store. `core_id` names the core in a cluster
    (PostgreSQL only)."""
    location = store_location(url, state_root)
    # Only the store that is opened loads (and with it its driver).
    if location.path is not None:
        from car_grpc.store.sqlite import SqliteStore

        return await SqliteStore.open(location.path)
    from car_grpc.store.postgres import PostgresStore

    return await PostgresStore.open(
        location.url, pool_size=pool_size, timeout=timeout, core_id=core_id
    )


__all__ = [
    "A2aClientRow",
    "A2aClientStore",
    "A2aTaskRow",
    "A2aTaskStore",
    "AgentTokenRow",
    "AgentTokenStore",
    "ApprovalStore",
    "ClusterStore",
    "GoalStore",
    "MeetingStore",
    "RunAgentRow",
    "RunRow",
    "RunStore",
    "Store",
    "StoreConflict",
    "StoreLocation",
    "StoreRefused",
    "StoreUnavailable",
    "StoreUrlError",
    "database_path",
    "open_store",
    "redact",
    "store_location",
]
