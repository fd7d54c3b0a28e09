"""Timestamps along a proposal's path, beside a state.get's: where the wall time goes.

An in-process core and bench_proposals' LeanClient; a few of the core's functions are
wrapped to note when each step is reached (the read loop's `_handle`, `proposals.plan`,
`ClientSession.send`, `_write_call_now` and `resolve`, the answer's `_send`), and the client's read
loop notes when it reads the callback, answers it and reads the response. Prints the
median time of each step from the request's start, over N operations. Not part of
`python -m bench`; a diagnostic (the wrapping costs a little at every step).

    python -m bench.proposal_stamps proposal|state_get [N]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from bench import bench_proposals
from car_grpc.core import grpc_service, proposals
from car_grpc.core.session import ClientSession
from car_grpc.v1 import session_pb2, state_pb2, tools_pb2

now = time.perf_counter_ns
#: Step -> when it was first reached in the current operation.
STAMPS: dict[str, int] = {}


def _stamp(step: str) -> None:
    STAMPS.setdefault(step, now())


def _wrap_async(cls: Any, name: str, step_of: Callable[..., str]) -> None:
    original = getattr(cls, name)

    async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        step = step_of(*args)
        _stamp(step)
        result = await original(self, *args, **kwargs)
        _stamp(step + ": done")
        return result

    setattr(cls, name, wrapped)


def _instrument() -> None:
    _wrap_async(
        grpc_service.SessionStream,
        "_handle",
        lambda frame: f"the core's read loop has {frame.WhichOneof('body')}",
    )
    _wrap_async(ClientSession, "send", lambda *_: "tools.execute queued")
    _wrap_async(grpc_service.SessionStream, "_send", lambda *_: "the response's write")
    plan, resolve, write_now = proposals.plan, ClientSession.resolve, ClientSession._write_call_now

    def planned(proposal: Any) -> proposals.Plan:
        _stamp("the handler starts (plan)")
        return plan(proposal)

    def resolved(self: ClientSession, frame: session_pb2.ClientFrame) -> bool:
        _stamp("the core resolves the answer")
        return resolve(self, frame)

    def written(self: ClientSession, data: bytes) -> bool:
        _stamp("tools.execute written at once (or not: queued)")
        return write_now(self, data)

    proposals.plan = planned
    ClientSession.resolve = resolved  # type: ignore[method-assign]
    ClientSession._write_call_now = written  # type: ignore[method-assign]


class StampingClient(bench_proposals.LeanClient):
    async def _read(self) -> None:
        read, waiting = self.call.read, self._waiting
        output = tools_pb2.ExecuteToolResponse(output=struct_pb2.Value(number_value=1))
        while (frame := await read()) is not grpc.aio.EOF:
            if (future := waiting.pop(frame.id, None)) is not None:
                _stamp("the client reads the response")
                future.set_result(frame)
            elif frame.HasField("tools_execute"):
                _stamp("the client reads tools.execute")
                answer = session_pb2.ClientFrame(id=frame.id, tools_execute=output)
                async with self._writing:
                    await self.call.write(answer)
                _stamp("the client's answer written")


async def _run(kind: str, n: int) -> None:
    _instrument()
    async with bench_proposals.lean_session(StampingClient) as client:
        get = state_pb2.GetStateRequest(key="k")
        one = bench_proposals._submit([{"id": "a", "type": "tool_call", "tool": "t"}])
        rows = []
        for _ in range(n):
            STAMPS.clear()
            start = now()
            if kind == "proposal":
                await client.request("proposal_submit", one)
            else:
                await client.request("state_get", get)
            STAMPS["the caller wakes"] = now()
            rows.append({k: (v - start) / 1000 for k, v in STAMPS.items()})
    medians = {k: statistics.median(r[k] for r in rows if k in r) for k in rows[-1]}
    previous = 0.0
    for step, at in sorted(medians.items(), key=lambda item: item[1]):
        print(f"{at:8.0f} us  (+{at - previous:5.0f})  {step}")
        previous = at


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "proposal"
    asyncio.run(_run(kind, int(sys.argv[2]) if len(sys.argv) > 2 else 2000))


if __name__ == "__main__":
    main()
