"""KeyedOrder: per-key order, side by side across keys, a barrier for calls on every key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from car_grpc.core.keyed_order import KeyedOrder


class Steps:
    """Calls that log when they start and finish, and finish when released."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    def call(self, name: str) -> Callable[[], Awaitable[str]]:
        gate = self.gates[name] = asyncio.Event()

        async def step() -> str:
            self.log.append(f"start {name}")
            await gate.wait()
            self.log.append(f"end {name}")
            return name

        return step

    def release(self, name: str) -> None:
        self.gates[name].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_calls_on_one_key_run_in_the_order_made() -> None:
    order, steps = KeyedOrder(), Steps()
    first = order.run("a", steps.call("a1"))
    second = order.run("a", steps.call("a2"))
    await settle()
    assert steps.log == ["start a1"]
    steps.release("a2")  # released early: still waits for a1
    await settle()
    assert steps.log == ["start a1"]
    steps.release("a1")
    assert await second == "a2" and await first == "a1"
    assert steps.log == ["start a1", "end a1", "start a2", "end a2"]


async def test_calls_on_different_keys_run_side_by_side() -> None:
    order, steps = KeyedOrder(), Steps()
    blocked = order.run("a", steps.call("a"))
    other = order.run("b", steps.call("b"))
    steps.release("b")
    assert await asyncio.wait_for(other, 1) == "b"
    assert not blocked.done()
    steps.release("a")
    await blocked


async def test_a_call_on_every_key_waits_for_all_before_and_all_after_wait_for_it() -> None:
    order, steps = KeyedOrder(), Steps()
    a = order.run("a", steps.call("a"))
    b = order.run("b", steps.call("b"))
    every = order.run(None, steps.call("all"))
    later = order.run("c", steps.call("c"))
    steps.release("all")
    steps.release("c")
    steps.release("a")
    await settle()
    assert "start all" not in steps.log  # b has not finished
    steps.release("b")
    await asyncio.gather(a, b, every, later)
    assert steps.log.index("end all") < steps.log.index("start c")
    assert steps.log.index("end b") < steps.log.index("start all")


async def test_a_failed_call_does_not_stop_the_next_and_finished_keys_are_forgotten() -> None:
    order = KeyedOrder()

    async def fail() -> None:
        raise RuntimeError("store down")

    async def ok() -> str:
        return "ok"

    failed = order.run("a", fail)
    after = order.run("a", ok)
    with pytest.raises(RuntimeError):
        await failed
    assert await after == "ok"
    await settle()
    assert order._tails == {} and order._barrier is None  # bounded by calls in flight
