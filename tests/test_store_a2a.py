"""The A2A repositories' contract (A2aClientStore, A2aTaskStore), against both stores:
the embedded SQLite file and a database of the session's real PostgreSQL server."""

from __future__ import annotations

import pytest

from car_grpc.store import A2aTaskRow, Store, StoreConflict
from tests.test_store_repositories import backend, other, store

__all__ = ["backend", "other", "store"]

WORKING, COMPLETED, FAILED = 3, 4, 5


def row(task_id: str, at: int, *, state: int = WORKING, caller: str = "peer", agent: str = "a1",
        context: str = "ctx") -> A2aTaskRow:  # fmt: skip
    return A2aTaskRow(task_id, agent, caller, context, state, at, f"task {task_id}".encode())


async def test_client_tokens_are_found_by_digest_replaced_and_removed(
    store: Store, other: Store
) -> None:
    clients = store.a2a_clients
    await clients.put("peer-b", b"b" * 32, 2)
    await clients.put("peer-a", b"a" * 32, 1)
    assert await other.a2a_clients.find(b"a" * 32) == "peer-a"
    assert await other.a2a_clients.find(b"x" * 32) is None
    assert [(r.name, r.created_at) for r in await other.a2a_clients.list_all()] == [
        ("peer-a", 1),
        ("peer-b", 2),
    ]
    await clients.put("peer-a", b"c" * 32, 3)  # a new token replaces the old one
    assert await other.a2a_clients.find(b"a" * 32) is None
    assert await other.a2a_clients.find(b"c" * 32) == "peer-a"
    assert await clients.remove("peer-a") is True
    assert await clients.remove("peer-a") is False
    assert await other.a2a_clients.find(b"c" * 32) is None


async def test_tasks_are_replaced_whole_and_keep_their_owner(store: Store, other: Store) -> None:
    tasks = store.a2a_tasks
    await tasks.put(row("t1", 10))
    await tasks.put(row("t1", 11, state=COMPLETED))
    got = await other.a2a_tasks.get("t1")
    assert got == row("t1", 11, state=COMPLETED)
    assert await other.a2a_tasks.get("nope") is None
    with pytest.raises(StoreConflict):
        await tasks.put(row("t1", 12, caller="intruder"))
    with pytest.raises(StoreConflict):
        await tasks.put(row("t1", 12, agent="a2"))
    assert await other.a2a_tasks.get("t1") == got
    assert await tasks.delete("t1") is True
    assert await tasks.delete("t1") is False


async def test_a_page_is_the_callers_tasks_with_one_agent_newest_first(store: Store) -> None:
    tasks = store.a2a_tasks
    for i in range(5):
        await tasks.put(row(f"t{i}", 100 + i, context="c1" if i % 2 else "c0"))
    await tasks.put(row("other-caller", 200, caller="someone"))
    await tasks.put(row("other-agent", 200, agent="a2"))
    await tasks.put(row("done", 50, state=COMPLETED))
    page, total = await tasks.page("a1", "peer", context_id=None, state=None, limit=3, offset=0)
    assert [r.task_id for r in page] == ["t4", "t3", "t2"] and total == 6
    page, total = await tasks.page("a1", "peer", context_id=None, state=None, limit=3, offset=3)
    assert [r.task_id for r in page] == ["t1", "t0", "done"] and total == 6
    page, total = await tasks.page("a1", "peer", context_id="c1", state=None, limit=9, offset=0)
    assert [r.task_id for r in page] == ["t3", "t1"] and total == 2
    page, total = await tasks.page(
        "a1", "peer", context_id=None, state=COMPLETED, limit=9, offset=0
    )
    assert [r.task_id for r in page] == ["done"] and total == 1


async def test_prune_drops_the_oldest_finished_tasks_beyond_the_newest_kept(store: Store) -> None:
    tasks = store.a2a_tasks
    await tasks.put(row("old-running", 1))
    await tasks.put(row("old-done", 2, state=COMPLETED))
    await tasks.put(row("old-failed", 3, state=FAILED))
    await tasks.put(row("new-done", 4, state=COMPLETED))
    await tasks.put(row("someone-elses", 0, state=COMPLETED, caller="someone"))
    assert await tasks.prune("peer", 1, [COMPLETED, FAILED]) == 2
    assert await tasks.get("old-done") is None and await tasks.get("old-failed") is None
    for kept in ("old-running", "new-done", "someone-elses"):
        assert await tasks.get(kept) is not None
    assert [r.task_id for r in await tasks.in_states([WORKING])] == ["old-running"]
    assert [r.task_id for r in await tasks.in_states([COMPLETED, WORKING])] == [
        "someone-elses",
        "old-running",
        "new-done",
    ]
