"""The gateway's and the core's steps of a proposal's tool output and result, alone (thread
CPU per step, the best of REPEATS runs of N): bench_load's proposal (one tool_call whose
output is {"ok": true, "echo": {"n": 5}}). Runs against whatever tree is first on
sys.path; a tree without `proposal_text` (main before branch prop4) runs the generic steps
only. `python -m bench.proposal_text_steps [N] [REPEATS]`."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable

from car_grpc.gateway import jsonrpc
from car_grpc.v1 import session_pb2, tools_pb2
from car_grpc.wire import codec

HAS_TEXT = importlib.util.find_spec("car_grpc.wire.proposal_text") is not None
OUTPUT = {"ok": True, "echo": {"n": 5}}
ANSWER = '{"jsonrpc":"2.0","id":"cb-1","result":{"ok":true,"echo":{"n":5}}}'


def best(step: Callable[[], object], n: int, repeats: int) -> float:
    """us of thread CPU per call, the best of `repeats`."""
    low = float("inf")
    for _ in range(repeats):
        start = time.thread_time_ns()
        for _ in range(n):
            step()
        low = min(low, (time.thread_time_ns() - start) / n / 1000)
    return low


def result() -> tools_pb2.ProposalResult:
    res = tools_pb2.ProposalResult(proposal_id="0123456789abcdef0123456789abcdef")
    action = res.results.add(action_id="a", status=1, duration_ms=0, timestamp=1764520000000)
    codec.json_to_value(OUTPUT, action.output)
    action.state_changes.SetInParent()
    res.cost.tool_calls = res.cost.actions_executed = res.cost.total_duration_ms = 1
    return res


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    res = result()
    response = tools_pb2.SubmitProposalResponse(result=res)
    if HAS_TEXT:
        from car_grpc.wire import proposal_text

        text = proposal_text.output_text(OUTPUT)
        response.result_text = proposal_text.result_text(res, {"a": OUTPUT}, {})
    data = session_pb2.ServerFrame(id="7", proposal_submit=response).SerializeToString()
    bridge = jsonrpc.Bridge()

    def response_out() -> object:  # the gateway: the core's answer to the client's text
        bridge._pending["7"] = jsonrpc._Pending(5, None)
        return bridge.from_core(session_pb2.ServerFrame.FromString(data))

    def answer_in() -> object:  # the gateway: the client's tools.execute answer to a frame
        bridge._callbacks["cb-1"] = "tools.execute"
        return bridge.from_client(ANSWER)

    answer = bridge.from_client(ANSWER)
    print(f"tree: {jsonrpc.__file__.rsplit('/car_grpc/', 1)[0]}  text path: {HAS_TEXT}")
    print(f"gateway, the response out (parse, text):  {best(response_out, n, repeats):6.2f} us")
    bridge._callbacks["cb-1"] = "tools.execute"
    print(f"gateway, the answer in (parse, frame):    {best(answer_in, n, repeats):6.2f} us")
    frame = session_pb2.ClientFrame(id="cb-1")
    frame.tools_execute.output.CopyFrom(codec.to_value(OUTPUT))
    if HAS_TEXT:
        frame.tools_execute.output_text = text
    wire = frame.SerializeToString()

    def core_output() -> object:  # the core: the answer's output as the executor's JSON
        body = session_pb2.ClientFrame.FromString(wire).tools_execute
        if HAS_TEXT and (given := body.output_text):
            return proposal_text.read_output(given)
        return codec.value_to_json(body.output)

    def core_response() -> object:  # the core: the response's bytes
        out = tools_pb2.SubmitProposalResponse(result=res)
        if HAS_TEXT:
            out.result_text = proposal_text.result_text(res, {"a": OUTPUT}, {"a": (OUTPUT, text)})
        return out.SerializeToString()

    print(f"core, the answer's output to JSON:        {best(core_output, n, repeats):6.2f} us")
    print(f"core, the response to bytes:              {best(core_response, n, repeats):6.2f} us")
    del answer


if __name__ == "__main__":
    main()
