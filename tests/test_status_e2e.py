"""End-to-end: server.status and server.metrics (StatusService) on a real core over gRPC."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.v1 import (
    chats_pb2,
    host_pb2,
    runs_pb2,
    status_pb2,
    status_pb2_grpc,
    tools_pb2,
)
from car_grpc.wire.codec import json_to_message
from car_grpc.wire.errors import INTERNAL, INVALID_PARAMS, CarError
from tests.chat_helpers import accept_chat, bearer, tokens
from tests.error_details import error_info
from tests.roles import agent, host_role, ordinary
from tests.runs_helpers import record, start, turns
from tests.tool_host import ToolHost


def status_stub(channel: grpc.aio.Channel) -> status_pb2_grpc.StatusServiceAsyncStub:
    return status_pb2_grpc.StatusServiceStub(channel)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_status_shows_connections_chats_run_agents_and_the_store(
    core: Core, channel: grpc.aio.Channel
) -> None:
    worker = await agent(core, channel, "worker-1")
    plain = await ordinary(core, channel)
    boss = await host_role(core, channel)
    run_id = await start(worker)
    chat = chats_pb2.ChatRequest(agent_id="worker-1", prompt="hello", session_id="chat-1")
    await asyncio.gather(boss.request("agents_chat", chat), accept_chat(worker))

    status = await status_stub(channel).GetStatus(
        status_pb2.GetStatusRequest(), metadata=bearer(tokens(core)[1])
    )

    assert status.session_count == 3  # the typed call's own one-call session is not listed
    by_role = {s.role: s for s in status.sessions}
    attached = by_role[status_pb2.SESSION_ROLE_AGENT]
    assert attached.agent_id == "worker-1" and attached.current_run == run_id
    assert attached.protocol_version == 3 and attached.connected_at > 0
    assert status_pb2.SESSION_ROLE_ORDINARY in by_role and status_pb2.SESSION_ROLE_HOST in by_role
    [in_flight] = status.chats
    assert (in_flight.session_id, in_flight.agent_id, in_flight.accepted) == (
        "chat-1",
        "worker-1",
        True,
    )
    assert in_flight.host_session_id == by_role[status_pb2.SESSION_ROLE_HOST].session_id
    [run_agent] = status.run_agents
    assert (run_agent.agent_id, run_agent.runs, run_agent.in_progress) == ("worker-1", 1, 1)
    assert status.store_bytes > 0 and status.auth_enabled and status.approvals_enabled
    assert status.started_at > 0 and status.pending_approvals == 0
    for client in (worker, plain, boss):
        await client.close()


async def test_status_and_metrics_need_the_host_role(core: Core, channel: grpc.aio.Channel) -> None:
    plain = await ordinary(core, channel)
    for member, message in (
        ("server_status", status_pb2.GetStatusRequest()),
        ("server_metrics", status_pb2.GetMetricsRequest()),
    ):
        with pytest.raises(CarError) as refused:
            await plain.request(member, message)
        method = member.replace("_", ".")
        assert refused.value.code == INTERNAL
        assert refused.value.message == f"permission denied: {method} needs the host role"
    with pytest.raises(grpc.aio.AioRpcError) as typed:
        await status_stub(channel).GetMetrics(
            status_pb2.GetMetricsRequest(), metadata=bearer(tokens(core)[0])
        )
    assert typed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(typed.value).reason == "PERMISSION_DENIED"
    await plain.close()


async def test_metrics_count_requests_turns_approvals_and_callbacks(
    core: Core, channel: grpc.aio.Channel
) -> None:
    worker = await agent(core, channel, "worker-1")
    boss = await host_role(core, channel)
    run_id = await start(worker)
    assert (await record(worker, run_id, turns(3))).ok
    assert (await record(worker, run_id, turns(2))).ok
    with pytest.raises(CarError) as bad:
        await worker.request("runs_start", runs_pb2.StartRunRequest())
    assert bad.value.code == INVALID_PARAMS
    for approved in (True, False, False):
        raised = await boss.request(
            "host_request_approval", host_pb2.RequestApprovalRequest(title="t")
        )
        await boss.request(
            "host_resolve_approval",
            host_pb2.ResolveApprovalRequest(approval_id=raised.approval.id, approved=approved),
        )
    tools = ToolHost(worker, lambda req: asyncio.sleep(0, "done"))
    proposal = tools_pb2.SubmitProposalRequest()
    json_to_message(
        {"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}}, proposal
    )
    await worker.request("proposal_submit", proposal)

    reply = await boss.request("server_metrics", status_pb2.GetMetricsRequest())
    text = reply.text

    assert sample(text, "car_requests_total", method="runs.record_turns", code="ok") == 2
    assert sample(text, "car_requests_total", method="runs.start", code="-32602") == 1
    assert sample(text, "car_requests_total", method="session.auth", code="ok") == 2
    assert sample(text, "car_run_turns_appended_total") == 5
    assert sample(text, "car_approvals_resolved_total", outcome="approved") == 1
    assert sample(text, "car_approvals_resolved_total", outcome="denied") == 2
    assert sample(text, "car_callback_duration_seconds_count", method="tools.execute") == 1
    assert sample(text, "car_sessions_opened_total") == 2
    assert sample(text, "car_sessions", role="agent") == 1
    assert sample(text, "car_sessions", role="host") == 1
    assert sample(text, "car_store_bytes") > 0
    assert re.search(r"^# TYPE car_callback_duration_seconds histogram$", text, re.M)
    await tools.close()
    for client in (worker, boss):
        await client.close()
