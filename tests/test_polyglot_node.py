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


async def test_node_tool_host_answers_the_callbacks_of_its_proposal(
    core: Core, config: Config
) -> None:
    async with run_node(
        "tool-host.js", address=core.grpc_address, car_home=_car_home(config)
    ) as host:
        registered, result = await host.finish(timeout=30)
    # The typed ListTools call, bound to the live session by car-session-id, saw the tools.
    assert registered == {"event": "registered", "count": 2, "tools": ["add", "divide"]}
    assert result["proposal_id"] == "node-proposal"
    assert result["results"] == [
        {"action_id": "sum", "status": "ACTION_STATUS_SUCCEEDED", "output": 5, "error": None},
        # "$sum.output" was replaced by 5, so `half` ran after `sum`.
        {"action_id": "half", "status": "ACTION_STATUS_SUCCEEDED", "output": 2.5, "error": None},
        # The tool answered ClientFrame.error; failure_behavior skip kept the others.
        {
            "action_id": "oops",
            "status": "ACTION_STATUS_FAILED",
            "output": None,
            "error": "division by zero",
        },
    ]
    assert result["tool_calls"] == 3
