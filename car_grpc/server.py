"""The whole server in one process: the gRPC core and a WebSocket gateway in front of it.

    async with Server(Config(grpc_port=0, ws_port=0)) as server:
        ... server.gateway.url, server.core.grpc_address ...

This is what `car-grpc serve` runs. To scale out the WebSocket side, run the core alone
(`Core`, `car-grpc core`) and any number of `Gateway`s (`car-grpc gateway --core ADDR`).
"""

from __future__ import annotations

from types import TracebackType

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.store.sqlite import SqliteStore


class Server:
    def __init__(self, config: Config, store: SqliteStore | None = None) -> None:
        self.config = config
        self.core = Core(config, store)
        #: Created by start(), once the core's port is known.
        self.gateway: Gateway | None = None

    async def start(self) -> None:
        """Start the core (store, tokens, gRPC port), then the gateway's listeners."""
        await self.core.start()
        gateway = Gateway(self.config, self.core.grpc_address)
        try:
            await gateway.start()
        except BaseException:
            await self.core.stop()
            raise
        self.gateway = gateway

    async def stop(self) -> None:
        """Close WebSocket connections first, then the core (token files removed, store
        closed)."""
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        await self.core.stop()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
