"""The WebSocket JSON-RPC front end of a core, embeddable in any asyncio application.

    gateway = Gateway(GatewayConfig(ws_port=0), core_address="127.0.0.1:9102")
    await gateway.start()       # TCP (and Unix socket) listeners bound
    ... gateway.url ...
    await gateway.stop()        # connections closed (1001), channel closed, socket removed

The gateway keeps nothing but its connections: each WebSocket connection gets its own
SessionService.ConnectBatched stream on one shared channel, or, when the gateway holds the
core's daemon token (`core_token`: `car-grpc serve` passes it), is one session of a few
shared ConnectMultiplexed streams (multiplex.py); so any number of gateways can serve one
core.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import grpc
from websockets.asyncio.server import Server, serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from car_grpc import tls
from car_grpc.config import GatewayConfig
from car_grpc.connection_caps import RETRY_AFTER, PeerCounts, peer_of
from car_grpc.gateway.connection import ConnectCallable, Connection, TrackedConnection
from car_grpc.gateway.decoder import DecoderPool
from car_grpc.gateway.multiplex import Multiplexer
from car_grpc.v1 import session_pb2
from car_grpc.wire import batch
from car_grpc.wire.limits import MESSAGE_SIZE_OPTIONS

log = logging.getLogger(__name__)

#: Connections the kernel queues for the listener before the gateway accepts them (it caps
#: this at net.core.somaxconn). asyncio's default, 100, overflows under a burst: the
#: connections past it are half-open and retried with backoff, and some time out unserved.
LISTEN_BACKLOG = 4096


def listen(host: str, port: int) -> list[socket.socket]:
    """The gateway's TCP listeners: one socket per address `host` stands for, as asyncio's
    create_server binds them ("": every interface, IPv4 and IPv6; a name: each address it
    resolves to), all on one port (`port` 0: the one the first picks). OSError when the
    port is taken. Gateway processes share these sockets (process.py)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in infos))
    for attempt in range(_PORT_ATTEMPTS):
        sockets: list[socket.socket] = []
        try:
            for family, address in addresses:
                if sockets and port == 0:  # the port the first one picked, for every address
                    address = (address[0], sockets[0].getsockname()[1], *address[2:])
                if (sock := _bind(family, address)) is not None:
                    sockets.append(sock)
        except OSError as e:
            for sock in sockets:
                sock.close()
            # With port 0, the first address's pick may be taken on another: pick again.
            repick = port == 0 and sockets and e.errno == errno.EADDRINUSE
            if not repick or attempt == _PORT_ATTEMPTS - 1:
                raise
            continue
        if not sockets:
            raise OSError(f"no address of {host!r} can be listened on")
        return sockets
    raise AssertionError("unreachable")


#: Picks of a free port for every address of a host before listen() gives up.
_PORT_ATTEMPTS = 8


def _bind(family: int, address: tuple[Any, ...]) -> socket.socket | None:
    """A socket listening on `address`; None when this system has no such family (an
    IPv6 address where IPv6 is off), which asyncio skips as well."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
        if family == socket.AF_INET6:  # "::" takes IPv6 alone: IPv4 has its own socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as e:  # said as asyncio says it: with the address
            reason = (e.strerror or str(e)).lower()
            raise OSError(
                e.errno, f"error while attempting to bind on address {address!r}: {reason}"
            ) from None
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class CoreCheckFailed(OSError):
    """The gateway cannot serve through the core: it refuses the gateway's token, or is
    unavailable (the message says which)."""


_CONNECT = f"/{session_pb2.DESCRIPTOR.services_by_name['SessionService'].full_name}/ConnectBatched"


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        core_address: str,
        *,
        listeners: Sequence[socket.socket] = (),
        announce: bool = True,
        core_token: str | Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self.core_address = core_address
        #: The core's daemon token ("" when the core runs with auth off), or what reads it
        #: (each time a multiplexed stream is opened: a core that restarted has a new one):
        #: with it the gateway may carry its connections over ConnectMultiplexed streams
        #: (None: a ConnectBatched stream per connection).
        self._core_token = core_token
        self._multiplexer: Multiplexer | None = None
        self._mux_channel: grpc.aio.Channel | None = None
        #: Listening TCP sockets to serve instead of binding ws_host:ws_port (`listen`'s,
        #: which several gateway processes share).
        self._listeners = listeners
        #: Log the listening lines (one of several gateways on a port does).
        self._announce = announce
        #: The bound TCP port (useful with ws_port=0), known after start().
        self.ws_port = 0
        self._channel: grpc.aio.Channel | None = None
        self._connect: ConnectCallable | None = None
        self._servers: list[Server] = []
        self._unix_socket: Path | None = None
        self._connections: set[Connection] = set()
        #: The TCP (and Unix socket) connections admitted and not yet lost, in all and per
        #: peer, against ws_max_connections[_per_peer] (`_admit`).
        self._counts = PeerCounts()
        self._refusing = False  # said in the log since the last admission
        #: The connections accepted whose handshake has not come yet (websockets gives one
        #: open_timeout, 10 s), against the same caps (`_accepted`).
        self._handshakes = PeerCounts()
        self._closing = False  # said in the log since a handshake was last let in
        #: A slot per Connect stream the core has not taken in yet (see Connection._open).
        self._opening = asyncio.Semaphore(config.ws_pending_streams)
        #: Worker processes for large frames, started when first needed.
        self.decoder = DecoderPool(config.ws_decode_workers)
        self._stopping = False
        #: TLS of the TCP listener (None: plaintext); the Unix socket is always plain.
        self._ssl: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl is not None else "ws"
        return f"{scheme}://{self.config.ws_host}:{self.ws_port}/"

    @property
    def connections(self) -> frozenset[Connection]:
        """The WebSocket connections open right now."""
        return frozenset(self._connections)

    @property
    def unix_socket(self) -> Path | None:
        """The Unix socket being served, if any."""
        return self._unix_socket

    async def start(self) -> None:
        """Open the channel to the core and bind the listeners (all or none)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        self._ssl = tls.ws_ssl_context(config.ws_tls_cert, config.ws_tls_key)
        self._channel = tls.core_channel(
            self.core_address,
            config.core_ca,
            options=[
                *MESSAGE_SIZE_OPTIONS,
                # Fixed stream windows: what a stalled client's stream may hold stays
                # small (BDP probing would grow it to megabytes per connection).
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        self._connect = self._channel.stream_stream(
            _CONNECT,
            request_serializer=batch.serialize,
            response_deserializer=session_pb2.ConnectBatchedResponse.FromString,
        )
        if (core_token := self._core_token) is not None and config.ws_multiplex_streams > 0:

            def metadata() -> tuple[tuple[str, str], ...]:
                token = core_token() if callable(core_token) else core_token
                return (("authorization", f"Bearer {token}"),) if token else ()

            # A channel of their own: the shared streams keep gRPC's window probing (their
            # sessions' credits, not the stream window, bound what a slow client holds).
            self._mux_channel = tls.core_channel(
                self.core_address, config.core_ca, options=[*MESSAGE_SIZE_OPTIONS]
            )
            self._connect = self._multiplexer = Multiplexer(
                self._mux_channel, config.ws_multiplex_streams, metadata
            )
            await self._check_core_token()
        unserved = list(self._listeners) or listen(config.ws_host, config.ws_port)
        self.ws_port = unserved[0].getsockname()[1]
        try:
            while unserved:  # each served is closed by its server
                self._servers.append(await self._serve(sock=unserved[0], ssl=self._ssl))
                del unserved[0]
        finally:
            if not self._listeners:  # bound here: close what was not served
                for sock in unserved:
                    sock.close()
        if self._announce:
            log.info("gateway: WebSocket listening on %s (core %s)", self.url, self.core_address)
        if config.unix_socket is not None:
            path = config.unix_socket
            _prepare_unix_socket(path)
            unix = await self._serve(unix=True, path=str(path))
            os.chmod(path, 0o600)
            self._servers.append(unix)
            self._unix_socket = path
            if self._announce:
                log.info("gateway: WebSocket listening on unix:%s", path)

    async def _check_core_token(self) -> None:
        """Fail the start, saying why, unless the core takes in a multiplexed stream with
        the gateway's token: a wrong token would fail every connection instead."""
        assert self._multiplexer is not None
        timeout = self.config.core_check_timeout
        where = f"the core at {self.core_address}"
        try:
            async with asyncio.timeout(timeout):
                await self._multiplexer.check()
        except TimeoutError:
            raise CoreCheckFailed(
                f"{where} did not take the gateway's multiplexed stream in within {timeout:g} s"
            ) from None
        except grpc.aio.AioRpcError as e:
            raise CoreCheckFailed(
                f"cannot serve through {where}: {e.code().name}: {e.details()}; a gateway"
                " multiplexes with the core's daemon token"
            ) from None

    async def _serve(self, **where: Any) -> Server:
        config = self.config
        return await serve(
            # Typed for ServerConnection; create_connection makes it a TrackedConnection.
            self._handle,  # type: ignore[arg-type]
            create_connection=self._connection,  # type: ignore[arg-type]  # called as a class
            process_request=self._admit,  # type: ignore[arg-type]  # as the handler
            ping_interval=None,  # our keepalive counts any traffic, not just pongs
            # Raised to ws_max_message_bytes once the session is authenticated.
            max_size=min(config.ws_max_message_bytes, config.ws_max_message_bytes_before_auth),
            write_limit=config.ws_write_limit,
            close_timeout=config.ws_close_timeout,
            backlog=LISTEN_BACKLOG,
            **where,
        )

    def _connection(self, *args: Any, **kwargs: Any) -> TrackedConnection:
        ws = TrackedConnection(*args, **kwargs)
        ws.on_accepted = self._accepted
        return ws

    def _accepted(self, ws: TrackedConnection) -> bool:
        """A TCP connection just accepted: counted as a handshake under way until its
        request comes (`_admit`) or it is lost, within the same caps as the connections;
        past them False (closed at once, unanswered: it has asked nothing yet). So what
        a flood of connections that never send a request holds is bounded by the caps,
        not by the rate it opens them at times websockets' open_timeout."""
        counts, peer = self._handshakes, peer_of(ws.remote_address)
        refused = self._over_caps(counts, peer, "handshakes under way")
        if refused:
            if not self._closing:  # once until one is let in again
                self._closing = True
                log.warning("gateway: closing new connections: %s", refused)
            return False
        self._closing = False
        counts.add(peer)
        ws.on_lost = lambda: counts.remove(peer)
        return True

    def _over_caps(self, counts: PeerCounts, peer: str, what: str) -> str:
        """Why one more of `counts` from `peer` is past ws_max_connections[_per_peer]
        ("" when it is not)."""
        config = self.config
        if counts.total >= config.ws_max_connections:
            return (
                f"too many {what}: the gateway holds at most"
                f" {config.ws_max_connections} (ws_max_connections)"
            )
        if counts.of(peer) >= config.ws_max_connections_per_peer:
            return (
                f"too many {what} from {peer or 'the Unix socket'}: at most"
                f" {config.ws_max_connections_per_peer} (ws_max_connections_per_peer)"
            )
        return ""

    def _admit(self, ws: TrackedConnection, _request: Request) -> Response | None:
        """websockets' process_request: admit a connection within the caps (counted
        until its TCP connection is lost, however it ends), or refuse its handshake with
        503 and Retry-After, naming the cap, before any stream to the core is opened."""
        if ws.connection_lost_waiter.done():
            return None  # gone already: its handshake fails, nothing to count
        ws.release()  # its handshake has come
        counts = self._counts
        peer = peer_of(ws.remote_address)
        refused = self._over_caps(counts, peer, "connections")
        if not refused:
            counts.add(peer)
            ws.on_lost = lambda: counts.remove(peer)
            self._refusing = False
            return None
        if not self._refusing:  # once until one is admitted again: a flood floods no log
            self._refusing = True
            log.warning("gateway: refusing connections (503): %s", refused)
        response = ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, refused + "\n")
        response.headers["Retry-After"] = str(RETRY_AFTER)
        return response

    async def _handle(self, ws: TrackedConnection) -> None:
        assert self._connect is not None
        if self._stopping:  # opened while stop() was closing the others
            await ws.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        connection = Connection(ws, self._connect, self.config, self._opening, self.decoder)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    async def stop(self) -> None:
        """Stop accepting, close every connection (1001) and the channel to the core."""
        self._stopping = True
        for server in self._servers:
            server.close(close_connections=False)
        for connection in list(self._connections):
            connection.end(CloseCode.GOING_AWAY, "server shutting down")
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._multiplexer is not None:
            await self._multiplexer.close()
            self._multiplexer = None
        if self._mux_channel is not None:
            await self._mux_channel.close()
            self._mux_channel = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        await self.decoder.stop()
        if self._unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_socket.unlink()
            self._unix_socket = None


def _prepare_unix_socket(path: Path) -> None:
    """Make the socket's directory (0700) and clear a stale socket left by a crash."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another server is already listening there")
