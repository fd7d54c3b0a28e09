"""End-to-end byte bound of a chat's event buffer (`chat_buffer_bytes`): an agent whose
large events would pass it is slowed down, with nothing dropped, though the buffer's item
bound is far away."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2
from tests.chat_helpers import accept_chat, emit, next_chat_event
from tests.conftest import make_config
from tests.roles import agent, chat_host

BUFFER_BYTES = 256 * 1024
PAD = "x" * (64 * 1024)  # four such events are over BUFFER_BYTES


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(
        tmp_path,
        chat_buffer=10_000,
        chat_buffer_bytes=BUFFER_BYTES,
        session_outbound_queue=4,
        max_inflight_per_session=8,
    )


async def test_large_events_past_the_byte_bound_slow_the_agent_and_lose_nothing(
    core: Core, channel: grpc.aio.Channel
) -> None:
    assert core.parts is not None
    h, a = await chat_host(core, channel), await agent(core, channel, "agent-1")
    pending = asyncio.create_task(
        h.request("agents_chat", chats_pb2.ChatRequest(agent_id="agent-1", prompt="big"))
    )
    sid = (await accept_chat(a)).session_id
    await pending
    events = core.parts.chats.open[sid].events
    h.pause_reading()
    # The host reads nothing: its stream and the transport fill up, then the buffer to its
    # byte bound, then the agent's events wait their turn (len counts those waiting).
    sent = 0
    async with asyncio.timeout(30):
        while len(events) < 5:
            await emit(a, sid, "token", delta=f"{sent}:{PAD}")
            sent += 1
            await asyncio.sleep(0)
    assert 3 * len(PAD) <= events.nbytes <= BUFFER_BYTES
    h.resume_reading()
    sender = asyncio.create_task(emit(a, sid, "done"))
    got = [await next_chat_event(h) for _ in range(sent + 1)]
    await sender
    assert [e.event.delta for e in got[:-1]] == [f"{i}:{PAD}" for i in range(sent)]
    assert got[-1].event.kind == "done"
    await h.close()
    await a.close()
