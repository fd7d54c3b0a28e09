"""An agent that records a run: RunService.StartRun, one RecordTurns call per prompt, then
CompleteRun, all authenticated with the agent's token.

    CAR_AGENT_ID=my-agent CAR_AGENT_TOKEN=$(car-grpc agents add my-agent) \\
        python record-run.py [--step] <intent> <prompt>...

Each turn records the prompt, the tool "shell", some parameters and the prompt in upper
case as its output. With --step it waits for a line on stdin before each turn and before
completing, so that a watcher can be seen to receive every record live.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc
from car import JSON, channel, fail, log, metadata, to_value

from car_grpc.v1 import runs_pb2, runs_pb2_grpc


async def main(step: bool, intent: str, prompts: list[str]) -> None:
    agent = metadata(
        os.environ.get("CAR_AGENT_TOKEN", ""), agent_id=os.environ.get("CAR_AGENT_ID", "")
    )
    lines = asyncio.StreamReader()
    if step:
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)

    async def wait() -> None:
        if step and not await lines.readline():
            sys.exit(0)  # the driver went away

    async with channel() as ch:
        # guide:record-run
        runs = runs_pb2_grpc.RunServiceStub(ch)
        try:
            started = await runs.StartRun(
                runs_pb2.StartRunRequest(intent=intent), metadata=agent, timeout=10
            )
            log("started", run_id=started.run_id, agent_id=started.agent_id)
            for i, prompt in enumerate(prompts):
                await wait()
                parameters: JSON = {
                    "argv": ["echo", prompt],
                    "step": i + 1,
                    "env": {"LANG": "C", "dry_run": False, "limit": None},
                }
                turn = runs_pb2.RunTurn(
                    prompt=prompt,
                    tool="shell",
                    parameters=to_value(parameters),
                    output=to_value(prompt.upper()),
                )
                batch = runs_pb2.RecordTurnsRequest(run_id=started.run_id, turns=[turn])
                recorded = await runs.RecordTurns(batch, metadata=agent, timeout=10)
                log(
                    "recorded", ok=recorded.ok, base_index=recorded.base_index, count=recorded.count
                )
            await wait()
            # status_enum alone: the server fills `status` ("success") from it.
            outcome = runs_pb2.RunOutcome(
                status_enum=runs_pb2.RUN_OUTCOME_STATUS_SUCCESS, summary="recorded from Python"
            )
            complete = runs_pb2.CompleteRunRequest(run_id=started.run_id, outcome=outcome)
            await runs.CompleteRun(complete, metadata=agent, timeout=10)
            log("completed", run_id=started.run_id)
        except grpc.aio.AioRpcError as e:
            fail(e)
        # guide:end


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="An agent that records a run.")
    parser.add_argument("--step", action="store_true", help="wait for a line before each step")
    parser.add_argument("intent")
    parser.add_argument("prompts", nargs="*")
    args = parser.parse_args()
    asyncio.run(main(args.step, args.intent, args.prompts))
