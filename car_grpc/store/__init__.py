"""Durable state: the store interface and its embedded SQLite implementation."""

from car_grpc.store.sqlite import SqliteStore, Store

__all__ = ["SqliteStore", "Store"]
