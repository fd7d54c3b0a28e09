"""Submits one proposal with the official `car-runtime` client, run as a subprocess by
tests/test_approvals_ws.py (car-runtime is configured by environment variables and keeps
process-wide handlers).

    CAR_DAEMON_URL=ws://... CAR_AUTH_TOKEN=token python car_runtime_gated.py

The tool handler reports the status of the gate's approval as it stands when the tool
runs, read from the server's ledger with host.approvals on the same connection. Prints
`{"event": "ready"}` once connected, then the proposal's result or error as JSON.
"""

from __future__ import annotations

import json
import sys

import car_runtime
from car_runtime import CarRuntime, DaemonRpcError


def main() -> int:
    runtime = CarRuntime()

    def tool(call_json: str) -> str:
        listed = json.loads(runtime.daemon_call("host.approvals", "{}"))["approvals"]
        gate = [a["status"] for a in listed if a["action"] == "ws.method:proposal.submit"]
        return json.dumps({"params": json.loads(call_json)["params"], "gate": gate})

    car_runtime.register_tool_handler(tool)
    runtime.connection_epoch()  # connects: session.auth, then server.handshake
    print(json.dumps({"event": "ready"}), flush=True)
    proposal = {
        "id": "p1",
        "actions": [{"id": "a1", "type": "tool_call", "tool": "add", "parameters": {"a": 1}}],
    }
    try:
        result = json.loads(runtime.submit_proposal(json.dumps(proposal)))
    except DaemonRpcError as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message}}), flush=True)
    except RuntimeError as e:  # how car-runtime 0.58 reports a failed proposal.submit
        print(json.dumps({"raised": "RuntimeError", "message": str(e)}), flush=True)
    else:
        print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
