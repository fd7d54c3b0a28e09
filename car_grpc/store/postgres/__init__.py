"""The PostgreSQL store: every repository on one PostgreSQL database (database.py).

Opened with `--store postgresql://USER:PASSWORD@HOST:PORT/DATABASE` (or `CAR_STORE`); the
schema is created and migrated at open. The driver (psycopg 3) and why it was chosen:
database.py.
"""

from __future__ import annotations

from car_grpc.store.postgres.a2a import PostgresA2aClientStore, PostgresA2aTaskStore
from car_grpc.store.postgres.a2ui import PostgresA2uiStore
from car_grpc.store.postgres.agent_tokens import PostgresAgentTokenStore
from car_grpc.store.postgres.approvals import PostgresApprovalStore
from car_grpc.store.postgres.cluster import PostgresCluster
from car_grpc.store.postgres.database import PostgresDatabase
from car_grpc.store.postgres.goals import PostgresGoalStore
from car_grpc.store.postgres.meetings import PostgresMeetingStore
from car_grpc.store.postgres.runs import PostgresRunStore

#: Connections one store keeps at most, and seconds one call may take, unless told.
DEFAULT_POOL_SIZE = 10
DEFAULT_TIMEOUT = 10.0


class PostgresStore:
    """The repositories of one database; they share its connection pool."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self.agent_tokens = PostgresAgentTokenStore(database)
        self.approvals = PostgresApprovalStore(database)
        self.runs = PostgresRunStore(database)
        self.goals = PostgresGoalStore(database)
        self.meetings = PostgresMeetingStore(database)
        self.a2a_clients = PostgresA2aClientStore(database)
        self.a2a_tasks = PostgresA2aTaskStore(database)
        self.a2ui = PostgresA2uiStore(database)
        self.cluster = PostgresCluster(database)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        core_id: str = "",
    ) -> PostgresStore:
        """Connect to the database at `url` (migrating it as needed) with a pool of at most
        `pool_size` connections, each call bounded by `timeout` seconds; StoreUnavailable
        when it cannot be reached."""
        database = await PostgresDatabase.open(
            url, pool_size=pool_size, timeout=timeout, core_id=core_id
        )
        return cls(database)

    async def size_bytes(self) -> int:
        return await self.database.size_bytes()

    async def close(self) -> None:
        await self.database.close()

    def __str__(self) -> str:
        return self.database.where


__all__ = [
    "PostgresA2aClientStore",
    "PostgresA2aTaskStore",
    "PostgresA2uiStore",
    "PostgresAgentTokenStore",
    "PostgresApprovalStore",
    "PostgresCluster",
    "PostgresDatabase",
    "PostgresGoalStore",
    "PostgresMeetingStore",
    "PostgresRunStore",
    "PostgresStore",
]
