"""car-grpc: a gRPC-bridged session server for AI-agent runtimes.

Public API: `Config` (configuration) and `Core` (run the gRPC core in an asyncio app).
"""

from car_grpc.config import Config
from car_grpc.core.server import Core

__all__ = ["Config", "Core"]
