"""Helpers for end-to-end tests over the WebSocket gateway: a running core + gateway, the
JSON-RPC test client (`Rpc`, `rpc`: tests/ws_client.py), and a raw WebSocket client on a
plain socket for the cases a well-behaved library will not produce (no pongs, no
reading)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

from websockets.utils import apply_mask

from car_grpc.config import Config, CoreConfig
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from tests.bounded import stopped
from tests.ws_client import Rpc, RpcError, rpc

__all__ = [
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RawWebSocket",
    "Rpc",
    "RpcError",
    "daemon_token",
    "rpc",
    "running",
    "running_core",
]


@contextlib.asynccontextmanager
async def running_core(config: CoreConfig) -> AsyncIterator[Core]:
    """A started core, stopped (bounded) at the end."""
    core = Core(config)
    await core.start()
    try:
        yield core
    finally:
        await stopped(core.stop(grace=0), "the core's stop")


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Core, Gateway]]:
    """A core and a gateway in front of it, both on ephemeral loopback ports; the gateway
    holds the core's daemon token, as in `car-grpc serve` (so it multiplexes its
    connections unless config.gateway.ws_multiplex_streams is 0)."""
    async with running_core(config.core) as core:
        assert core.parts is not None
        tokens = core.parts.tokens
        core_token = tokens.daemon if tokens is not None else ""
        gateway = Gateway(config.gateway, core.grpc_address, core_token=core_token)
        try:
            await gateway.start()
            yield core, gateway
        finally:
            await stopped(gateway.stop(), "the gateway's stop")


def daemon_token(core: Core) -> str:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon


# ------------------------------------------------------------------ a raw client

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


class RawWebSocket:
    """The client side of RFC 6455 on asyncio streams, doing only what a test asks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, *, rcvbuf: int | None = None) -> RawWebSocket:
        sock = None
        if rcvbuf is not None:
            import socket

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 2**16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        # websockets' mask: a loop over the bytes in Python took ~5 ms per 64 KiB, in the
        # event loop that the server under test shares.
        masked = apply_mask(payload, mask)
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def send_text(self, message: Any) -> None:
        await self.send(json.dumps(message).encode())

    async def read_frame(self, timeout: float = 5) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def read_until_close(self, timeout: float = 5) -> tuple[int, str, int]:
        """Read (never answering pings) until the close frame: (code, reason, pings seen)."""
        pings = 0
        while True:
            opcode, payload = await self.read_frame(timeout)
            if opcode == OP_PING:
                pings += 1
            elif opcode == OP_CLOSE:
                (code,) = struct.unpack("!H", payload[:2])
                return code, payload[2:].decode(), pings

    def close(self) -> None:
        self.writer.close()
