"""The polyglot proof: the Node.js client in clients/node, built on nothing but proto/, run
against a real `car-grpc serve` process, and crossing languages with Python clients on
gRPC, on raw WebSocket JSON-RPC, and on the official `car-runtime` client.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from car_grpc.v1 import tools_pb2, tools_pb2_grpc
from tests.client_programs import Program, ensure_installed, run_node
from tests.serve_sync import Served, start_serve


@pytest.fixture(scope="session", autouse=True)
def _node_modules() -> None:
    ensure_installed()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One `car-grpc serve` for this module; each test uses its own agents and sessions."""
    server = start_serve(tmp_path_factory.mktemp("serve") / "car-home")
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, "car-grpc serve did not exit cleanly:\n" + "\n".join(server.log)


@pytest.fixture
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(served.grpc_address) as ch:
        yield ch


def node(
    served: Served, script: str, *args: str, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """A program of clients/node against `served`; it finds the token files as users' do."""
    return run_node(script, *args, address=served.grpc_address, car_home=served.car_home, **env)


def node_agent(served: Served, agent_id: str) -> contextlib.AbstractAsyncContextManager[Program]:
    """clients/node/agent.js attached as `agent_id` with a token from `car-grpc agents add`."""
    token = served.add_agent(agent_id)
    return node(served, "agent.js", CAR_AGENT_ID=agent_id, CAR_AGENT_TOKEN=token)


# ------------------------------------------------------------------ the Node agent


async def test_node_agent_attaches_and_owns_its_session(
    served: Served, channel: grpc.aio.Channel
) -> None:
    token = served.add_agent("node-agent")
    async with node_agent(served, "node-agent") as agent:
        ready = await agent.expect("ready")
        assert ready["agent_id"] == "node-agent"
        # The Node session is live and bound to the agent's credentials: a typed call
        # with them and its car-session-id runs as that session; other credentials fail.
        tools = tools_pb2_grpc.ToolServiceStub(channel)
        session = ("car-session-id", ready["session_id"])
        bound = (("authorization", f"Bearer {token}"), ("car-agent-id", "node-agent"), session)
        listed = await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=bound)
        assert listed.count == 0
        daemon = ("authorization", f"Bearer {served.token('auth-token')}")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=(daemon, session))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_node_agent_with_a_wrong_token_is_refused(served: Served) -> None:
    served.add_agent("node-agent")
    async with node(
        served, "agent.js", CAR_AGENT_ID="node-agent", CAR_AGENT_TOKEN="not-the-token"
    ) as agent:
        error = await agent.next_event()
        assert error == {
            "event": "error",
            "code": -32603,
            "message": "auth failed: token mismatch",
        }
        assert await agent.proc.wait() == 1


# ------------------------------------------------------------------ the Node host


async def test_node_tool_host_answers_the_callbacks_of_its_proposal(served: Served) -> None:
    async with node(served, "tool-host.js") as host:
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
