"""OutboundQueue, the queue of serialized frames towards one client: bounded in frames and
in bytes, a lone oversized frame let in, senders waiting in order, no overtaking, close
ending every wait."""

from __future__ import annotations

import asyncio

import pytest

from car_grpc.core.outbound import OutboundQueue


class Gone(Exception):
    pass


async def settle() -> None:
    """Let every runnable task run until it waits again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_bounded_in_bytes_as_well_as_frames() -> None:
    q = OutboundQueue(max_frames=3, max_bytes=100)
    q.put_nowait(b"a" * 40)
    q.put_nowait(b"b" * 40)
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"c" * 21)  # 101 bytes
    assert q.full() is False  # a smaller frame still fits
    q.put_nowait(b"c" * 20)  # exactly 100 bytes
    assert (len(q), q.bytes) == (3, 100) and q.full()
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"")  # frames: 3 of 3
    assert await q.get() == b"a" * 40
    assert q.bytes == 60
    q.put_nowait(b"d" * 40)
    assert [await q.get() for _ in range(3)] == [b"b" * 40, b"c" * 20, b"d" * 40]
    assert q.bytes == 0 and q.empty()


async def test_a_frame_larger_than_the_budget_passes_alone() -> None:
    q = OutboundQueue(max_frames=10, max_bytes=100)
    q.put_nowait(b"x" * 1000)  # the queue was empty
    assert q.bytes == 1000
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"y")
    waiting = asyncio.create_task(q.put(b"z" * 1000))
    await settle()
    assert not waiting.done() and q.waiting == 1
    assert await q.get() == b"x" * 1000
    await asyncio.wait_for(waiting, 1)  # let in as soon as the queue is empty again
    assert (len(q), q.bytes) == (1, 1000)


async def test_senders_wait_in_order_and_nothing_overtakes_them() -> None:
    q = OutboundQueue(max_frames=100, max_bytes=100)
    q.put_nowait(b"a" * 90)
    big = asyncio.create_task(q.put(b"b" * 50))
    await settle()
    small = asyncio.create_task(q.put(b"c" * 5))  # would fit, but must not overtake
    await settle()
    assert not big.done() and not small.done() and q.waiting == 2
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"d")  # a fan-out frame is dropped while senders wait
    assert await q.get() == b"a" * 90
    await asyncio.wait_for(asyncio.gather(big, small), 1)  # both fit now: let in together
    assert [await q.get(), await q.get()] == [b"b" * 50, b"c" * 5]


async def test_a_cancelled_sender_queues_nothing_and_lets_the_next_in() -> None:
    q = OutboundQueue(max_frames=100, max_bytes=100)
    q.put_nowait(b"a" * 60)
    big = asyncio.create_task(q.put(b"b" * 60))
    await settle()
    small = asyncio.create_task(q.put(b"c" * 30))
    await settle()
    big.cancel()
    await asyncio.wait_for(small, 1)  # the head gave up: the next one fits at once
    assert big.cancelled()
    assert [await q.get(), await q.get()] == [b"a" * 60, b"c" * 30]
    assert q.empty() and q.bytes == 0 and q.waiting == 0


async def test_close_ends_every_wait() -> None:
    q = OutboundQueue(max_frames=1, max_bytes=100)
    q.put_nowait(b"a")
    waiting = asyncio.create_task(q.put(b"b"))
    await settle()
    q.close(Gone)
    with pytest.raises(Gone):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(Gone):
        await q.put(b"c")
    assert q.full()
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"c")


async def test_join_waits_for_every_frame_to_be_done() -> None:
    q = OutboundQueue(max_frames=10, max_bytes=100)
    await asyncio.wait_for(q.join(), 1)  # nothing queued
    q.put_nowait(b"a")
    q.put_nowait(b"b")
    joined = asyncio.create_task(q.join())
    for _ in range(2):
        await q.get()
        await settle()
        assert not joined.done()
        q.task_done()
    await asyncio.wait_for(joined, 1)


async def test_many_frames_queued_at_once_as_one_by_one() -> None:
    """put_many_nowait queues frames in order while each fits as put_nowait would let it
    in (frames and bytes), stops at the first that does not, and leaves the rest out."""
    q = OutboundQueue(max_frames=4, max_bytes=100)
    told: list[int] = []
    q.on_put = lambda: told.append(len(q))
    assert q.put_many_nowait([b"a" * 40, b"b" * 40, b"c" * 21, b"d"]) == 2  # c: 101 bytes
    assert (len(q), q.bytes, told) == (2, 80, [2])  # the stream told once
    assert q.put_many_nowait([b"c" * 20, b"d", b"e"]) == 1  # d: past 100 bytes
    assert q.take_ready(10, 1000) == [b"a" * 40, b"b" * 40, b"c" * 20]
    assert q.put_many_nowait([b"x" * 1000, b"y"]) == 1  # a lone oversized frame, then full
    q.task_done(3)
    assert not q._finished.is_set()  # the oversized frame is not done
    q.close(Gone)
    assert q.put_many_nowait([b"z"]) == 0
