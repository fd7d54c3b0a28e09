"""car-grpc: a gRPC-bridged session server for AI-agent runtimes.

Public API: `Config` (configuration), `Core` (run the gRPC core in an asyncio app),
`Gateway` (a WebSocket JSON-RPC front end for a core at some address) and `Server` (the
core and a gateway together, as `car-grpc serve` runs them).
"""

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.serve import Server

__all__ = ["Config", "Core", "Gateway", "Server"]
