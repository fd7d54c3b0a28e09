"""Faults: a WebSocket client that goes away (TCP dropped, no close frame, as car-runtime
does) while the server waits on it. Every wait it leaves behind ends at once, with a
clear error for whoever else was waiting, however long the configured bound: the bounds
here are five minutes, so only the disconnect can end them.

Covered elsewhere: tool callbacks pending when the client drops (test_gateway_e2e,
test_typed_rpcs_e2e), an agent or host dropping mid-chat (test_chats_e2e,
test_chats_ws), clients that stop reading (test_gateway_e2e, test_runs_ws,
test_chats_ws, test_voice_e2e).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.wire.errors import INTERNAL, INVALID_PARAMS
from tests.conftest import make_config
from tests.ws_helpers import Rpc, RpcError, daemon_token, rpc, running

LONG = 300.0


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Core, Gateway]]:
    config = make_config(
        tmp_path,
        chat_ack_timeout=LONG,
        approval_timeout=LONG,
        gated_methods=frozenset({"state.set"}),
    )
    async with running(config) as pair:
        yield pair


async def attached_agent(core: Core, client: Rpc, agent_id: str) -> str:
    """Log `client` in as `agent_id`; its core session id."""
    assert core.parts is not None
    token = await core.parts.agent_tokens.add(agent_id)
    return str((await client.login(token=token, agent_id=agent_id))["session_id"])


async def session_closed(core: Core, session_id: str) -> None:
    assert core.parts is not None
    if session := core.parts.registry.sessions.get(session_id):
        await asyncio.wait_for(session.closed.wait(), 10)


async def failure(call: asyncio.Task[Any]) -> RpcError:
    with pytest.raises(RpcError) as err:
        await asyncio.wait_for(call, 10)
    return err.value


async def test_agent_gone_before_acking_a_chat_fails_it_at_once(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with rpc(gateway.url) as host, rpc(gateway.url) as agent:
        await host.login(token=daemon_token(core))
        agent_session = await attached_agent(core, agent, "bot")
        chat = asyncio.create_task(
            host.result("agents.chat", {"agent_id": "bot", "prompt": "hi", "session_id": "c1"})
        )
        await agent.expect_request("agent.chat")
        agent.drop()  # the ack never comes
        error = await failure(chat)
        assert (error.code, error.message) == (INTERNAL, "agent 'bot' disconnected")
        await session_closed(core, agent_session)
        assert core.parts is not None and not core.parts.chats.open
        # The host goes on: the chat id is free again, the agent gone.
        error = await failure(
            asyncio.create_task(
                host.result("agents.chat", {"agent_id": "bot", "prompt": "hi", "session_id": "c1"})
            )
        )
        assert error.message == "agent 'bot' is not attached"


async def test_agent_gone_before_answering_an_approval_fails_it_at_once(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with rpc(gateway.url) as host, rpc(gateway.url) as agent:
        await host.login(token=daemon_token(core))
        await attached_agent(core, agent, "bot")
        chat = asyncio.create_task(
            host.result("agents.chat", {"agent_id": "bot", "prompt": "hi", "session_id": "c1"})
        )
        await agent.answer(await agent.expect_request(), {"accepted": True})
        assert (await asyncio.wait_for(chat, 5))["accepted"] is True
        await agent.notify(
            "agent.chat.event",
            {"session_id": "c1", "kind": "approval_pending", "approval_id": "a1"},
        )
        assert (await host.next_notification("agents.chat.event"))["kind"] == "approval_pending"
        approve = asyncio.create_task(
            host.result(
                "agents.chat.approve", {"session_id": "c1", "approval_id": "a1", "decision": True}
            )
        )
        await agent.expect_request("agent.chat.approve")
        agent.drop()
        error = await failure(approve)
        assert (error.code, error.message) == (INTERNAL, "agent 'bot' disconnected")
        # ...and the chat itself ends with an error event at the host.
        event = await host.next_notification("agents.chat.event")
        assert event["session_id"] == "c1" and event["kind"] == "error"


async def test_client_gone_while_parked_at_the_gate_expires_its_approval(
    served: tuple[Core, Gateway],
) -> None:
    """Its approval expires at once (not after the approval timeout), and approving it
    later is refused."""
    core, gateway = served
    assert core.parts is not None and core.parts.tokens is not None
    async with (
        rpc(gateway.url) as approver,
        rpc(gateway.url) as caller,
    ):
        await approver.login(host_token=core.parts.tokens.host)
        await approver.result("host.subscribe", {})
        caller_session = (await caller.login(token=daemon_token(core)))["session_id"]
        parked = asyncio.create_task(caller.result("state.set", {"key": "k", "value": 1}))
        requested = await approver.next_notification("host.event")
        assert requested["kind"] == "approval.requested"
        approval_id = requested["payload"]["id"]
        caller.drop()
        resolved = await approver.next_notification("host.event")
        assert resolved["kind"] == "approval.resolved"
        assert resolved["payload"]["id"] == approval_id
        assert resolved["payload"]["status"] == "expired"
        assert resolved["payload"]["notes"] == "the request ended while waiting"
        error = await failure(
            asyncio.create_task(
                approver.result(
                    "host.resolve_approval", {"approval_id": approval_id, "approved": True}
                )
            )
        )
        assert error.code == INVALID_PARAMS and "already expired" in error.message
        with contextlib.suppress(RpcError, ConnectionClosed):  # its connection is gone
            await parked
        await session_closed(core, caller_session)
