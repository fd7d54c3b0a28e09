"""A PostgreSQL database: its connection pool, its transactions and its schema.

The driver is psycopg 3 (with psycopg_pool), chosen over asyncpg because:

- it is typed (inline annotations, py.typed): the store stays under mypy --strict with no
  stubs of our own, where asyncpg ships none;
- it is libpq underneath, so a `postgresql://` URL means exactly what it means to psql and
  every other libpq client (several hosts, sslmode and certificates, service files,
  `PGPASSFILE`, target_session_attrs), with libpq's own connect timeout;
- its pool bounds the connections, waits for one with a timeout, checks and replaces broken
  ones and reconnects in the background; and a cancelled query (a request that timed out)
  is cancelled on the server too, with a bounded wait, before its connection is reused;
- it is maintained alongside PostgreSQL's releases by the psycopg project; the binary wheel
  carries its own libpq, so nothing else needs installing.
asyncpg is faster per query, which matters little next to a network round trip and a
commit; correctness and operability of the URL matter more here.

Every repository call is one transaction through `run(fn)`: `fn(cursor)` runs inside
BEGIN ... COMMIT and `run` returns once COMMIT has returned (PostgreSQL's
`synchronous_commit`, on by default, makes that durable: "acknowledged after commit").
Each call is bounded by the store's timeout, waiting for a connection included; the server
cancels a statement that outlives it too (`statement_timeout`). What fails to reach the
server (it is down, restarting, or does not answer in time) raises StoreUnavailable; a
connection the server closed (it restarted) is retried once on a fresh one when the
transaction had not reached its COMMIT, since nothing of it can have taken effect.

Schema changes are migrations: append a new entry to MIGRATIONS, never edit an old one.
Table `car_grpc_migrations` records those applied, one row per number; they are applied at
open under a transaction-level advisory lock, so cores starting together take turns and
each finds the schema whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from car_grpc.clock import now_ms
from car_grpc.store.location import StoreUrlError, redact
from car_grpc.store.repositories import StoreConflict, StoreRefused, StoreUnavailable

T = TypeVar("T")

#: What a repository's transaction function works with.
Cursor = psycopg.AsyncCursor[TupleRow]
Connection = psycopg.AsyncConnection[TupleRow]

log = logging.getLogger(__name__)

#: Ordered schema migrations, numbered as the SQLite store's: entry i brings the schema
#: from version i to i + 1. Each is plain SQL statements separated by ";".
#:
#: Identifiers that are sorted on (agent ids, session ids) are `COLLATE "C"`: byte order, as
#: SQLite sorts, whatever the database's own collation. `ord` columns number rows in the
#: order they were inserted (SQLite's rowid), for the ties of the listings.
MIGRATIONS: list[str] = [
    # 1: per-agent tokens, stored as SHA-256 digests (tokens are 256-bit random).
    """
    CREATE TABLE agent_tokens (
        agent_id   TEXT COLLATE "C" PRIMARY KEY,
        token_hash BYTEA NOT NULL,
        created_at BIGINT NOT NULL
    );
    """,
    # 2: the approval ledger (approvals.py). A row is a serialized car.v1.HostApproval;
    # status and times are copied out for queries.
    """
    CREATE TABLE approvals (
        id          TEXT COLLATE "C" PRIMARY KEY,
        ord         BIGINT GENERATED ALWAYS AS IDENTITY,
        status      TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        resolved_at BIGINT,
        approval    BYTEA NOT NULL
    );
    CREATE INDEX approvals_by_status ON approvals(status, created_at, ord);
    CREATE INDEX approvals_by_resolution ON approvals(resolved_at, ord);
    """,
    # 3: agent runs and their ordered records (runs.py). A record is a serialized
    # car.v1.RunRecord; seq 0 is `started`.
    """
    CREATE TABLE runs (
        run_id              TEXT COLLATE "C" PRIMARY KEY,
        ord                 BIGINT GENERATED ALWAYS AS IDENTITY,
        agent_id            TEXT COLLATE "C" NOT NULL,
        intent              TEXT NOT NULL,
        outcome_description TEXT,
        started_at          BIGINT NOT NULL,
        ended_at            BIGINT,
        status              TEXT NOT NULL,
        turn_count          INTEGER NOT NULL DEFAULT 0,
        record_count        INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_by_agent ON runs(agent_id, started_at, ord);
    CREATE INDEX runs_by_status ON runs(status);
    CREATE TABLE run_records (
        run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(run_id),
        seq    INTEGER NOT NULL,
        record BYTEA NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    """,
    # 4: standing goals of chat sessions (goals.py).
    """
    CREATE TABLE goals (
        session_id     TEXT COLLATE "C" PRIMARY KEY,
        check_text     TEXT NOT NULL,
        max_iterations INTEGER NOT NULL,
        status         TEXT NOT NULL,
        last_iteration INTEGER,
        last_met       BOOLEAN,
        last_grounded  BOOLEAN,
        last_reason    TEXT,
        terminal_kind  TEXT,
        updated_at     BIGINT NOT NULL
    );
    """,
    # 5: meetings and their transcripts (meetings.py). A meeting row is a serialized
    # car.v1.Meeting, a segment row a serialized car.v1.TranscriptSegment.
    """
    CREATE TABLE meetings (
        meeting_id TEXT COLLATE "C" PRIMARY KEY,
        ord        BIGINT GENERATED ALWAYS AS IDENTITY,
        status     TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        meeting    BYTEA NOT NULL
    );
    CREATE INDEX meetings_by_start ON meetings(started_at, ord);
    CREATE INDEX meetings_by_status ON meetings(status);
    CREATE TABLE meeting_segments (
        meeting_id TEXT COLLATE "C" NOT NULL REFERENCES meetings(meeting_id),
        seq        INTEGER NOT NULL,
        segment    BYTEA NOT NULL,
        PRIMARY KEY (meeting_id, seq)
    );
    """,
    # 6: A2A callers' token digests and A2A tasks (a2a.py). A task row is a serialized
    # lf.a2a.v1.Task; its owner, state and time are copied out.
    """
    CREATE TABLE a2a_clients (
        name       TEXT COLLATE "C" PRIMARY KEY,
        token_hash BYTEA NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE a2a_tasks (
        task_id    TEXT COLLATE "C" PRIMARY KEY,
        agent_id   TEXT COLLATE "C" NOT NULL,
        caller     TEXT COLLATE "C" NOT NULL,
        context_id TEXT COLLATE "C" NOT NULL,
        state      INTEGER NOT NULL,
        updated_at BIGINT NOT NULL,
        task       BYTEA NOT NULL
    );
    CREATE INDEX a2a_tasks_by_owner ON a2a_tasks(caller, agent_id, updated_at);
    CREATE INDEX a2a_tasks_by_state ON a2a_tasks(state);
    """,
    # 7: A2UI surfaces and the remote A2A peers (a2ui.py). A surface row is a serialized
    # car.v1.A2uiSurface with its sealed route credential; a peer row a serialized
    # car.v1.A2aPeer.
    """
    CREATE TABLE a2ui_surfaces (
        surface_id TEXT COLLATE "C" PRIMARY KEY,
        owner_key  TEXT COLLATE "C" NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        surface    BYTEA NOT NULL,
        route      BYTEA
    );
    CREATE INDEX a2ui_surfaces_by_expiry ON a2ui_surfaces(expires_at);
    CREATE INDEX a2ui_surfaces_by_owner ON a2ui_surfaces(owner_key, expires_at);
    CREATE TABLE a2a_peers (
        slug TEXT COLLATE "C" PRIMARY KEY,
        ord  BIGINT GENERATED ALWAYS AS IDENTITY,
        url  TEXT NOT NULL UNIQUE,
        peer BYTEA NOT NULL
    );
    """,
    # 8: a cluster of cores on this database (cluster.py). Each core holds a lease it
    # renews; runs, approvals, meetings and running goals name the core that holds them
    # (the connection's `car.core_id` setting, '' for none), so a surviving core can
    # release a dead one's; an attached agent is found through `cluster_agents`.
    """
    CREATE TABLE cluster_cores (
        core_id     TEXT COLLATE "C" PRIMARY KEY,
        advertise   TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        joined_at   BIGINT NOT NULL,
        lease_until TIMESTAMPTZ NOT NULL,
        stats       TEXT NOT NULL DEFAULT '{}',
        tokens      BYTEA[] NOT NULL DEFAULT '{}'
    );
    CREATE TABLE cluster_agents (
        agent_id    TEXT COLLATE "C" PRIMARY KEY,
        core_id     TEXT COLLATE "C" NOT NULL,
        session_id  TEXT NOT NULL,
        seq         BIGINT NOT NULL
    );
    CREATE INDEX cluster_agents_by_core ON cluster_agents(core_id);
    CREATE SEQUENCE cluster_attach_seq;
    ALTER TABLE runs ADD COLUMN core_id TEXT COLLATE "C" NOT NULL
        DEFAULT COALESCE(current_setting('car.core_id', true), '');
    CREATE INDEX runs_open_by_core ON runs(core_id) WHERE status = 'in_progress';
    ALTER TABLE approvals ADD COLUMN core_id TEXT COLLATE "C" NOT NULL
        DEFAULT COALESCE(current_setting('car.core_id', true), '');
    CREATE INDEX approvals_pending_by_core ON approvals(core_id) WHERE status = 'pending';
    ALTER TABLE meetings ADD COLUMN core_id TEXT COLLATE "C" NOT NULL
        DEFAULT COALESCE(current_setting('car.core_id', true), '');
    ALTER TABLE goals ADD COLUMN core_id TEXT COLLATE "C" NOT NULL DEFAULT '';
    ALTER TABLE a2a_tasks ADD COLUMN core_id TEXT COLLATE "C" NOT NULL
        DEFAULT COALESCE(current_setting('car.core_id', true), '');
    """,  # 9: a goal's owner, the principal that set it ("daemon", "host", "agent:<id>"); goals
    # set before owners were kept are the daemon token's.
    """
    ALTER TABLE goals ADD COLUMN owner TEXT COLLATE "C" NOT NULL DEFAULT 'daemon';
    CREATE INDEX goals_by_owner ON goals(owner, session_id);
    """,
]

#: The tables of the store (for its size).
TABLES = (
    "agent_tokens",
    "approvals",
    "runs",
    "run_records",
    "goals",
    "meetings",
    "meeting_segments",
    "a2a_clients",
    "a2a_tasks",
    "a2ui_surfaces",
    "a2a_peers",
    "cluster_cores",
    "cluster_agents",
    "car_grpc_migrations",
)

#: The advisory lock that serializes migrations between processes: "car-grpc" as 8 bytes.
MIGRATION_LOCK = int.from_bytes(b"car-grpc", "big")

#: How long the pool keeps trying to replace a lost connection before it gives up until the
#: next request asks for one. Short, so that a server back from a restart is found again
#: within about this long (the pool's back-off between attempts grows up to it).
RECONNECT_WINDOW = 2.0

#: How long opening the store waits for its pool's first connections when the per-call
#: timeout is shorter: a connection costs a password exchange (SCRAM) on both sides, which
#: a busy machine can stretch past a short call timeout; each attempt stays bounded by
#: libpq's connect_timeout.
OPEN_WINDOW = 10.0


class PostgresDatabase:
    """One database, through a bounded pool. `run(fn)` calls `fn(cursor)` in a transaction.

    Only the repositories of this package call `run`: no connection leaves it.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        where: str,
        timeout: float,
        conninfo: str = "",
        core_id: str = "",
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        #: For a connection of its own (the cluster's LISTEN connection).
        self.conninfo = conninfo
        self.core_id = core_id
        #: Calls under way, and set whenever there are none (for close).
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: The URL without its password, for messages.
        self.where = where

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int, timeout: float, core_id: str = ""
    ) -> PostgresDatabase:
        """Connect to the database at `url`, migrate it, and open a pool of at most
        `pool_size` connections; StoreUnavailable when it cannot be reached in `timeout`.
        `core_id` names the core in a cluster: every connection carries it (setting
        `car.core_id`), and the runs and approvals it creates are stamped with it."""
        where = redact(url)
        try:
            conninfo = make_conninfo(url, **_connect_defaults(url, timeout))
        except psycopg.ProgrammingError as e:  # a URL libpq cannot parse
            raise StoreUrlError(f"store {where}: {_first_line(e)}") from None
        try:
            async with asyncio.timeout(max(timeout, 60.0)):  # a long migration may run
                conn = await psycopg.AsyncConnection.connect(conninfo)
                try:
                    await migrate(conn)
                finally:
                    await conn.close()
        except TimeoutError:
            raise StoreUnavailable(f"store {where}: no answer in time") from None
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"store {where}: {_first_line(e)}") from None

        async def configure(conn: Connection) -> None:
            # The server gives up on a statement (or a transaction left idle) soon after
            # the client does (the client's deadline comes first and names the timeout),
            # so nothing goes on holding locks after its caller has failed.
            ms = str(round(timeout * 1000) + 1000)
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false),"
                " set_config('car.core_id', %s, false)",
                (ms, ms, core_id),
            )
            await conn.commit()

        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            conninfo,
            min_size=min(2, pool_size),
            max_size=pool_size,
            timeout=timeout,
            reconnect_timeout=RECONNECT_WINDOW,
            configure=configure,
            name="car-grpc-store",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=max(timeout, OPEN_WINDOW))
        except psycopg.OperationalError as e:
            await pool.close()
            raise StoreUnavailable(f"store {where}: {_first_line(e)}") from None
        return cls(pool, where, timeout, conninfo, core_id)

    async def run(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        """Run `fn` in a transaction; returns once committed. StoreUnavailable when the
        server cannot be reached or the whole call takes longer than the store's timeout."""
        deadline = asyncio.timeout(self._timeout)
        lost: list[str] = []  # why a first attempt failed, when it is retried
        self._busy += 1
        self._idle.clear()
        try:
            async with deadline:
                return await self._run(fn, lost)
        except TimeoutError:
            if not deadline.expired():
                raise
            after = f" (connection lost: {lost[0]})" if lost else ""
            raise StoreUnavailable(
                f"store {self.where}: no answer within {self._timeout:g}s{after}"
            ) from None
        except psycopg.OperationalError as e:  # PoolTimeout and the server's going away too
            raise StoreUnavailable(f"store {self.where}: {_first_line(e)}") from None
        except psycopg.InterfaceError as e:  # e.g. the pool is closed
            raise StoreUnavailable(f"store {self.where}: {_first_line(e)}") from None
        except psycopg.DataError as e:  # e.g. a NUL character in a text column
            raise StoreRefused(f"the store cannot keep a value: {_first_line(e)}") from None
        except psycopg.IntegrityError as e:  # the repositories check first; a backstop
            raise StoreConflict(f"store {self.where}: {_first_line(e)}") from None
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _run(self, fn: Callable[[Cursor], Awaitable[T]], lost: list[str]) -> T:
        for attempt in (1, 2):
            committing = broken = False
            try:
                async with self._pool.connection() as conn:
                    try:
                        async with conn.transaction():
                            result = await fn(conn.cursor(binary=True))
                            committing = True  # leaving the block sends COMMIT
                    finally:
                        broken = conn.broken
                return result
            except psycopg.OperationalError as e:
                if attempt == 2 or committing or not broken:
                    raise
                lost.append(_first_line(e))
            # The server closed the connection (it restarted, or an administrator ended
            # the session) before this transaction committed: nothing of it took effect.
            # The pool's other idle connections likely went the same way: drop those that
            # did, and try once more on a fresh one. Shielded: a check cut short by our
            # deadline would leave the connections it took out neither back nor closed.
            await asyncio.shield(self._pool.check())
        raise AssertionError("unreachable")

    async def size_bytes(self) -> int:
        """Bytes the store's tables (with their indexes and TOAST) occupy."""

        async def total(cur: Cursor) -> int:
            await cur.execute(
                "SELECT COALESCE(SUM(pg_total_relation_size(to_regclass(t))), 0)::bigint"
                " FROM unnest(%s::text[]) AS t",
                (list(TABLES),),
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self.run(total)

    async def close(self) -> None:
        """Wait for the calls under way (each bounded by the timeout), then close every
        connection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._idle.wait()
        await self._pool.close(timeout=self._timeout)


async def migrate(conn: Connection) -> None:
    """Apply the migrations the database has not seen yet, in one transaction that holds
    the migration lock: a second process migrating at the same time waits, then finds
    nothing left to do."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS car_grpc_migrations ("
            " version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
        cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM car_grpc_migrations")
        row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"store schema version {version} is newer than this server ({len(MIGRATIONS)})"
            )
        for number in range(version, len(MIGRATIONS)):
            for statement in _statements(MIGRATIONS[number]):
                await conn.execute(statement)  # DDL, ours: no parameters
            await conn.execute(
                "INSERT INTO car_grpc_migrations(version, applied_at) VALUES (%s, %s)",
                (number + 1, now_ms()),
            )
            log.info("store: applied migration %d", number + 1)


def _connect_defaults(url: str, timeout: float) -> dict[str, str | int]:
    """Connection parameters the URL may set and otherwise get ours: libpq's connect
    timeout (whole seconds) within the store's, and a name in pg_stat_activity."""
    given = conninfo_to_dict(url)
    defaults: dict[str, str | int] = {
        "connect_timeout": max(2, round(timeout)),
        "application_name": "car-grpc",
    }
    return {k: v for k, v in defaults.items() if k not in given}


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _first_line(error: BaseException) -> str:
    """A driver's message, first line only (libpq adds DETAIL/HINT lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def rows_affected(cur: Cursor) -> int:
    """How many rows the cursor's last statement changed."""
    return max(cur.rowcount, 0)


__all__ = [
    "MIGRATIONS",
    "Connection",
    "Cursor",
    "PostgresDatabase",
    "migrate",
    "rows_affected",
]
