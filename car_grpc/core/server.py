"""Run the core (the grpc.aio server) inside any asyncio application.

    core = Core(CoreConfig(state_root=..., grpc_port=0))
    await core.start()          # store opened, tokens minted, port bound
    ... core.grpc_address ...
    await core.stop()           # sessions closed, token files removed, store closed

A `store` may be injected (e.g. a shared test store or another implementation).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from car_grpc import tls
from car_grpc.a2a.server import SERVICE as A2A_SERVICE
from car_grpc.a2a.server import A2aListener, Endpoints, ListenerLimits
from car_grpc.config import CoreConfig
from car_grpc.core.cluster import default_core_id
from car_grpc.core.grpc_service import add_health_and_reflection
from car_grpc.core.registry import StreamCap
from car_grpc.core.tokens import ServerTokens, mint_token, write_secret
from car_grpc.core.wiring import CoreParts, wire
from car_grpc.store import Store, open_store, store_location
from car_grpc.wire.limits import MESSAGE_SIZE_OPTIONS

log = logging.getLogger(__name__)

#: Calls (Connect streams included) gRPC holds before the server has picked them up. gRPC's
#: default is 1,000, and beyond it it refuses new calls at random (CANCELLED): under a
#: burst of WebSocket connections the event loop picks streams up more slowly than they
#: come, so one in ten sessions of a 2,000-connection burst ended at once. Each held call
#: is small (its first frames wait in its flow-control window); the gateway also paces
#: the streams it opens (GatewayConfig.ws_pending_streams).
MAX_PENDING_CALLS = 16384


class Core:
    def __init__(self, config: CoreConfig, store: Store | None = None) -> None:
        self.config = config
        self._store = store
        self._owns_store = store is None
        #: The wired domains while the core runs.
        self.parts: CoreParts | None = None
        self.grpc_port = 0
        #: Its id in a cluster (known once the port is bound).
        self.core_id = ""
        self._server: grpc.aio.Server | None = None
        #: The A2A HTTP listener while the core runs (None when A2A is off).
        self.a2a: A2aListener | None = None
        #: The asyncio grpc.health.v1 servicer (untyped: grpc_health has no stubs).
        self._health: Any = None
        #: Health.Watch and reflection streams held: open to anyone, capped for the core.
        self.health_watches = StreamCap(
            config.max_health_watches, "health watches", "max_health_watches"
        )
        self.reflection_streams = StreamCap(
            config.max_reflection_streams, "reflection streams", "max_reflection_streams"
        )

    @property
    def grpc_address(self) -> str:
        return f"{self.config.grpc_host}:{self.grpc_port}"

    async def start(self) -> None:
        # The port is bound first: a core's default id and the address its cluster peers
        # dial are its listener's.
        server = grpc.aio.server(
            options=[
                *MESSAGE_SIZE_OPTIONS,
                ("grpc.so_reuseport", 0),
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ]
        )
        address = f"{self.config.grpc_host}:{self.config.grpc_port}"
        credentials = tls.grpc_server_credentials(
            self.config.grpc_tls_cert, self.config.grpc_tls_key
        )
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError as e:  # grpc's "Failed to bind": as an OSError, the CLI's one line
            raise OSError(
                f"core: cannot listen for gRPC on {address} (a port in use? --grpc-port 0 "
                f"picks a free one): {e}"
            ) from None
        self.core_id = self.config.core_id or default_core_id(self.config.state_root)
        store = self._store or await self._open_store()
        tokens = ServerTokens.mint(self.config.token_dir, write=False) if self.config.auth else None
        try:
            # Wiring reads and repairs the store (runs left open end `incomplete`) and,
            # on a shared store, joins the cluster.
            self.parts = parts = await wire(
                self.config,
                store,
                tokens,
                advertise=self.config.advertise or self.grpc_address,
                cluster_secret=cluster_secret(self.config) if store.cluster else "",
            )
        except BaseException:
            if tokens is not None:
                tokens.remove_files()
            if self._owns_store:
                await store.close()
            await server.stop(0)
            raise
        server.add_generic_rpc_handlers(parts.grpc.handlers())
        extra = []
        if parts.a2a is not None:
            server.add_generic_rpc_handlers([parts.a2a.grpc_handler()])
            extra.append(A2A_SERVICE)
        if parts.peer_service is not None:  # core to core, secret-checked, not in reflection
            server.add_generic_rpc_handlers((parts.peer_service.handler(),))
        self._health = await add_health_and_reflection(
            server, extra, watches=self.health_watches, reflection_streams=self.reflection_streams
        )
        if tokens is not None:
            tokens.write_files()
        await server.start()
        self._server = server
        log.info("core: gRPC%s listening on %s", " (TLS)" if credentials else "", self.grpc_address)
        if parts.a2a is not None:
            try:
                await self._start_a2a(parts.a2a.http_app())
            except BaseException:
                await self.stop(grace=0)
                raise
            parts.a2a.endpoints = Endpoints(self.a2a_url, self.grpc_address)

    @property
    def a2a_url(self) -> str:
        """The A2A HTTP listener's base URL (an agent's endpoint is `<url>/a2a/<agent_id>`)."""
        return self.a2a.url if self.a2a is not None else ""

    async def _start_a2a(self, app: Any) -> None:
        config = self.config
        context = tls.a2a_ssl_context(config.a2a_tls_cert, config.a2a_tls_key)
        limits = ListenerLimits(
            body_timeout=config.a2a_body_timeout,
            max_connections_per_peer=config.a2a_max_connections_per_peer,
        )
        listener = A2aListener(app, config.a2a_host, config.a2a_listen_port, context, limits)
        await listener.start()
        self.a2a = listener
        # Not "listening on": tests/processes.py reads the listeners of `serve` by position.
        log.info(
            "core: A2A%s agents at %s/a2a/<agent_id>", " (TLS)" if context else "", listener.url
        )

    async def _open_store(self) -> Store:
        """The store the config names (`store`, default the embedded file under
        `state_root`); StoreUnavailable when it cannot be reached, StoreUrlError for a
        URL that names no store."""
        config = self.config
        where = store_location(config.store, config.state_root)
        store = await open_store(
            config.state_root,
            config.store,
            pool_size=config.store_pool_size,
            timeout=config.store_timeout,
            core_id=self.core_id,
        )
        if config.store:  # one named by --store / CAR_STORE (str() shows no password)
            log.info("core: store %s", where)
        return store

    async def stop(self, grace: float = 1.0) -> None:
        parts, self.parts = self.parts, None
        if self.a2a is not None:
            if parts is not None and parts.a2a is not None:
                await parts.a2a.close()  # its tasks end, so its streams end
            await self.a2a.stop()
            self.a2a = None
        if self._health is not None:
            # Health.Watch streams see NOT_SERVING; the stop below ends them.
            await self._health.enter_graceful_shutdown()
            self._health = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if parts is not None:
            await parts.shutdown()
            if parts.tokens is not None:
                parts.tokens.remove_files()
            if self._owns_store:
                await parts.store.close()


#: The cluster secret's file beside the token files (when no secret is configured).
CLUSTER_SECRET_FILE = "cluster-secret"


def cluster_secret(config: CoreConfig) -> str:
    """The configured secret, else the one in the token directory (created if missing)."""
    if config.cluster_secret:
        return config.cluster_secret
    path = config.token_dir / CLUSTER_SECRET_FILE
    try:
        if secret := path.read_text().strip():
            return secret
    except FileNotFoundError:
        pass
    write_secret(path, mint_token())
    return path.read_text().strip()
