"""The embedded store: every repository on one SQLite database file (database.py)."""

from __future__ import annotations

from pathlib import Path

from car_grpc.store.repositories import ClusterStore
from car_grpc.store.sqlite.a2a import SqliteA2aClientStore, SqliteA2aTaskStore
from car_grpc.store.sqlite.a2ui import SqliteA2uiStore
from car_grpc.store.sqlite.agent_tokens import SqliteAgentTokenStore
from car_grpc.store.sqlite.approvals import SqliteApprovalStore
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.store.sqlite.goals import SqliteGoalStore
from car_grpc.store.sqlite.meetings import SqliteMeetingStore
from car_grpc.store.sqlite.runs import SqliteRunStore


class SqliteStore:
    """The repositories of one database; they share its store threads (one writes, one
    reads)."""

    def __init__(self, database: SqliteDatabase) -> None:
        self.database = database
        self.agent_tokens = SqliteAgentTokenStore(database)
        self.approvals = SqliteApprovalStore(database)
        self.runs = SqliteRunStore(database)
        self.goals = SqliteGoalStore(database)
        self.meetings = SqliteMeetingStore(database)
        self.a2a_clients = SqliteA2aClientStore(database)
        self.a2a_tasks = SqliteA2aTaskStore(database)
        self.a2ui = SqliteA2uiStore(database)
        #: One core per SQLite file: no cluster.
        self.cluster: ClusterStore | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (creating and migrating it as needed) the database at `path`."""
        return cls(await SqliteDatabase.open(path))

    async def size_bytes(self) -> int:
        # A stat of two files: cheap enough for the event loop, and it must not queue
        # behind the writes on the store thread.
        return self.database.size_bytes()

    async def close(self) -> None:
        await self.database.close()


__all__ = [
    "SqliteA2aClientStore",
    "SqliteA2aTaskStore",
    "SqliteA2uiStore",
    "SqliteAgentTokenStore",
    "SqliteApprovalStore",
    "SqliteDatabase",
    "SqliteGoalStore",
    "SqliteMeetingStore",
    "SqliteRunStore",
    "SqliteStore",
]
