"""The core's own Python for a proposal with one tool callback, no gRPC: `Dispatcher.execute`
of bench_proposals' proposal (one tool_call, answered on the event loop's next turn) and
its answer's bytes (`answer_bytes`), beside a state.get's; the best of REPEATS batches of
N, thread CPU per operation. Runs against whatever tree is first on sys.path (an in-process
core, auth off). A diagnostic, not part of `python -m bench`.

    python -m bench.proposal_core_steps [N] [REPEATS]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.core.session import ClientSession, answer_bytes
from car_grpc.v1 import session_pb2, state_pb2, tools_pb2
from car_grpc.wire import codec


async def _best(step: Callable[[], Awaitable[object]], n: int, repeats: int) -> float:
    low = float("inf")
    for _ in range(repeats):
        start = time.thread_time_ns()
        for _ in range(n):
            await step()
        low = min(low, (time.thread_time_ns() - start) / n / 1000)
    return low


async def main(n: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        config = Config().with_overrides(
            state_root=Path(root) / "home",
            token_dir=Path(root) / "home" / "tokens",
            grpc_port=0,
            ws_port=0,
            a2a_port=0,
            unix_socket=None,
            gateway_processes=0,
            auth=False,
        )
        core = Core(config.core)
        await core.start()
        try:
            parts = core.parts
            assert parts is not None
            dispatcher = parts.grpc.dispatcher
            session: ClientSession = parts.registry.open(streaming=True)
            session.protocol_version = 3
            loop = asyncio.get_running_loop()

            def write_now(data: bytes) -> bool:
                frame = session_pb2.ServerFrame.FromString(data)
                answer = session_pb2.ClientFrame(id=frame.id)
                answer.tools_execute.output.number_value = 1
                loop.call_soon(session.resolve, answer)
                return True

            session.write_now = write_now
            req = tools_pb2.SubmitProposalRequest()
            codec.json_to_message(
                {"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}}, req
            )
            get = state_pb2.GetStateRequest(key="k")

            async def proposal() -> object:
                out = await dispatcher.execute(session, "proposal_submit", req)
                return answer_bytes("7", "proposal_submit", out, twins=True)  # type: ignore[arg-type]

            async def state_get() -> object:
                out = await dispatcher.execute(session, "state_get", get)
                return answer_bytes("7", "state_get", out, twins=True)  # type: ignore[arg-type]

            print(f"tree: {codec.__file__.rsplit('/car_grpc/', 1)[0]}")
            for _ in range(2):
                for name, step in (("proposal", proposal), ("state.get", state_get)):
                    cost = await _best(step, n, repeats)
                    print(f"{name:9} (execute + answer_bytes): {cost:7.2f} us")
        finally:
            await core.stop()


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 300,
            int(sys.argv[2]) if len(sys.argv) > 2 else 30,
        )
    )
