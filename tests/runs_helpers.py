"""Helpers for the runs tests: runs on a real core over gRPC (the sessions that record and
read them: tests/roles.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from car_grpc.core.server import Core
from car_grpc.v1 import runs_pb2, session_pb2
from tests.session_client import SessionClient


def state_of(core: Core) -> Any:
    assert core.parts is not None
    return core.parts


async def start(client: SessionClient, intent: str = "do the thing", **fields: Any) -> str:
    reply = await client.request("runs_start", runs_pb2.StartRunRequest(intent=intent, **fields))
    return str(reply.run_id)


def turns(n: int, prompt: str = "p", **fields: Any) -> list[runs_pb2.RunTurn]:
    return [runs_pb2.RunTurn(prompt=f"{prompt}{i}", **fields) for i in range(n)]


async def record(
    client: SessionClient, run_id: str, batch: Iterable[runs_pb2.RunTurn]
) -> runs_pb2.RecordTurnsResponse:
    reply = await client.request(
        "runs_record_turns", runs_pb2.RecordTurnsRequest(run_id=run_id, turns=list(batch))
    )
    assert isinstance(reply, runs_pb2.RecordTurnsResponse)
    return reply


async def complete(client: SessionClient, run_id: str, status: str = "success") -> None:
    req = runs_pb2.CompleteRunRequest(run_id=run_id, outcome=runs_pb2.RunOutcome(status=status))
    reply = await client.request("runs_complete", req)
    assert reply.ok and reply.run_id == run_id


async def trace(client: SessionClient, run_id: str, **fields: Any) -> runs_pb2.GetTraceResponse:
    reply = await client.request(
        "runs_get_trace", runs_pb2.GetTraceRequest(run_id=run_id, **fields)
    )
    assert isinstance(reply, runs_pb2.GetTraceResponse)
    return reply


async def summaries(client: SessionClient, agent_id: str) -> list[runs_pb2.RunSummary]:
    reply = await client.request("runs_list", runs_pb2.ListRunsRequest(agent_id=agent_id))
    return list(reply.runs)


async def wait_for_status(
    reader: SessionClient, agent_id: str, run_id: str, status: int, timeout: float = 5
) -> None:
    """Poll runs.list until the run has `status` (the store is the truth)."""
    async with asyncio.timeout(timeout):
        while True:
            if any(
                s.run_id == run_id and s.status == status for s in await summaries(reader, agent_id)
            ):
                return
            await asyncio.sleep(0.01)


async def next_event(client: SessionClient, timeout: float = 5) -> runs_pb2.RunTraceEvent:
    frame: session_pb2.ServerFrame = await client.next_notification(timeout)
    assert frame.WhichOneof("body") == "runs_trace_event", frame
    return frame.runs_trace_event
