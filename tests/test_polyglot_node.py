"""The polyglot proof: the Node.js client in clients/node, built on nothing but proto/,
against the real server, and crossing languages with Python clients.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from tests.node_programs import ensure_installed, run_node


@pytest.fixture(scope="session", autouse=True)
def _node_modules() -> None:
    ensure_installed()


def _car_home(config: Config) -> Path:
    return config.token_dir.parent


async def _agent_token(core: Core, agent_id: str) -> str:
    assert core.state is not None
    return await asyncio.to_thread(core.state.agent_tokens.add, agent_id)


async def test_node_agent_attaches_with_its_agent_token(core: Core, config: Config) -> None:
    token = await _agent_token(core, "node-agent")
    async with run_node(
        "agent.js",
        address=core.grpc_address,
        car_home=_car_home(config),
        CAR_AGENT_ID="node-agent",
        CAR_AGENT_TOKEN=token,
    ) as agent:
        ready = await agent.expect("ready")
        assert ready["agent_id"] == "node-agent"
        assert core.state is not None
        assert ready["session_id"] in core.state.sessions


async def test_node_agent_with_a_wrong_token_is_refused(core: Core, config: Config) -> None:
    await _agent_token(core, "node-agent")
    async with run_node(
        "agent.js",
        address=core.grpc_address,
        car_home=_car_home(config),
        CAR_AGENT_ID="node-agent",
        CAR_AGENT_TOKEN="not-the-token",
    ) as agent:
        error = await agent.next_event()
        assert error == {
            "event": "error",
            "code": -32603,
            "message": "auth failed: token mismatch",
        }
        assert await agent.proc.wait() == 1
