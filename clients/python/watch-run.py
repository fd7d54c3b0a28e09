"""Watches a run with RunService.WatchRun: every record from a cursor on, then each new one
live, until the run's `ended` record. When the connection drops it watches again from the
last cursor it saw, so no record is missed or repeated.

    python watch-run.py <run_id> [cursor]

Reads with the host token (the host role may read every run); set CAR_AGENT_ID and
CAR_AGENT_TOKEN to watch as the run's agent instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import grpc
from car import Metadata, channel, fail, from_error, from_value, host_token, log, metadata

from car_grpc.v1 import runs_pb2, runs_pb2_grpc

# Reconnect every 200 ms while the server is unreachable, for at most ~10 s in a row.
RETRY_SECONDS = 0.2
RETRIES = 50


def credentials() -> Metadata:
    """Read at every (re)connect: a restarted server writes a new host token."""
    if agent_id := os.environ.get("CAR_AGENT_ID"):
        return metadata(os.environ.get("CAR_AGENT_TOKEN", ""), agent_id=agent_id)
    return metadata(host_token())


def describe(item: runs_pb2.WatchRunResponse) -> dict[str, object]:
    """A record as flat JSON fields; its `detail` oneof is one of three types."""
    fields: dict[str, object] = {
        "cursor": item.cursor,
        "status": runs_pb2.RunStatus.Name(item.status),
    }
    record = item.record
    detail = record.WhichOneof("detail")
    if detail == "started":
        started = record.started
        return {**fields, "kind": "started", "agent_id": started.agent_id, "intent": started.intent}
    if detail == "turn":
        turn = record.turn
        return {
            **fields,
            "kind": "turn",
            "index": turn.index,
            "prompt": turn.prompt,
            "tool": turn.tool,
            "parameters": from_value(turn.parameters),
            "output": from_value(turn.output),
        }
    if detail == "ended":
        ended = record.ended
        return {
            **fields,
            "kind": "ended",
            "ended_status": runs_pb2.RunStatus.Name(ended.status),
            "outcome": ended.outcome.status if ended.HasField("outcome") else None,
            "outcome_enum": runs_pb2.RunOutcomeStatus.Name(ended.outcome.status_enum),
        }
    return fields


async def main(run_id: str, cursor: int) -> None:
    async with channel() as ch:
        runs = runs_pb2_grpc.RunServiceStub(ch)
        # guide:watch-run
        left = RETRIES
        while True:
            request = runs_pb2.WatchRunRequest(run_id=run_id, cursor=cursor)
            try:
                async for item in runs.WatchRun(request, metadata=credentials()):
                    cursor, left = item.cursor, RETRIES  # records seen so far: where to resume
                    log("record", **describe(item))
                log("end", cursor=cursor)  # the stream ended with OK: the run ended
                return
            except grpc.aio.AioRpcError as e:
                # The server's own answers (not found, refused) carry car-error-bin and are
                # final; anything else is the connection: watch again from the last cursor.
                failure = from_error(e)
                if failure.answered or left == 0:
                    fail(failure)
                if left == RETRIES:
                    log("reconnecting", cursor=cursor, reason=failure.message)
                left -= 1
                await asyncio.sleep(RETRY_SECONDS)
        # guide:end


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Watches a run, resuming after a drop.")
    parser.add_argument("run_id")
    parser.add_argument("cursor", type=int, nargs="?", default=0, help="records already seen")
    args = parser.parse_args()
    asyncio.run(main(args.run_id, args.cursor))
