"""A chat agent on the official `car-runtime` client, run as a subprocess by
tests/test_chats_ws.py (car-runtime is blocking and keeps process-wide handlers).

    CAR_DAEMON_URL=ws://... CAR_AGENT_ID=id CAR_AGENT_TOKEN=token python car_runtime_chat_agent.py

It attaches with those variables, answers every chat by streaming back the agent.chat
params it received (as JSON, in four `token` events) and then `done`, prints
`{"event": "ready"}` once connected, and runs until stdin closes.
"""

from __future__ import annotations

import json
import sys

import car_runtime
from car_runtime import CarRuntime


def main() -> int:
    runtime = CarRuntime()

    def chat(params_json: str) -> None:
        params = json.loads(params_json)
        text = json.dumps(params, sort_keys=True)
        n = len(text)
        for i in range(4):
            runtime.chat_event(params["session_id"], "token", text[i * n // 4 : (i + 1) * n // 4])
        runtime.chat_event(params["session_id"], "done")

    car_runtime.register_chat_handler(chat)
    runtime.connection_epoch()  # connects: session.auth {agent_id, token}, then the handshake
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
