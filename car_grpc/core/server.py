"""Run the core (the grpc.aio server) inside any asyncio application.

    core = Core(Config(state_root=..., grpc_port=0))
    await core.start()          # store opened, tokens minted, port bound
    ... core.grpc_address ...
    await core.stop()           # sessions closed, token files removed, store closed

A `store` may be injected (e.g. a shared test store or another implementation).
"""

from __future__ import annotations

import logging

import grpc

from car_grpc import tls
from car_grpc.config import Config
from car_grpc.core import domains
from car_grpc.core.auth import ServerTokens
from car_grpc.core.grpc_service import add_health_and_reflection, generic_handlers
from car_grpc.core.server_state import ServerState
from car_grpc.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: Largest gRPC message accepted or sent (a 256-turn batch of 256 KiB turns fits).
MAX_MESSAGE_BYTES = 80 * 1024 * 1024
#: Calls (Connect streams included) gRPC holds before the server has picked them up. gRPC's
#: default is 1,000, and beyond it it refuses new calls at random (CANCELLED): under a
#: burst of WebSocket connections the event loop picks streams up more slowly than they
#: come, so one in ten sessions of a 2,000-connection burst ended at once. Each held call
#: is small (its first frames wait in its flow-control window); the gateway also paces
#: the streams it opens (Config.ws_pending_streams).
MAX_PENDING_CALLS = 16384


class Core:
    def __init__(self, config: Config, store: SqliteStore | None = None) -> None:
        self.config = config
        self._store = store
        self._owns_store = store is None
        self.state: ServerState | None = None
        self.grpc_port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.config.grpc_host}:{self.grpc_port}"

    async def start(self) -> None:
        store = self._store or SqliteStore(self.config.store_path)
        tokens = ServerTokens.mint(self.config.token_dir) if self.config.auth else None
        self.state = state = ServerState(self.config, store, tokens)
        await domains.install(state)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ]
        )
        server.add_generic_rpc_handlers(generic_handlers(state))
        add_health_and_reflection(server)
        address = f"{self.config.grpc_host}:{self.config.grpc_port}"
        credentials = tls.grpc_server_credentials(self.config)
        if credentials is None:
            self.grpc_port = server.add_insecure_port(address)
        else:
            self.grpc_port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        log.info("core: gRPC%s listening on %s", " (TLS)" if credentials else "", self.grpc_address)

    async def stop(self, grace: float = 1.0) -> None:
        state, self.state = self.state, None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if state is not None:
            await state.shutdown()
            if state.tokens is not None:
                state.tokens.remove_files()
            if self._owns_store:
                await state.store.close()
