"""A lean WebSocket client connection for load generators: websockets' Sans-I/O
`ClientProtocol` on an `asyncio.BufferedProtocol`.

websockets' asyncio client hands every message to a reader task through a queue and a
future, and wraps every send in an async context manager; a load generator of 250
sessions a process spends a good part of its CPU there. Here a message is handed to
the listener as soon as a read is parsed, and `send_text` writes the frame to the
transport at once: the same frames (masked, one `transport.write` each, as websockets'
`send` does), parsed and built by websockets, with no task, queue or future between the
socket and the caller.

Not flow-controlled: the caller bounds what it writes (bench_load: one operation in flight
per session, a few frames).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import USER_AGENT, Response
from websockets.protocol import State
from websockets.uri import parse_uri

#: How long a close waits for the server's close frame and end of stream.
CLOSE_TIMEOUT = 10.0


class WireClosed(Exception):
    """The connection closed (or never opened)."""


#: Where every connection of the process reads into (`recv_into`; asyncio's own reads
#: allocate 256 KiB for each): what a read gets is parsed (copied) before the next read.
_READS = memoryview(bytearray(64 * 1024))


class Wire(asyncio.BufferedProtocol):
    """One client connection. Once `listen(on_message, on_lost)` is called, `on_message(data)`
    gets each text or binary message (bytes) in the order received (those that came before,
    e.g. with the handshake's response, first); `on_lost(exc)` is called once when the
    connection is gone.
    Reads go into one buffer (`_READS`), not a new bytes object each."""

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self._early: list[bytes] = []  # messages before listen()
        self._on_message: Callable[[bytes], None] = self._early.append
        self._on_lost: Callable[[Exception], None] = lambda exc: None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._fragments: list[bytes] = []
        self._abort_scheduled = False

    # -------------------------------------------------------------- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.protocol.connect()
        request.headers.setdefault("User-Agent", USER_AGENT)  # as websockets' client sends
        self.protocol.send_request(request)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READS

    def buffer_updated(self, nbytes: int) -> None:
        self.protocol.receive_data(_READS[:nbytes].tobytes())
        self._flush()  # pongs, the close handshake's reply
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if self.protocol.handshake_exc is not None:
                    self._fail_open(self.protocol.handshake_exc)
                elif not self.opened.done():
                    self.opened.set_result(None)
            elif isinstance(event, Frame):
                self._frame(event)
        if not self._abort_scheduled and self.protocol.close_expected():
            assert self.transport is not None  # the server's end of stream, or abort
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.abort)
            self._abort_scheduled = True

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or WireClosed("connection closed")
        self._fail_open(error)
        if not self.lost.done():
            self.lost.set_result(None)
        self._on_lost(error)

    # -------------------------------------------------------------- the caller's side

    def listen(
        self, on_message: Callable[[bytes], None], on_lost: Callable[[Exception], None]
    ) -> None:
        """Where the messages go from now on, and the news that the connection is gone."""
        self._on_message, self._on_lost = on_message, on_lost
        early, self._early = self._early, []
        for data in early:
            on_message(data)
        if self.lost.done():
            on_lost(WireClosed("connection closed"))

    def send_text(self, data: bytes) -> None:
        """Write one text frame of UTF-8 `data` (raises WireClosed if not open)."""
        if self.protocol.state is not State.OPEN:
            raise WireClosed(f"send in state {self.protocol.state.name}")
        self.protocol.send_text(data)
        self._flush()

    async def close(self) -> None:
        """The closing handshake, then the end of the TCP connection (at most
        CLOSE_TIMEOUT, then aborted)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close()
            self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), CLOSE_TIMEOUT)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    # -------------------------------------------------------------- inside

    def _frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            if frame.fin and not self._fragments:
                self._on_message(bytes(frame.data))
            elif frame.fin:
                self._on_message(b"".join([*self._fragments, frame.data]))
                self._fragments.clear()
            else:
                self._fragments.append(bytes(frame.data))

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():  # SEND_EOF: half-close
                self.transport.write_eof()

    def _fail_open(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(WireClosed(f"handshake failed: {exc!r}"))


async def connect(url: str, timeout: float) -> Wire:
    """An open connection to `url` (ws://), in at most `timeout` seconds; no extensions
    (compression), no size limit, no keepalive pings (as bench_load's websockets client was
    set up)."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, wire = await loop.create_connection(
            lambda: Wire(ClientProtocol(uri, max_size=None)), uri.host, uri.port
        )
        await wire.opened
    return wire
