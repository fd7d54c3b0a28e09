"""The official client, `car-runtime` 0.58 from PyPI, against `car-grpc serve`, unmodified:
it finds the auth token on its own through CAR_HOME and talks to the WebSocket gateway.

Each scenario of tests/car_runtime_scenarios.py runs in its own process (car-runtime is
configured only by environment variables and keeps process-wide handlers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PROTOCOL_VERSION_MISMATCH,
)
from tests.processes import ONE_PROCESS, agents_add, cli_env, launch, serve

SCENARIOS = Path(__file__).with_name("car_runtime_scenarios.py")


async def run_scenario(name: str, url: str, home: Path, **extra: str) -> dict[str, Any]:
    env = cli_env(
        home, CAR_DAEMON_URL=url, CAR_NO_VERSION_WARNING="1", CAR_DAEMON_TIMEOUT="20", **extra
    )
    async with launch([sys.executable, str(SCENARIOS), name], env=env, stdout=True) as proc:
        code, out = await proc.output(45)
    assert code == 0, proc.log
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def scenario(tmp_path: Path, name: str, *serve_flags: str) -> dict[str, Any]:
    home = tmp_path / "home"
    async with serve(home, *ONE_PROCESS, *serve_flags) as url:
        return await run_scenario(name, url, home)


async def test_daemon_calls(tmp_path: Path) -> None:
    seen = await scenario(tmp_path, "daemon_calls")
    assert seen["tools.register"] == {"result": 1}
    listed = seen["tools.list"]["result"]
    assert listed["count"] == 2 and [t["name"] for t in listed["tools"]] == ["add", "sub"]
    add = listed["tools"][0]
    assert add["description"] == "adds" and add["parameters"] == {"type": "object"}
    assert [t["name"] for t in seen["list_tools"]["result"]] == ["add", "sub"]
    assert seen["state.get"] == {"result": {"n": 42, "list": [1, None, "x"]}}
    assert seen["state_exists"] == {"result": True}
    assert seen["state_keys"] == {"result": ["answer"]}
    [policy] = seen["policy.list"]["result"]["policies"]
    assert policy["name"] == "no-rm" and policy["target"] == "rm"
    assert seen["unregister_tool"] == {"result": 1}
    assert seen["server.handshake"]["result"]["protocol_version"] == 3


async def test_errors_are_daemon_rpc_errors_with_their_codes(tmp_path: Path) -> None:
    seen = await scenario(tmp_path, "errors")
    assert seen["unknown"] == {
        "raised": "DaemonRpcError",
        "code": METHOD_NOT_FOUND,
        "message": "unknown method: no.such.method",
    }  # no `data` attribute at all when the error has none
    assert seen["codec"] == {
        "raised": "DaemonRpcError",
        "code": INVALID_PARAMS,
        "message": "invalid params: expected a string: name",
        "data": {"field": "name"},
    }
    assert seen["handler"]["code"] == INVALID_PARAMS and "name" in seen["handler"]["message"]
    assert seen["version"]["code"] == PROTOCOL_VERSION_MISMATCH
    assert seen["after"]["result"]["count"] == 0


async def test_without_a_token_the_handshake_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with serve(home, *ONE_PROCESS) as url:
        seen = await run_scenario("no_token", url, tmp_path / "elsewhere")
    first = seen["first"]
    assert first["raised"] == "RuntimeError"
    assert str(AUTH_REQUIRED) in first["message"] and "auth required" in first["message"]


async def test_tool_handler_drives_real_tools_execute_callbacks(tmp_path: Path) -> None:
    seen = await scenario(tmp_path, "proposal")
    ok = seen["ok"]["result"]
    assert ok["proposal_id"] == "p1"
    statuses = {r["action_id"]: r["status"] for r in ok["results"]}
    assert statuses == {"a1": "succeeded", "a2": "failed", "a3": "succeeded"}
    outputs = {r["action_id"]: r.get("output") for r in ok["results"]}
    assert outputs["a1"] == {"sum": 3} and outputs["a3"] == {"sum": 42}
    a2 = next(r for r in ok["results"] if r["action_id"] == "a2")
    assert "kaboom" in a2["error"]
    fatal = seen["fatal"]["result"]["results"][0]
    assert fatal["status"] == "failed" and fatal["terminal"] is True
    assert "disk gone" in fatal["error"]
    # The terminal error halted the session: the next proposal runs no tool.
    assert seen["after_halt"]["result"]["results"][0]["status"] == "skipped"
    # Independent actions run concurrently: the order of the callbacks is free.
    calls = {c["action_id"]: c for c in seen["calls"]}
    assert {a: c["tool"] for a, c in calls.items()} == {
        "a1": "add",
        "a2": "boom",
        "a3": "add",
        "f1": "fatal",
    }
    a1 = calls["a1"]
    assert a1["params"] == {"a": 1, "b": 2} and a1["attempt"] == 1
    assert a1["request_id"].startswith("cb-") and a1["timeout_ms"] == 5000
    assert len({c["request_id"] for c in calls.values()}) == 4


async def test_cancel_handler_receives_tools_cancel(tmp_path: Path) -> None:
    seen = await scenario(tmp_path, "cancel")
    [request_id] = seen["request_ids"]
    assert seen["cancelled"] == [request_id]
    [result] = seen["result"]["result"]["results"]
    assert result["status"] == "failed" and "timed out" in result["error"]
    assert seen["after"]["result"]["count"] == 0  # the late answer did no harm


async def test_runs_start_and_complete_as_an_attached_agent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    token = await agents_add(home, "agent-7")
    async with serve(home, *ONE_PROCESS) as url:
        seen = await run_scenario("runs", url, home, CAR_AGENT_ID="agent-7", CAR_AGENT_TOKEN=token)
    started = seen["start"]["result"]
    assert started["agent_id"] == "agent-7" and started["run_id"]
    assert seen["complete"] == {"result": {"run_id": started["run_id"], "ok": True}}
    # A terminal run is not completed twice. runs_complete is one of car-runtime's native
    # calls: it raises RuntimeError("<code> <message>") rather than DaemonRpcError.
    again = seen["complete_again"]
    assert again["raised"] == "RuntimeError"
    assert again["message"].startswith("-32603 ") and "already ended" in again["message"]
    records = seen["trace"]["result"]["records"]
    assert [r["record"] for r in (records[0], records[-1])] == ["started", "ended"]


async def test_a_plain_daemon_client_starts_and_completes_its_own_run(tmp_path: Path) -> None:
    """car-runtime without an agent identity: runs_start + runs_complete of a one-shot
    script (the session that started a run may complete it)."""
    home = tmp_path / "home"
    async with serve(home, *ONE_PROCESS) as url:
        seen = await run_scenario("runs", url, home)
    started = seen["start"]["result"]
    assert started["agent_id"] == "name:mine" and started["run_id"]
    assert seen["complete"] == {"result": {"run_id": started["run_id"], "ok": True}}
    # Ended, the run is written by nobody; its trace is for the agent and hosts only.
    assert seen["complete_again"]["raised"] == "RuntimeError"
    trace = seen["trace"]["result"]
    assert (trace["run_id"], trace["not_found"], trace["records"]) == (started["run_id"], True, [])


def readme_example() -> tuple[str, list[str]]:
    """The Python block under `<!-- car-runtime-example -->` in README.md, and the output
    the README shows for it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme.split("<!-- car-runtime-example -->", 1)[1]
    code, rest = after.split("```python\n", 1)[1].split("```", 1)
    shown = rest.split("```\n", 1)[1].split("```", 1)[0].splitlines()
    return code, shown[1:]  # shown[0] is the command line


async def test_the_readme_example(tmp_path: Path) -> None:
    code, expected = readme_example()
    script = tmp_path / "example.py"
    script.write_text(code)
    home = tmp_path / "home"
    async with serve(home, *ONE_PROCESS) as url:
        env = cli_env(
            home,
            CAR_DAEMON_URL=url,
            CAR_NO_VERSION_WARNING="1",
            CAR_AGENT_ID="my-agent",
            CAR_AGENT_TOKEN=await agents_add(home, "my-agent"),
        )
        async with launch([sys.executable, str(script)], env=env, stdout=True) as example:
            status, out = await example.output(45)
    assert status == 0, example.log
    assert out.splitlines() == expected
