"""The WebSocket JSON-RPC gateway: the CAR session protocol in front of the gRPC core."""

from car_grpc.gateway.server import Gateway

__all__ = ["Gateway"]
