"""ClusterStore on PostgreSQL (schema: migration 8 of database.py).

`cluster_cores` has one row per core with its lease (`lease_until`, in the server's clock,
so the cores' clocks need not agree). Runs and approvals carry the `core_id` of the
connection that created them (the `car.core_id` setting every pooled connection gets).
Releasing a core is one transaction: its row goes, its open runs get their `ended`
record, its pending approvals expire, its live meetings are interrupted, the goals its
chats were running go back to `active` and its attachments are dropped; a second core
trying the same finds the row gone (the DELETE waits for the first's row lock) and does
nothing, so exactly one core takes over from a dead one.

Messages between cores are PostgreSQL notifications on one channel: sent after the
writes they announce have committed, delivered to every listening core in the order they
were sent, lost while a core's listening connection is down (the core then catches up
from the tables).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import psycopg

from car_grpc.clock import now_ms
from car_grpc.store.postgres.approvals import PENDING
from car_grpc.store.postgres.approvals import _finish as finish_approval
from car_grpc.store.postgres.database import Cursor, PostgresDatabase
from car_grpc.store.postgres.meetings import _interrupt_live as interrupt_meetings
from car_grpc.store.postgres.runs import _END, _advance, _insert_records
from car_grpc.store.repositories import CoreRow, Released
from car_grpc.store.rows import IN_PROGRESS, run_status_name
from car_grpc.v1 import host_pb2, runs_pb2

log = logging.getLogger(__name__)

#: The notification channel of the cluster.
CHANNEL = "car_cluster"
#: Seconds between attempts to re-open the listening connection (it grows to the second).
_RELISTEN = (0.2, 2.0)

Expire = Callable[[host_pb2.HostApproval], host_pb2.HostApproval]


async def _release(
    cur: Cursor, core_id: str, ended: runs_pb2.RunRecord, expire: Expire, *, unowned: bool = False
) -> Released:
    """End what `core_id` held, in the caller's transaction (`unowned`: and what no core
    holds, written before the cluster's migration or by a command such as `agents`)."""
    owners = [core_id, ""] if unowned else [core_id]
    await cur.execute(
        "SELECT run_id, record_count FROM runs WHERE status = %s AND core_id = ANY(%s)"
        " ORDER BY ord FOR UPDATE",
        (IN_PROGRESS, owners),
    )
    runs = [(str(run_id), int(seq)) for run_id, seq in await cur.fetchall()]
    status = run_status_name(ended.ended.status)
    for run_id, seq in runs:
        await _advance(cur, run_id, seq, _END, status, ended.timestamp)
        await _insert_records(cur, run_id, seq, [ended.SerializeToString()])
    await cur.execute(
        "SELECT approval FROM approvals WHERE status = %s AND core_id = ANY(%s)"
        " ORDER BY created_at, ord FOR UPDATE",
        (PENDING, owners),
    )
    approvals = []
    for (blob,) in await cur.fetchall():
        expired = expire(host_pb2.HostApproval.FromString(blob))
        if await finish_approval(cur, expired):
            approvals.append(expired)
    await cur.execute(
        "DELETE FROM cluster_agents WHERE core_id = %s RETURNING agent_id", (core_id,)
    )
    agents = [str(a) for (a,) in await cur.fetchall()]
    await interrupt_meetings(cur, now_ms(), "its core is gone", core_id)
    await cur.execute(
        "UPDATE goals SET status = 'active' WHERE status = 'running' AND core_id = %s",
        (core_id,),
    )
    return Released(core_id, [r for r, _ in runs], approvals, agents)


class PostgresCluster:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    @property
    def core_id(self) -> str:
        return self._db.core_id

    async def join(
        self,
        advertise: str,
        incarnation: str,
        lease: float,
        ended: runs_pb2.RunRecord,
        expire: Expire,
        tokens: Sequence[bytes] = (),
    ) -> tuple[float, Released | None]:
        core_id = self.core_id

        async def join(cur: Cursor) -> tuple[float, Released | None]:
            await cur.execute(
                "SELECT incarnation, EXTRACT(EPOCH FROM lease_until - now())::float8"
                " FROM cluster_cores WHERE core_id = %s FOR UPDATE",
                (core_id,),
            )
            found = await cur.fetchone()
            if found is not None and found[0] != incarnation and float(found[1]) > 0:
                return float(found[1]), None
            released = await _release(cur, core_id, ended, expire, unowned=True)
            await cur.execute(
                "INSERT INTO cluster_cores (core_id, advertise, incarnation, joined_at,"
                " lease_until, tokens)"
                " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s), %s)"
                " ON CONFLICT (core_id) DO UPDATE SET advertise = EXCLUDED.advertise,"
                " incarnation = EXCLUDED.incarnation, joined_at = EXCLUDED.joined_at,"
                " lease_until = EXCLUDED.lease_until, stats = '{}', tokens = EXCLUDED.tokens",
                (core_id, advertise, incarnation, now_ms(), lease, list(tokens)),
            )
            return 0.0, released

        return await self._db.run(join)

    async def renew(self, incarnation: str, lease: float, stats: str) -> bool:
        async def renew(cur: Cursor) -> bool:
            await cur.execute(
                "UPDATE cluster_cores SET lease_until = now() + make_interval(secs => %s),"
                " stats = %s WHERE core_id = %s AND incarnation = %s",
                (lease, stats, self.core_id, incarnation),
            )
            return cur.rowcount == 1

        return await self._db.run(renew)

    async def leave(self, incarnation: str, ended: runs_pb2.RunRecord, expire: Expire) -> None:
        async def leave(cur: Cursor) -> None:
            await cur.execute(
                "DELETE FROM cluster_cores WHERE core_id = %s AND incarnation = %s",
                (self.core_id, incarnation),
            )
            if cur.rowcount == 1:  # still ours (a later life under this id keeps its own)
                await _release(cur, self.core_id, ended, expire)

        await self._db.run(leave)

    async def release_expired(self, ended: runs_pb2.RunRecord, expire: Expire) -> list[Released]:
        async def reap(cur: Cursor) -> list[Released]:
            await cur.execute(
                "DELETE FROM cluster_cores WHERE lease_until < now() RETURNING core_id"
            )
            dead = [str(c) for (c,) in await cur.fetchall()]
            return [await _release(cur, core_id, ended, expire) for core_id in dead]

        return await self._db.run(reap)

    async def members(self) -> list[CoreRow]:
        async def select(cur: Cursor) -> list[CoreRow]:
            await cur.execute(
                "SELECT core_id, advertise, joined_at, lease_until > now(), stats, tokens"
                " FROM cluster_cores ORDER BY core_id"
            )
            return [
                CoreRow(str(c), str(a), int(j), bool(alive), str(s), tuple(bytes(d) for d in t))
                for c, a, j, alive, s, t in await cur.fetchall()
            ]

        return await self._db.run(select)

    async def attach(self, agent_id: str, session_id: str) -> int:
        async def attach(cur: Cursor) -> int:
            await cur.execute(
                "INSERT INTO cluster_agents (agent_id, core_id, session_id, seq)"
                " VALUES (%s, %s, %s, nextval('cluster_attach_seq'))"
                " ON CONFLICT (agent_id) DO UPDATE SET core_id = EXCLUDED.core_id,"
                " session_id = EXCLUDED.session_id, seq = EXCLUDED.seq RETURNING seq",
                (agent_id, self.core_id, session_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        return await self._db.run(attach)

    async def detach(self, agent_id: str, session_id: str) -> None:
        async def detach(cur: Cursor) -> None:
            await cur.execute(
                "DELETE FROM cluster_agents WHERE agent_id = %s AND core_id = %s"
                " AND session_id = %s",
                (agent_id, self.core_id, session_id),
            )

        await self._db.run(detach)

    async def locate_agent(self, agent_id: str) -> tuple[str, str] | None:
        async def select(cur: Cursor) -> tuple[str, str] | None:
            await cur.execute(
                "SELECT a.core_id, c.advertise FROM cluster_agents a"
                " JOIN cluster_cores c ON c.core_id = a.core_id"
                " WHERE a.agent_id = %s AND c.lease_until > now()",
                (agent_id,),
            )
            row = await cur.fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

        return await self._db.run(select)

    async def notify(self, messages: Sequence[str]) -> None:
        async def send(cur: Cursor) -> None:
            # One statement per message, in order, in one transaction: delivered at COMMIT,
            # in this order.
            await cur.executemany("SELECT pg_notify(%s, %s)", [(CHANNEL, m) for m in messages])

        await self._db.run(send)

    async def listen(
        self, on_message: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        delay = _RELISTEN[0]
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._db.conninfo, autocommit=True)
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = _RELISTEN[0]
                    on_connected()
                    async for notice in conn.notifies():
                        on_message(notice.payload)
                finally:
                    await conn.close()
            except psycopg.Error as e:
                log.warning("cluster: listening connection lost (%s); reconnecting", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RELISTEN[1])
