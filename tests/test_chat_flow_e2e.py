"""End-to-end flow control of chats: with tiny buffers, tokens from a fast agent reach a
reading host complete and in order; a host that stops reading ends its chat with an error
within `chat_stall_timeout`, without holding up the agent's other chats for longer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2, session_pb2, session_pb2_grpc
from tests.bounded import bounded
from tests.chat_helpers import (
    accept_chat,
    bearer,
    chat_stub,
    emit,
    next_agent_notice,
    next_chat_event,
    tokens,
)
from tests.conftest import make_config
from tests.roles import agent, chat_host
from tests.ws_helpers import running_core

BUFFER = 4


def tiny_buffers(tmp_path: Path, **overrides: object) -> Config:
    return make_config(
        tmp_path,
        chat_buffer=BUFFER,
        session_outbound_queue=4,
        max_inflight_per_session=8,
        **overrides,
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return tiny_buffers(tmp_path)


@pytest.fixture
async def stall_core(tmp_path: Path) -> AsyncIterator[Core]:
    async with running_core(tiny_buffers(tmp_path / "stall", chat_stall_timeout=0.3).core) as core:
        yield core


async def test_fast_agent_reading_host_gets_every_token_in_order(
    core: Core, channel: grpc.aio.Channel
) -> None:
    h, a = await chat_host(core, channel), await agent(core, channel, "agent-1")
    pending = asyncio.create_task(
        h.request("agents_chat", chats_pb2.ChatRequest(agent_id="agent-1", prompt="count"))
    )
    sid = (await accept_chat(a)).session_id
    await pending
    n = 3000

    async def flood() -> None:
        for i in range(n):
            await emit(a, sid, "token", delta=f"{i},")
        await emit(a, sid, "done")

    sender = asyncio.create_task(flood())
    got = [await next_chat_event(h) for _ in range(n + 1)]
    await sender
    assert "".join(e.event.delta for e in got[:-1]) == "".join(f"{i}," for i in range(n))
    assert got[-1].event.kind == "done"
    await h.close()
    await a.close()


async def test_fast_agent_reading_chat_rpc_gets_every_token_in_order(
    core: Core, channel: grpc.aio.Channel
) -> None:
    a = await agent(core, channel, "agent-1")
    call = chat_stub(channel).Chat(
        chats_pb2.ChatRequest(agent_id="agent-1", prompt="count", session_id="rpc"),
        metadata=bearer(tokens(core)[0]),
    )
    await accept_chat(a)
    n = 3000

    async def flood() -> None:
        for i in range(n):
            await emit(a, "rpc", "token", delta=f"{i},")
        await emit(a, "rpc", "done")

    sender = asyncio.create_task(flood())
    items = [item async for item in call]
    await sender
    deltas = "".join(i.event.event.delta for i in items[1:-1])
    assert deltas == "".join(f"{i}," for i in range(n))
    assert items[-1].event.event.kind == "done"
    await a.close()


async def test_stalled_host_ends_its_chat_and_frees_the_agent_for_other_chats(
    stall_core: Core,
) -> None:
    async with grpc.aio.insecure_channel(stall_core.grpc_address) as channel:
        await stalled_host_scenario(stall_core, channel)


async def stalled_host_scenario(core: Core, channel: grpc.aio.Channel) -> None:
    assert core.parts is not None
    a = await agent(core, channel, "agent-1")
    # The stalled host: a raw session stream that stops reading after the chat's ack.
    stalled = session_pb2_grpc.SessionServiceStub(channel).Connect()
    auth = session_pb2.AuthenticateRequest(token=tokens(core)[0])
    await stalled.write(session_pb2.ClientFrame(id="1", session_auth=auth))
    await stalled.read()
    chat = chats_pb2.ChatRequest(agent_id="agent-1", prompt="flood", session_id="A")
    await stalled.write(session_pb2.ClientFrame(id="2", agents_chat=chat))
    await accept_chat(a)
    accepted = await stalled.read()
    assert isinstance(accepted, session_pb2.ServerFrame) and accepted.agents_chat.accepted
    chat_a = core.parts.chats.open["A"]
    # A reading host with a chat of its own on the same agent.
    reader = await chat_host(core, channel)
    pending = asyncio.create_task(
        reader.request(
            "agents_chat", chats_pb2.ChatRequest(agent_id="agent-1", prompt="hi", session_id="B")
        )
    )
    await accept_chat(a)
    await pending

    big = "x" * 16384
    cancelled = asyncio.Event()
    sent = 0

    async def agent_work() -> None:
        nonlocal sent
        # Flood A (16 KiB tokens) until the server gives up on its host, whatever the
        # transport windows hold; then B's tokens follow on the same stream.
        while not cancelled.is_set() and sent < 5000:
            await emit(a, "A", "token", delta=f"{sent}:{big}")
            sent += 1
        for i in range(20):
            await emit(a, "B", "token", delta=str(i))
        await emit(a, "B", "done")

    worker = asyncio.create_task(agent_work())
    # Chat A ends at the agent once the host has read nothing for the stall bound...
    assert (await next_agent_notice(a, timeout=30)).agent_chat_cancel.session_id == "A"
    cancelled.set()
    assert "A" not in core.parts.chats.open
    assert len(chat_a.events) <= BUFFER + 1  # what is held for the stalled host is bounded
    # ...and chat B, queued behind A's flood on the agent's stream, goes through whole.
    got = [await next_chat_event(reader) for _ in range(21)]
    assert [e.event.delta for e in got[:-1]] == [str(i) for i in range(20)]
    assert got[-1].event.kind == "done"
    await worker
    # When the stalled host reads again it finds a gap-free prefix, then the error.
    seen: list[int] = []
    while True:
        frame = await stalled.read()
        assert isinstance(frame, session_pb2.ServerFrame)
        event = frame.agents_chat_event.event
        if event.kind != "token":
            break
        seen.append(int(event.delta.split(":")[0]))
    assert seen == list(range(len(seen))) and 0 < len(seen) < sent
    assert (event.kind, event.message) == ("error", "chat ended: the host read nothing for 0.3s")
    stalled.cancel()
    await reader.close()
    await a.close()


async def test_agent_that_sends_its_last_tokens_and_leaves_loses_none(
    core: Core, channel: grpc.aio.Channel
) -> None:
    h, a = await chat_host(core, channel), await agent(core, channel, "agent-1")
    pending = asyncio.create_task(
        h.request("agents_chat", chats_pb2.ChatRequest(agent_id="agent-1", prompt="bye"))
    )
    sid = (await accept_chat(a)).session_id
    await pending
    n = 500
    for i in range(n):
        await emit(a, sid, "token", delta=f"{i},")
    await emit(a, sid, "done")
    await a.call.done_writing()  # a clean goodbye: half-close, then wait for the server
    got = [await next_chat_event(h) for _ in range(n + 1)]
    assert "".join(e.event.delta for e in got[:-1]) == "".join(f"{i}," for i in range(n))
    assert got[-1].event.kind == "done"
    await bounded(a.ended.wait())
    await h.close()
    await a.close()
