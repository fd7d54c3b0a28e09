"""car-runtime's own A2A and A2UI wrappers against our server, in a process of their own
(tests/test_a2ui_route_e2e.py):

    CAR_DAEMON_URL=ws://... CAR_HOME=... python tests/car_runtime_a2a.py ENDPOINT TOKEN

Calls `a2a_send` (SendMessage to the remote agent at ENDPOINT with a bearer routeAuth),
then `a2ui_surfaces`, `a2ui_get`, and the peer registry wrappers, and prints one JSON
object of what each returned (or raised).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from car_runtime import CarRuntime, DaemonRpcError


def outcome(call: Callable[[], str]) -> dict[str, Any]:
    try:
        return {"result": json.loads(call())}
    except DaemonRpcError as e:
        return {"raised": "DaemonRpcError", "code": e.code, "message": e.message}
    except Exception as e:
        return {"raised": type(e).__name__, "message": str(e)}


def main() -> int:
    endpoint, token = sys.argv[1], sys.argv[2]
    rt = CarRuntime()
    send = {
        "endpoint": endpoint,
        "message": {"role": "user", "parts": [{"kind": "text", "text": "a table, please"}]},
        "blocking": True,
        "routeAuth": {"type": "bearer", "token": token},
    }
    seen = {
        "a2a_send": outcome(lambda: rt.a2a_send(json.dumps(send))),
        "a2ui_surfaces": outcome(lambda: rt.a2ui_surfaces("{}")),
        "a2ui_get": outcome(lambda: rt.a2ui_get(json.dumps({"surfaceId": "booking"}))),
        "a2ui_capabilities": outcome(lambda: rt.a2ui_capabilities("{}")),
        "a2a_peers_add": outcome(
            lambda: rt.a2a_peers_add(json.dumps({"url": endpoint + "/", "label": "booking"}))
        ),
        "a2a_peers_list": outcome(lambda: rt.a2a_peers_list("{}")),
        "a2a_peers_remove": outcome(lambda: rt.a2a_peers_remove(json.dumps({"slug": "127-0-0-1"}))),
    }
    print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
