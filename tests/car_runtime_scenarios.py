"""Scenarios on the official `car-runtime` client, one per process (tests/test_car_runtime.py).

    CAR_DAEMON_URL=ws://... CAR_HOME=... python tests/car_runtime_scenarios.py NAME

car-runtime is configured only by its environment and keeps process-wide handlers, so
each scenario runs in a fresh process. It prints one JSON object: what it observed (return
values, exceptions with their type, code and data); the test asserts on it.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import car_runtime
from car_runtime import CarRuntime, DaemonRpcError, TerminalToolError

Scenario = Callable[[CarRuntime], dict[str, Any]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """What a call returned or raised, as JSON."""
    try:
        return {"result": call()}
    except DaemonRpcError as e:
        seen: dict[str, Any] = {"raised": "DaemonRpcError", "code": e.code, "message": e.message}
        if hasattr(e, "data"):
            seen["data"] = e.data
        return seen
    except Exception as e:
        return {"raised": type(e).__name__, "message": str(e)}


def call(rt: CarRuntime, method: str, params: Any) -> dict[str, Any]:
    return outcome(lambda: json.loads(rt.daemon_call(method, json.dumps(params))))


@scenario
def daemon_calls(rt: CarRuntime) -> dict[str, Any]:
    rt.register_tool_schema(
        json.dumps({"name": "add", "description": "adds", "parameters": {"type": "object"}})
    )
    rt.state_set("answer", json.dumps({"n": 42, "list": [1, None, "x"]}))
    rt.register_policy("no-rm", "deny_tool", target="rm")
    return {
        "tools.register": call(rt, "tools.register", [{"name": "sub"}]),
        "tools.list": call(rt, "tools.list", {}),
        "list_tools": outcome(lambda: json.loads(rt.list_tools())),
        "state.get": call(rt, "state.get", {"key": "answer"}),
        "state_exists": outcome(lambda: rt.state_exists("answer")),
        "state_keys": outcome(lambda: rt.state_keys()),
        "policy.list": call(rt, "policy.list", {}),
        "unregister_tool": outcome(lambda: rt.unregister_tool("sub")),
        "server.handshake": call(rt, "server.handshake", {"protocol_version": 3}),
    }


@scenario
def errors(rt: CarRuntime) -> dict[str, Any]:
    return {
        "unknown": call(rt, "no.such.method", {}),
        "codec": call(rt, "tools.unregister", {"name": 5}),
        "handler": call(rt, "tools.unregister", {}),
        "version": call(rt, "server.handshake", {"protocol_version": 9}),
        "after": call(rt, "tools.list", {}),  # errors leave the connection usable
    }


@scenario
def no_token(rt: CarRuntime) -> dict[str, Any]:
    # No token under CAR_HOME: car-runtime skips session.auth; the handshake is refused.
    return {"first": call(rt, "tools.list", {})}


@scenario
def first_call(rt: CarRuntime) -> dict[str, Any]:
    # What the first call shows when the server has no room (tests/test_connection_caps.py).
    return {"first": call(rt, "tools.list", {})}


@scenario
def proposal(rt: CarRuntime) -> dict[str, Any]:
    calls: list[dict[str, Any]] = []

    def handler(call_json: str) -> str:
        c = json.loads(call_json)
        calls.append(c)
        if c["tool"] == "fatal":
            raise TerminalToolError("disk gone")
        if c["tool"] == "boom":
            raise ValueError("kaboom")
        return json.dumps({"sum": c["params"]["a"] + c["params"]["b"]})

    car_runtime.register_tool_handler(handler)
    rt.register_tool("add")
    action = {"type": "tool_call", "timeout_ms": 5000}
    ok = {
        "id": "p1",
        "source": "test",
        "actions": [
            {**action, "id": "a1", "tool": "add", "parameters": {"a": 1, "b": 2}},
            {**action, "id": "a2", "tool": "boom", "parameters": {}, "failure_behavior": "skip"},
            {**action, "id": "a3", "tool": "add", "parameters": {"a": 40, "b": 2}},
        ],
    }
    fatal = {"id": "p2", "actions": [{**action, "id": "f1", "tool": "fatal", "parameters": {}}]}
    after_halt = {"id": "p3", "actions": [{**action, "id": "h1", "tool": "add", "parameters": {}}]}
    return {
        "ok": outcome(lambda: json.loads(rt.submit_proposal(json.dumps(ok)))),
        "fatal": outcome(lambda: json.loads(rt.submit_proposal(json.dumps(fatal)))),
        "after_halt": outcome(lambda: json.loads(rt.submit_proposal(json.dumps(after_halt)))),
        "calls": calls,
    }


@scenario
def cancel(rt: CarRuntime) -> dict[str, Any]:
    cancelled: list[str] = []
    arrived = threading.Event()
    seen: list[str] = []

    def on_cancel(request_id: str) -> None:
        cancelled.append(request_id)
        arrived.set()

    finished = threading.Event()

    def slow_tool(call_json: str) -> str:
        try:
            seen.append(json.loads(call_json)["request_id"])
            arrived.wait(10)  # busy until the server gives up on it and says so
            return json.dumps({"late": True})
        finally:
            finished.set()

    car_runtime.register_tool_cancel_handler(on_cancel)
    car_runtime.register_tool_handler(slow_tool)
    slow = {"id": "s1", "type": "tool_call", "tool": "slow", "parameters": {}, "timeout_ms": 300}
    result = outcome(lambda: json.loads(rt.submit_proposal(json.dumps({"actions": [slow]}))))
    # tools.cancel precedes the answer on the wire, often in the same read now that the
    # gateway writes what is ready together; car-runtime runs the handler on a thread of
    # its own, which may not have run yet when submit_proposal returns. The tool's thread
    # is let finish too: a car-runtime thread still in Python when the process exits
    # aborts it.
    arrived.wait(5)
    finished.wait(5)
    return {
        "result": result,
        "cancelled": cancelled,
        "request_ids": seen,
        "after": call(rt, "tools.list", {}),
    }


@scenario
def runs(rt: CarRuntime) -> dict[str, Any]:
    # Attached as an agent (CAR_AGENT_ID + CAR_AGENT_TOKEN): the run is this agent's.
    started = outcome(
        lambda: json.loads(rt.runs_start(json.dumps({"intent": "do it", "agent_name": "Mine"})))
    )
    run_id = started.get("result", {}).get("run_id", "")
    done = {"run_id": run_id, "outcome": {"status": "success", "summary": "ok"}}
    return {
        "start": started,
        "complete": outcome(lambda: json.loads(rt.runs_complete(json.dumps(done)))),
        "complete_again": outcome(lambda: json.loads(rt.runs_complete(json.dumps(done)))),
        "trace": call(rt, "runs.get_trace", {"run_id": run_id}),
    }


def main() -> int:
    result = SCENARIOS[sys.argv[1]](CarRuntime())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
