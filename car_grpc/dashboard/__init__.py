"""The operator dashboard: a web page over the core's typed API (see app.py)."""

from car_grpc.dashboard.app import Dashboard

__all__ = ["Dashboard"]
