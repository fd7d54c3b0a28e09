"""Sessions in the roles the tests give them, on a running core over gRPC (a Connect
stream). A role's name means the same in every test:

- `agent(core, channel, agent_id)`: attached as agent `agent_id`, with a freshly minted
  agent token;
- `host_role(core, channel)`: the host token's session, with the host's rights (every
  run, host events, approvals, status);
- `ordinary(core, channel)`: a session with the daemon token, as any local client has;
- `chat_host(core, channel)`: the host of a chat, the session that opens chats with
  agents (`agents.chat`): an ordinary session, named for what it does.
"""

from __future__ import annotations

import grpc

from car_grpc.core.server import Core
from tests.session_client import SessionClient, connect


async def agent(core: Core, channel: grpc.aio.Channel, agent_id: str) -> SessionClient:
    """A session attached as `agent_id` with a freshly minted agent token."""
    assert core.parts is not None
    token = await core.parts.agent_tokens.add(agent_id)
    return await connect(channel, token=token, agent_id=agent_id)


async def host_role(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    """A session with the host token."""
    assert core.parts is not None and core.parts.tokens is not None
    return await connect(channel, host_token=core.parts.tokens.host)


async def ordinary(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    """A session with the daemon token."""
    assert core.parts is not None and core.parts.tokens is not None
    return await connect(channel, token=core.parts.tokens.daemon)


async def chat_host(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    """The host of a chat: an ordinary session (daemon token) that opens chats."""
    return await ordinary(core, channel)
