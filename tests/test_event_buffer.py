"""Unit tests of the chat event buffer and of the pure chat rules (no sockets)."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import struct_pb2

from car_grpc.core.chats import (
    check_attachments,
    decision_approves,
    goal_status_after,
    valid_goal,
)
from car_grpc.core.event_buffer import EventBuffer, PutResult
from car_grpc.v1 import chats_pb2
from car_grpc.wire.errors import INVALID_PARAMS, CarError

# ------------------------------------------------------------------ EventBuffer


async def drain(buffer: EventBuffer[int]) -> list[int]:
    out = []
    while (item := await buffer.get()) is not None:
        out.append(item)
    return out


async def test_items_come_out_in_order_and_none_after_close() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=4, stall_timeout=5, limit_bytes=1 << 20)
    for i in range(3):
        assert await buffer.put(i, 1) is PutResult.QUEUED
    buffer.close(final=99)
    assert await buffer.put(100, 1) is PutResult.CLOSED
    assert await drain(buffer) == [0, 1, 2, 99]


async def test_full_buffer_makes_producers_wait_in_arrival_order() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=2, stall_timeout=5, limit_bytes=1 << 20)
    producers = [asyncio.create_task(buffer.put(i, 1)) for i in range(10)]
    await asyncio.sleep(0)
    assert len(buffer) == 10
    assert sum(p.done() for p in producers) == 2  # only the first two got in
    # A newcomer must not overtake the waiting producers even once space frees up.
    first = await buffer.get()
    late = asyncio.create_task(buffer.put(10, 1))
    await asyncio.sleep(0)
    assert not late.done() and len(buffer) == 10
    rest = [await buffer.get() for _ in range(10)]
    assert [first, *rest] == list(range(11))
    assert set(await asyncio.gather(*producers, late)) == {PutResult.QUEUED}


async def test_a_reader_that_stops_reading_stalls_waiting_producers() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=1, stall_timeout=0.05, limit_bytes=1 << 20)
    assert await buffer.put(0, 1) is PutResult.QUEUED
    waiting = [asyncio.create_task(buffer.put(i, 1)) for i in (1, 2)]
    results = await asyncio.gather(*waiting)
    assert PutResult.STALLED in results
    buffer.close(final=-1, drop_waiting=True)
    assert await drain(buffer) == [0, -1]


async def test_after_a_stall_new_producers_hear_at_once_until_the_reader_is_back() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=1, stall_timeout=0.05, limit_bytes=1 << 20)
    assert buffer.offer(0, 1) is PutResult.QUEUED
    first = buffer.offer(1, 1)
    assert not isinstance(first, PutResult)
    assert await buffer.admitted(first) is PutResult.STALLED
    late = buffer.offer(2, 1)  # the reader is still stalled: no new wait of its own
    assert not isinstance(late, PutResult) and late.done()
    assert late.result() is PutResult.STALLED
    assert await buffer.get() == 0  # the reader is back: the clock starts again
    again = buffer.offer(3, 1)
    assert not isinstance(again, PutResult) and not again.done()
    assert await buffer.get() == 1
    assert await buffer.get() == 2
    assert await buffer.admitted(again) is PutResult.QUEUED


async def test_a_slow_reader_that_keeps_reading_is_not_a_stall() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=1, stall_timeout=1.0, limit_bytes=1 << 20)
    producer = asyncio.gather(*(buffer.put(i, 1) for i in range(6)))
    got = []
    # Each take is well within the bound (by 0.75 s: a loaded machine may wake this loop
    # late), all of them together are not.
    for _ in range(6):
        await asyncio.sleep(0.25)
        item = await buffer.get()
        assert item is not None
        got.append(item)
    assert set(await producer) == {PutResult.QUEUED}
    assert got == list(range(6))


async def test_an_offer_takes_its_place_in_line_when_made_not_when_awaited() -> None:
    """offer (put's first step, which never waits) fixes the order: an item offered to a
    full buffer stays ahead of one offered after room was made, though nobody awaited it
    yet (the chat relay offers in the stream's read loop, and waits in a task)."""
    buffer: EventBuffer[int] = EventBuffer(limit=1, stall_timeout=5, limit_bytes=1 << 20)
    assert buffer.offer(0, 1) is PutResult.QUEUED
    waiting = buffer.offer(1, 1)
    assert isinstance(waiting, asyncio.Future)
    assert await buffer.get() == 0  # room: 1 is let in, ahead of anything offered now
    assert isinstance(buffer.offer(2, 1), asyncio.Future)
    assert await buffer.admitted(waiting) is PutResult.QUEUED
    buffer.close()
    assert await drain(buffer) == [1, 2]


async def test_close_admits_waiting_items_before_the_final_one() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=1, stall_timeout=5, limit_bytes=1 << 20)
    producers = [asyncio.create_task(buffer.put(i, 1)) for i in range(3)]
    await asyncio.sleep(0)
    buffer.close(final=-1)
    assert [await p for p in producers] == [PutResult.QUEUED] * 3
    assert await drain(buffer) == [0, 1, 2, -1]


async def test_discard_drops_everything() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=1, stall_timeout=5, limit_bytes=1 << 20)
    producers = [asyncio.create_task(buffer.put(i, 1)) for i in range(3)]
    await asyncio.sleep(0)
    buffer.discard()
    assert [await p for p in producers] == [PutResult.QUEUED, PutResult.CLOSED, PutResult.CLOSED]
    assert await buffer.get() is None and len(buffer) == 0


async def test_the_byte_bound_makes_producers_wait_in_order_though_items_are_few() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=100, stall_timeout=5, limit_bytes=10)
    assert buffer.offer(0, 4) is PutResult.QUEUED
    assert buffer.offer(1, 6) is PutResult.QUEUED  # exactly at the bound
    big = buffer.offer(2, 8)
    small = buffer.offer(3, 1)  # it would fit, but must not overtake the big one
    assert isinstance(big, asyncio.Future) and isinstance(small, asyncio.Future)
    assert len(buffer) == 4 and buffer.nbytes == 10
    assert await buffer.get() == 0  # 6 bytes queued: the 8-byte item still waits
    assert not big.done() and not small.done()
    assert await buffer.get() == 1  # room for both now: both go in, in order
    assert big.result() is PutResult.QUEUED and small.result() is PutResult.QUEUED
    assert buffer.nbytes == 9
    buffer.close()
    assert await drain(buffer) == [2, 3] and buffer.nbytes == 0


async def test_one_item_over_the_byte_bound_passes_alone() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=100, stall_timeout=5, limit_bytes=10)
    assert buffer.offer(0, 50) is PutResult.QUEUED  # an empty buffer takes any one item
    later = buffer.offer(1, 1)
    assert isinstance(later, asyncio.Future)
    assert await buffer.get() == 0
    assert await buffer.admitted(later) is PutResult.QUEUED
    huge = buffer.offer(2, 50)  # not while anything else is queued
    assert isinstance(huge, asyncio.Future) and not huge.done()
    assert await buffer.get() == 1
    assert await buffer.admitted(huge) is PutResult.QUEUED
    assert buffer.nbytes == 50


async def test_the_item_bound_still_holds_for_tiny_items() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=2, stall_timeout=5, limit_bytes=1 << 20)
    assert buffer.offer(0, 1) is PutResult.QUEUED
    assert buffer.offer(1, 1) is PutResult.QUEUED
    assert isinstance(buffer.offer(2, 1), asyncio.Future)
    assert await buffer.get_many(10) == [0, 1]  # only what it held; 2 got in meanwhile
    assert await buffer.get_many(10) == [2]


async def test_a_reader_stalled_by_the_byte_bound_is_a_stall() -> None:
    buffer: EventBuffer[int] = EventBuffer(limit=100, stall_timeout=0.05, limit_bytes=10)
    assert await buffer.put(0, 10) is PutResult.QUEUED
    assert await buffer.put(1, 1) is PutResult.STALLED
    buffer.discard()
    assert buffer.nbytes == 0 and await buffer.get() is None


# ------------------------------------------------------------------ pure rules


def test_goal_defaults_and_clamps() -> None:
    assert valid_goal("c", None, "goal").max_iterations == 8
    assert valid_goal("c", 0, "goal").max_iterations == 1
    assert valid_goal("c", 51, "goal").max_iterations == 50
    assert valid_goal("c", 50, "goal").max_iterations == 50
    with pytest.raises(CarError) as err:
        valid_goal("  ", 3, "goal")
    assert err.value.code == INVALID_PARAMS and err.value.message.endswith(": goal.check")


def _attachment(**fields: object) -> chats_pb2.ChatAttachment:
    return chats_pb2.ChatAttachment(**fields)  # type: ignore[arg-type]


B64, URL = chats_pb2.ATTACHMENT_TYPE_IMAGE_BASE64, chats_pb2.ATTACHMENT_TYPE_IMAGE_URL


@pytest.mark.parametrize(
    "attachment",
    [
        _attachment(type=B64, data="AAAA", media_type=f"image/{kind}")
        for kind in ("png", "jpeg", "gif", "webp")
    ]
    + [_attachment(type=URL, url="http://x.test/a.png"), _attachment(type=URL, url="HTTPS://x")],
)
def test_good_attachments(attachment: chats_pb2.ChatAttachment) -> None:
    check_attachments([attachment])


@pytest.mark.parametrize(
    ("attachment", "field"),
    [
        (_attachment(type=B64, media_type="image/png"), "data"),
        (_attachment(type=B64, data="AAAA"), "media_type"),
        (_attachment(type=B64, data="AAAA", media_type="image/svg+xml"), "media_type"),
        (_attachment(type=URL, url="ftp://x.test/a.png"), "url"),
        (_attachment(type=URL, url="https://"), "url"),
        (_attachment(type=URL), "url"),
        (_attachment(), "type"),
    ],
)
def test_bad_attachments(attachment: chats_pb2.ChatAttachment, field: str) -> None:
    good = _attachment(type=URL, url="https://x.test")
    with pytest.raises(CarError) as err:
        check_attachments([good, attachment])
    assert err.value.code == INVALID_PARAMS
    assert err.value.message.endswith(f": attachments[1].{field}")


@pytest.mark.parametrize(
    ("decision", "approves"),
    [
        (struct_pb2.Value(bool_value=True), True),
        (struct_pb2.Value(bool_value=False), False),
        (struct_pb2.Value(string_value="approve"), True),
        (struct_pb2.Value(string_value="Approved"), True),
        (struct_pb2.Value(string_value="yes"), True),
        (struct_pb2.Value(string_value="y"), False),
        (struct_pb2.Value(string_value="deny"), False),
        (struct_pb2.Value(number_value=1), False),
        (struct_pb2.Value(), False),
    ],
)
def test_decisions(decision: struct_pb2.Value, approves: bool) -> None:
    assert decision_approves(decision) is approves


@pytest.mark.parametrize(
    ("kind", "evaluated", "met", "status"),
    [
        ("done", True, True, chats_pb2.GOAL_STATUS_MET),
        ("error", True, True, chats_pb2.GOAL_STATUS_MET),
        ("done", False, False, chats_pb2.GOAL_STATUS_UNEVALUATED),
        ("done", True, False, chats_pb2.GOAL_STATUS_ACTIVE),
        ("error", False, False, chats_pb2.GOAL_STATUS_ERROR),
        ("auth_required", True, False, chats_pb2.GOAL_STATUS_ERROR),
        (None, False, False, chats_pb2.GOAL_STATUS_ACTIVE),
    ],
)
def test_goal_status_after_the_chat(
    kind: str | None, evaluated: bool, met: bool, status: int
) -> None:
    assert goal_status_after(kind, evaluated, met) == status


async def test_get_nowait_takes_what_is_there_and_never_waits() -> None:
    buffer: EventBuffer[int] = EventBuffer(2, 5.0, limit_bytes=1 << 20)
    assert buffer.get_nowait() is None  # empty: nothing, and nothing awaited
    assert buffer.offer(1, 1) is PutResult.QUEUED and buffer.offer(2, 1) is PutResult.QUEUED
    waiting = buffer.offer(3, 1)  # full: it waits in line
    assert not isinstance(waiting, PutResult)
    assert buffer.get_nowait() == 1
    assert await buffer.admitted(waiting) is PutResult.QUEUED  # the take let it in
    buffer.close()
    assert [buffer.get_nowait(), buffer.get_nowait(), buffer.get_nowait()] == [2, 3, None]
    assert buffer.closed
