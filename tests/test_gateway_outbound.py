"""The queue towards one WebSocket client, bounded in frames and in bytes (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from car_grpc.gateway.outbound import OutboundQueue


async def test_bounded_in_bytes_as_well_as_in_frames() -> None:
    queue = OutboundQueue(max_frames=3, max_bytes=100)
    queue.put_nowait("a" * 60)
    queue.put_nowait(b"b" * 40)
    assert queue.nbytes == 100 and queue.full()
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("c")  # one byte too many
    assert await queue.get() == "a" * 60
    queue.put_nowait("c" * 30)
    queue.put_nowait("d")
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("")  # three frames: full in frames, whatever their size
    assert queue.nbytes == 71 and queue.peak_bytes == 100


async def test_a_frame_larger_than_the_budget_goes_alone() -> None:
    queue = OutboundQueue(max_frames=8, max_bytes=100)
    queue.put_nowait("x")
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("y" * 500)  # not behind another frame...
    await queue.get()
    queue.put_nowait("y" * 500)  # ...but into an empty queue
    assert queue.nbytes == 500 and queue.full()
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("z")


async def test_a_producer_waits_for_room_while_the_client_takes_frames() -> None:
    queue = OutboundQueue(max_frames=8, max_bytes=100)
    queue.put_nowait("a" * 100)
    put = asyncio.create_task(queue.put("b" * 100, stall=5))
    await asyncio.sleep(0.05)
    assert not put.done()  # waiting for room
    assert await queue.get() == "a" * 100
    assert await asyncio.wait_for(put, 1) is True
    assert await queue.get() == "b" * 100


async def test_a_producer_gives_up_when_the_client_takes_nothing_for_the_stall_time() -> None:
    queue = OutboundQueue(max_frames=16, max_bytes=100)
    for _ in range(10):
        queue.put_nowait("a" * 10)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await queue.put("b", stall=0.2) is False
    assert 0.2 <= loop.time() - start < 1
    assert len(queue) == 10 and queue.nbytes == 100  # nothing was queued


async def test_the_stall_time_restarts_whenever_the_client_takes_a_frame() -> None:
    """A slow reader is waited for: 1.25 s of waiting (more than the 1 s stall time) with
    a frame taken every 0.25 s (a wide margin below it: a loaded machine may wake this
    loop late)."""
    queue = OutboundQueue(max_frames=16, max_bytes=100)
    for _ in range(10):
        queue.put_nowait("a" * 10)
    big = asyncio.create_task(queue.put("b" * 100, stall=1.0))
    for _ in range(5):
        await asyncio.sleep(0.25)
        assert not big.done()
        await queue.get()
    for _ in range(5):
        await queue.get()
    assert await asyncio.wait_for(big, 1) is True


async def test_join_waits_for_every_frame_to_be_done() -> None:
    queue = OutboundQueue(max_frames=8, max_bytes=100)
    queue.put_nowait("a")
    queue.put_nowait("b")
    joined = asyncio.create_task(queue.join())
    await queue.get()
    queue.task_done()
    await asyncio.sleep(0.01)
    assert not joined.done()
    await queue.get()
    queue.task_done()
    await asyncio.wait_for(joined, 1)
