"""The whole server: the gRPC core and a WebSocket gateway in front of it.

    config = Config().with_overrides(grpc_port=0, ws_port=0)
    async with Server(config) as server:
        ... server.gateway.url (server.ws_port), server.core.grpc_address,
        server.dashboard.login_url ...

This is what `car-grpc serve` runs. The gateway runs in the core's process
(`server.gateway`: GatewayConfig's default, 0), or with `gateway_processes` N > 0 in N
processes of its own that share the WebSocket port (gateway/process.py; `server.gateway`
is then None): each still reaches the core over gRPC, as any gateway does. "auto", which
`car-grpc serve` runs unless told (config.py SERVE_GATEWAY_PROCESSES), is 1 where the
server may run on 2 CPUs or more, else 0 (`serve_gateway_processes`). To scale out further, run
the core alone (`Core`, `car-grpc core`) and any number of `Gateway`s (`car-grpc gateway
--core ADDR`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import replace
from types import TracebackType

from car_grpc.config import Config, serve_gateway_processes
from car_grpc.core.server import Core
from car_grpc.dashboard import Dashboard
from car_grpc.gateway import Gateway
from car_grpc.gateway.process import GatewayProcess
from car_grpc.gateway.server import listen
from car_grpc.store import Store

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config = config.for_serve()
        self.core = Core(config.core, store)
        #: Gateway processes to run beside the core's ("auto" decided here, once), and how
        #: that was decided, for the log.
        self.gateway_process_count, self._counted = serve_gateway_processes(
            config.gateway.gateway_processes
        )
        #: Created by start(), once the core's port is known (in this process).
        self.gateway: Gateway | None = None
        #: Or, with gateway_processes > 0, the gateway processes (the first announces)
        #: and the listening sockets they share (one per address of the host).
        self.gateway_processes: list[GatewayProcess] = []
        self._listeners: list[socket.socket] = []
        #: Created by start() unless the dashboard is off: a host client of the core.
        self.dashboard: Dashboard | None = None

    @property
    def ws_port(self) -> int:
        """The WebSocket port (the one picked with ws_port=0), its gateway's or the one its
        gateway processes share; 0 before start()."""
        if self.gateway is not None:
            return self.gateway.ws_port
        return self._listeners[0].getsockname()[1] if self._listeners else 0

    async def start(self) -> None:
        """Start the core (store, tokens, gRPC port), then the gateway's listeners and
        the dashboard's."""
        await self.core.start()
        log.info("serve: gateway processes: %d (%s)", self.gateway_process_count, self._counted)
        if self.gateway_process_count > 0:
            try:
                await self._start_gateway_processes()
            except BaseException:
                await self.stop()
                raise
        else:
            gateway = Gateway(
                self.config.gateway, self.core.grpc_address, core_token=self._core_token()
            )
            try:
                await gateway.start()
            except BaseException:
                await self.core.stop()
                raise
            self.gateway = gateway
        if self.config.dashboard.dashboard:
            assert self.core.parts is not None
            tokens = self.core.parts.tokens
            dashboard = Dashboard(
                self.config.dashboard, self.core.grpc_address, tokens.host if tokens else None
            )
            try:
                await dashboard.start()
            except BaseException:
                await self.stop()
                raise
            self.dashboard = dashboard

    def _core_token(self) -> str:
        """What the gateway shows the core to multiplex its sessions (ConnectMultiplexed
        admits the daemon token; "" when the core runs with auth off)."""
        assert self.core.parts is not None
        tokens = self.core.parts.tokens
        return tokens.daemon if tokens is not None else ""

    async def _start_gateway_processes(self) -> None:
        """Bind the WebSocket port here, then start the gateway processes on it one after
        another (the first also serves the Unix socket)."""
        config = self.config.gateway
        listeners = self._listeners = listen(config.ws_host, config.ws_port)
        for i in range(self.gateway_process_count):
            if i > 0:
                config = replace(config, unix_socket=None)
            process = GatewayProcess(
                config,
                self.core.grpc_address,
                listeners,
                announce=i == 0,
                core_token=self._core_token(),
            )
            self.gateway_processes.append(process)
            await process.start()

    async def stop(self) -> None:
        """Close the dashboard and the WebSocket connections first, then the core (token
        files removed, store closed)."""
        if self.dashboard is not None:
            await self.dashboard.stop()
            self.dashboard = None
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        processes, self.gateway_processes = self.gateway_processes, []
        await asyncio.gather(*(p.stop() for p in processes))
        for listener in self._listeners:
            listener.close()
        self._listeners = []
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
