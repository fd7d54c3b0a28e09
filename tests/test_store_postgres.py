"""What only the PostgreSQL store has (the shared contract is tests/test_store_repositories.py):
migrations applied once under their lock when cores start together, a bounded pool, a
timeout on every call, and failures that name the store without its password."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest

from car_grpc.store import StoreUnavailable, StoreUrlError, open_store
from car_grpc.store.postgres import PostgresStore
from car_grpc.store.postgres.database import MIGRATIONS, Cursor
from car_grpc.v1 import host_pb2
from tests.postgres_server import PostgresServer


@pytest.fixture
def url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database("pg")


def versions(server: PostgresServer, url: str) -> list[int]:
    rows = server.execute(url, "SELECT version FROM car_grpc_migrations ORDER BY version")
    return [int(v) for (v,) in rows]


async def test_cores_starting_together_migrate_once(
    postgres_server: PostgresServer, url: str
) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(url, pool_size=1) for _ in range(4)))
    try:
        await stores[0].agent_tokens.put("a", b"d" * 32, 1)
        assert [await s.agent_tokens.digest("a") for s in stores] == [b"d" * 32] * 4
    finally:
        for store in stores:
            await store.close()
    assert versions(postgres_server, url) == list(range(1, len(MIGRATIONS) + 1))
    again = await open_store(postgres_server.root, url)  # through the URL, as the core does
    await again.close()
    assert versions(postgres_server, url) == list(range(1, len(MIGRATIONS) + 1))


async def test_a_newer_schema_is_refused(postgres_server: PostgresServer, url: str) -> None:
    await (await PostgresStore.open(url)).close()  # migrated
    postgres_server.execute(url, "INSERT INTO car_grpc_migrations VALUES (99, 0)")
    with pytest.raises(RuntimeError, match="newer than this server"):
        await PostgresStore.open(url)


async def test_the_pool_is_bounded(postgres_server: PostgresServer, url: str) -> None:
    store = await PostgresStore.open(url, pool_size=2)
    database = url.rsplit("/", 1)[1]
    seen: list[int] = []

    async def busy(cur: Cursor) -> None:
        await cur.execute("SELECT pg_sleep(0.05)")

    async def sample() -> None:
        while True:
            rows = postgres_server.execute(
                postgres_server.url(),
                "SELECT count(*) FROM pg_stat_activity"
                f" WHERE datname = '{database}' AND application_name = 'car-grpc'",
            )
            seen.append(int(rows[0][0]))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        began = time.monotonic()
        await asyncio.gather(*(store.database.run(busy) for _ in range(10)))
        took = time.monotonic() - began
    finally:
        sampler.cancel()
        await store.close()
    assert took >= 5 * 0.05  # ten sleeps, two at a time
    assert max(seen) == 2  # the store's connections, named in pg_stat_activity


async def test_a_call_that_waits_too_long_fails_in_time(url: str) -> None:
    store = await PostgresStore.open(url, timeout=0.5)
    try:
        pending = host_pb2.HostApproval(id="a", status=host_pb2.APPROVAL_STATUS_PENDING)
        await store.approvals.insert(pending)
        resolved = host_pb2.HostApproval(id="a", status=host_pb2.APPROVAL_STATUS_APPROVED)
        async with await psycopg.AsyncConnection.connect(url) as holder:
            # Another transaction holds the row: the update waits for its lock.
            await holder.execute("SELECT * FROM approvals WHERE id = 'a' FOR UPDATE")
            began = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no answer within 0.5s"):
                await store.approvals.finish(resolved)
            assert time.monotonic() - began < 2.0
            await holder.rollback()
        # The store goes on: the cancelled statement left no connection stuck.
        assert (await store.approvals.finish(resolved))[1] is True
        assert len(await store.approvals.history(10)) == 1
    finally:
        await store.close()


async def test_an_unreachable_store_fails_to_open_naming_it_without_its_password(
    postgres_server: PostgresServer,
) -> None:
    secret = postgres_server.password
    began = time.monotonic()
    with pytest.raises(StoreUnavailable) as refused:
        await PostgresStore.open(f"postgresql://car:{secret}@127.0.0.1:1/nowhere", timeout=2)
    assert time.monotonic() - began < 5
    assert str(refused.value).startswith("store postgresql://car:***@127.0.0.1:1/nowhere: ")
    wrong = postgres_server.url().replace(secret, "not-the-password")
    with pytest.raises(StoreUnavailable, match="password authentication failed") as denied:
        await PostgresStore.open(wrong, timeout=2)
    for error in (refused.value, denied.value):
        assert secret not in str(error) and "not-the-password" not in str(error)


async def test_a_url_libpq_cannot_parse_is_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(StoreUrlError, match="nosuchoption") as refused:
        await open_store(tmp_path, "postgresql://car:pw@127.0.0.1/x?nosuchoption=1")
    assert "pw" not in str(refused.value)
