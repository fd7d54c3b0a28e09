"""The WebSocket JSON-RPC gateway: the CAR session protocol in front of the gRPC core."""
