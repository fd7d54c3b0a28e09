"""An agent on the official `car-runtime` client, run as a subprocess by the polyglot tests.

    CAR_DAEMON_URL=ws://... CAR_AGENT_ID=id CAR_AGENT_TOKEN=token python car_runtime_agent.py REPLY

It attaches (car-runtime sends `session.auth {agent_id, token}` from those variables),
answers every chat with REPLY word by word as `token` events and then `done`, prints
`{"event": "ready"}` once connected, and runs until stdin closes.
"""

from __future__ import annotations

import json
import re
import sys

import car_runtime
from car_runtime import CarRuntime


def main() -> int:
    reply = sys.argv[1]
    runtime = CarRuntime()

    def chat(params_json: str) -> None:
        session_id = json.loads(params_json)["session_id"]
        for word in re.findall(r"\S+\s*", reply):
            runtime.chat_event(session_id, "token", word)
        runtime.chat_event(session_id, "done")

    car_runtime.register_chat_handler(chat)
    runtime.connection_epoch()  # connects: session.auth, then server.handshake
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
