"""Helpers for chat tests: chat frames on real Connect streams and ChatService stubs (the
sessions themselves: tests/roles.py)."""

from __future__ import annotations

from typing import Any

import grpc

from car_grpc.core.server import Core
from car_grpc.v1 import chats_pb2, chats_pb2_grpc, session_pb2
from tests.session_client import SessionClient


def tokens(core: Core) -> tuple[str, str]:
    """(daemon token, host token) of a running core."""
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon, core.parts.tokens.host


def chat_stub(channel: grpc.aio.Channel) -> chats_pb2_grpc.ChatServiceAsyncStub:
    return chats_pb2_grpc.ChatServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def accept_chat(agent: SessionClient, timeout: float = 5) -> chats_pb2.AgentChatRequest:
    """Take the next agent.chat request and acknowledge it; returns its params."""
    frame = await agent.next_server_request(timeout)
    assert frame.WhichOneof("body") == "agent_chat", frame
    await agent.answer(frame.id, "agent_chat", chats_pb2.AgentChatResponse(accepted=True))
    return frame.agent_chat


async def emit(agent: SessionClient, session_id: str, kind: str, **fields: Any) -> None:
    """Send one agent.chat.event notification."""
    frame = session_pb2.ClientFrame()
    frame.agent_chat_event.session_id = session_id
    event = frame.agent_chat_event.event
    event.kind = kind
    for name, value in fields.items():
        setattr(event, name, value)
    await agent.send(frame)


async def next_chat_event(host: SessionClient, timeout: float = 5) -> chats_pb2.ChatEventNotice:
    frame = await host.next_notification(timeout)
    assert frame.WhichOneof("body") == "agents_chat_event", frame
    return frame.agents_chat_event


async def next_agent_notice(agent: SessionClient, timeout: float = 5) -> session_pb2.ServerFrame:
    return await agent.next_notification(timeout)
