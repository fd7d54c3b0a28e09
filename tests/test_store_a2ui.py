"""The A2uiStore contract (car_grpc/store/repositories.py) against each real store: the
embedded SQLite file and a database of the session's PostgreSQL server (the `backend`,
`store` and `other` fixtures of tests/test_store_repositories.py)."""

from __future__ import annotations

import pytest

from car_grpc.store import Store
from car_grpc.store.repositories import SurfaceRow
from car_grpc.v1 import a2ui_pb2
from car_grpc.wire import codec
from tests.test_store_repositories import backend, now_ms, other, store

__all__ = ["backend", "other", "store"]  # the fixtures these tests use


def surface(surface_id: str, created: int, expires: int, owner: str = "local") -> SurfaceRow:
    s = a2ui_pb2.A2uiSurface(
        surface_id=surface_id,
        catalog_id="cat",
        components=[codec.to_struct({"id": "t", "component": "Text", "text": surface_id})],
        data_model=codec.to_value({"n": 1}),
        owner=a2ui_pb2.A2uiOwner(kind="local"),
        created_at=created,
        updated_at=created,
        expires_at=expires,
    )
    return SurfaceRow(s, owner, None)


async def test_a_surface_is_put_replaced_and_deleted_with_its_route(
    store: Store, other: Store
) -> None:
    now = now_ms()
    row = surface("s1", now, now + 60_000)
    await store.a2ui.put_surface(row)
    assert await other.a2ui.get_surface("s1", now) == row
    sealed = SurfaceRow(row.surface, "a2a:http://127.0.0.1/a2a", b"\x00sealed\xff")
    await store.a2ui.put_surface(sealed)
    assert await other.a2ui.get_surface("s1", now) == sealed
    assert await other.a2ui.count_surfaces(now, "a2a:http://127.0.0.1/a2a") == (1, 1)
    assert await other.a2ui.count_surfaces(now, "local") == (0, 1)
    assert await store.a2ui.delete_surface("s1") is True
    assert await store.a2ui.delete_surface("s1") is False
    assert await other.a2ui.get_surface("s1", now) is None


async def test_expired_surfaces_are_not_served_and_are_reaped_once(
    store: Store, other: Store
) -> None:
    now = now_ms()
    await store.a2ui.put_surface(surface("old", now - 20, now - 10))
    await store.a2ui.put_surface(surface("older", now - 30, now - 5))
    await store.a2ui.put_surface(surface("live", now - 40, now + 60_000))
    assert await other.a2ui.get_surface("old", now) is None
    assert [r.surface.surface_id for r in await other.a2ui.live_surfaces(now)] == ["live"]
    assert await other.a2ui.count_surfaces(now, "local") == (1, 1)
    assert await store.a2ui.reap(now) == ["older", "old"]  # oldest first
    assert await store.a2ui.reap(now) == []
    assert [r.surface.surface_id for r in await other.a2ui.live_surfaces(now)] == ["live"]


async def test_live_surfaces_oldest_first(store: Store) -> None:
    now = now_ms()
    for sid, created in (("b", now - 1), ("a", now - 3), ("c", now - 2)):
        await store.a2ui.put_surface(surface(sid, created, now + 60_000))
    assert [r.surface.surface_id for r in await store.a2ui.live_surfaces(now)] == ["a", "c", "b"]


async def test_peers_are_added_once_listed_in_order_and_removed(store: Store, other: Store) -> None:
    one = a2ui_pb2.A2aPeer(slug="one", url="http://127.0.0.1:1/a2a", label="One")
    two = a2ui_pb2.A2aPeer(slug="two", url="http://127.0.0.1:2/a2a")
    assert await store.a2ui.add_peer(one) is True
    assert await store.a2ui.add_peer(two) is True
    # The same slug, or the same url, is refused.
    assert await store.a2ui.add_peer(a2ui_pb2.A2aPeer(slug="one", url="http://x/")) is False
    assert await store.a2ui.add_peer(a2ui_pb2.A2aPeer(slug="three", url=two.url)) is False
    assert await other.a2ui.peers() == [one, two]
    assert await store.a2ui.remove_peer("one") is True
    assert await store.a2ui.remove_peer("one") is False
    assert await other.a2ui.peers() == [two]


async def test_a_batch_of_surfaces_is_written_whole(store: Store, other: Store) -> None:
    now = now_ms()
    await store.a2ui.put_surface(surface("gone", now, now + 60_000))
    await store.a2ui.write_surfaces(
        [surface("one", now, now + 60_000), surface("two", now + 1, now + 60_000)], ["gone"]
    )
    assert [r.surface.surface_id for r in await other.a2ui.live_surfaces(now)] == ["one", "two"]
    # A batch that fails (here: a row the store cannot take) leaves nothing of itself.
    bad = SurfaceRow(surface("three", now, now + 60_000).surface, "x" * 10, None)
    broken = SurfaceRow(bad.surface, None, None)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error
        await store.a2ui.write_surfaces([bad, broken], ["one"])
    assert [r.surface.surface_id for r in await other.a2ui.live_surfaces(now)] == ["one", "two"]
