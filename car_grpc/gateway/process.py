"""A gateway in a process of its own, beside the core: how `car-grpc serve` uses a second
CPU core (the GIL keeps one Python process on one).

The parent binds the WebSocket port once (server.py `listen`: a socket per address of the
host, as the gateway of the core's process listens); each `GatewayProcess` starts
`python -m car_grpc.gateway.process` with those listening sockets, writes the gateway's
config (pickled) on its stdin and keeps that pipe open. The child says on stdout when it
serves, and logs to the same stderr as its parent (one log). It stops, closing its
connections as a gateway does, when the pipe closes (the parent stopped it, or died: no
gateway outlives its core) or on SIGTERM/SIGINT.

Several gateway processes accept on the same sockets, and whichever is free takes the next
connection. The sockets are shared rather than bound by each with SO_REUSEPORT, which
would let a second server started by mistake on the same port take half of the
connections without a word: here it fails with "address already in use", as it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from car_grpc.config import GatewayConfig
from car_grpc.gateway.server import Gateway
from car_grpc.heap import freeze_startup_heap, keep_large_buffers

log = logging.getLogger(__name__)

#: How long a gateway process may take to start listening.
START_TIMEOUT = 30.0
#: How long it may take to stop beyond closing its connections (ws_close_timeout).
STOP_GRACE = 5.0
_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class _Orders:
    """What the parent tells a gateway process."""

    config: GatewayConfig
    core_address: str
    #: The listening sockets' descriptors in the child (one per address).
    listener_fds: tuple[int, ...]
    #: Log its listening lines (the first process does; the others share its port).
    announce: bool
    #: The core's daemon token, for ConnectMultiplexed (Gateway's core_token; it travels
    #: in the pipe, never on a command line).
    core_token: str | None = None


class GatewayProcess:
    """One gateway process on a shared listener, started and stopped by its parent."""

    def __init__(
        self,
        config: GatewayConfig,
        core_address: str,
        listeners: Sequence[socket.socket],
        *,
        announce: bool,
        core_token: str | None = None,
    ) -> None:
        self._orders = _Orders(
            config, core_address, tuple(s.fileno() for s in listeners), announce, core_token
        )
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        """Start it and wait until it listens; OSError when it could not (its reason is
        in the log)."""
        proc = self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "car_grpc.gateway.process",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            pass_fds=self._orders.listener_fds,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        orders = self._orders  # as a tuple: the child runs this module as __main__
        blob = pickle.dumps(
            (
                orders.config,
                orders.core_address,
                orders.listener_fds,
                orders.announce,
                orders.core_token,
            )
        )
        proc.stdin.write(_LENGTH.pack(len(blob)) + blob)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await proc.stdin.drain()
                line = await proc.stdout.readline()
        except (TimeoutError, ConnectionError):
            line = b""
        if line.strip() != b"serving":
            await self.stop()
            raise OSError("a gateway process did not start (see the log above)")

    async def stop(self) -> None:
        """Close its pipe, so that it stops as a gateway stops; kill it if it takes longer
        than its close timeout and a grace."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(self._orders.config.ws_close_timeout + STOP_GRACE):
                await proc.wait()
        except TimeoutError:
            log.error("gateway process %d did not stop in time: killed", proc.pid)
            proc.kill()
            await proc.wait()


async def _serve(orders: _Orders) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The parent's pipe: end of file when the parent closes it or dies.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gateway = Gateway(
        orders.config,
        orders.core_address,
        listeners=[socket.socket(fileno=fd) for fd in orders.listener_fds],
        announce=orders.announce,
        core_token=orders.core_token,
    )
    await gateway.start()
    freeze_startup_heap()
    keep_large_buffers()
    try:
        sys.stdout.write("serving\n")
        sys.stdout.flush()
        parent_gone = asyncio.ensure_future(reader.read())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((parent_gone, stopped), return_when=asyncio.FIRST_COMPLETED)
        parent_gone.cancel()
        stopped.cancel()
    finally:
        await gateway.stop()


def main() -> int:
    from car_grpc.cli import configure_logging  # the CLI imports this module's parent

    configure_logging()
    (length,) = _LENGTH.unpack(sys.stdin.buffer.read(_LENGTH.size))
    orders = _Orders(*pickle.loads(sys.stdin.buffer.read(length)))
    try:
        asyncio.run(_serve(orders))
    except OSError as e:  # the port is taken, a certificate cannot be read, ...
        print(f"car-grpc: gateway: {e}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
