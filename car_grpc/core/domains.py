"""Installs every domain of the core: importing a module registers its handlers, and
`install` gives each domain its state on the ServerState."""

from __future__ import annotations

from car_grpc.core import (  # noqa: F401  (registers handlers)
    approvals,
    chats,
    host,
    meetings,
    policies,
    runs,
    sessions,
    status,
    tools,
    voice,
)
from car_grpc.core import state as _state  # noqa: F401  (registers handlers)
from car_grpc.core.server_state import ServerState


async def install(state: ServerState) -> None:
    """Attach domain state to a fresh ServerState (called once at start)."""
    host.install(state)
    await approvals.install(state)
    await runs.install(state)
    await chats.install(state)
    voice.install(state)
    await meetings.install(state)
    return None
