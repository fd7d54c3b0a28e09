"""car-grpc: a gRPC-bridged session server for AI-agent runtimes.

Public API: `Config` (configuration), `Core` (run the gRPC core in an asyncio app),
`Gateway` (a WebSocket JSON-RPC front end for a core at some address) and `Server` (the
core and a gateway together, as `car-grpc serve` runs them).

The names are imported on first use, so that importing one part (say the gateway's
sans-I/O `car_grpc.gateway.jsonrpc`) does not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from car_grpc.config import Config
    from car_grpc.core.server import Core
    from car_grpc.gateway import Gateway
    from car_grpc.serve import Server

__all__ = ["Config", "Core", "Gateway", "Server"]

_HOMES = {
    "Config": "car_grpc.config",
    "Core": "car_grpc.core.server",
    "Gateway": "car_grpc.gateway",
    "Server": "car_grpc.serve",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'car_grpc' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
