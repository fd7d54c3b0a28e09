"""A small HTTP/1.1 server on asyncio streams, just enough for the dashboard.

Requests are parsed by `parse_head` (pure, tested without sockets); `HttpServer` reads
them off connections with bounds on everything (head size, body size, connections in all
and per peer, the time to send a request, idle time) and hands each to one async handler,
which answers with a `Response` or, for Server-Sent Events, an `EventStream`. Keep-alive
is supported; chunked request bodies and pipelining beyond one request at a time are not
needed by a browser page and are refused or simply served in order.

Against slowloris (connections that send a request head slowly, or never finish it): a
request head must arrive whole within `Limits.header_timeout` (408 otherwise), and when a
new connection finds its peer or the server at its connection cap, the connection that has
waited longest for a request (of that peer, else of anyone) is closed to make room. Only
when every connection is busy (a request being served, an event stream) is the new one
refused with 503. So half-open connections, however many, cannot lock out a client that
sends its request at once, not even from the same address (all of loopback is one peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from car_grpc.connection_caps import PeerCounts, peer_of

log = logging.getLogger(__name__)

#: Largest request head (request line and headers).
MAX_HEAD_BYTES = 16 * 1024
#: Largest request body.
MAX_BODY_BYTES = 64 * 1024
#: Most headers in one request.
MAX_HEADERS = 64
#: Connections served at once (defaults of `Limits`; the dashboard's come from Config).
MAX_CONNECTIONS = 64
#: Connections one peer (an IPv4 address, an IPv6 /64) may hold at once.
MAX_CONNECTIONS_PER_PEER = 32
#: How long a connection has to send a whole request head (from its opening, or from the
#: first byte of a later request on a kept-alive connection), and then its body.
HEADER_TIMEOUT = 5.0
#: How long a kept-alive connection may sit idle before its next request begins.
IDLE_TIMEOUT = 30.0
#: How long one write may wait for a client that does not read.
WRITE_TIMEOUT = 10.0
#: Seconds between SSE comments that keep an idle event stream (and its proxies) alive.
SSE_HEARTBEAT = 15.0


@dataclass(frozen=True)
class Limits:
    """The bounds of an `HttpServer` that its owner may choose."""

    max_connections: int = MAX_CONNECTIONS
    max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    header_timeout: float = HEADER_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT

    def __post_init__(self) -> None:
        if not 0 < self.max_connections_per_peer <= self.max_connections:
            raise ValueError("need 0 < max_connections_per_peer <= max_connections")
        if not (self.header_timeout > 0 and self.idle_timeout > 0):
            raise ValueError("timeouts must be positive")


class HttpError(Exception):
    """A request that cannot be served: answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    #: Lower-case names; repeated headers joined with ", " (Cookie with "; ").
    headers: dict[str, str]
    body: bytes = b""
    #: Whether the client asked to keep the connection open after this request.
    keep_alive: bool = True

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def cookies(self) -> dict[str, str]:
        jar: dict[str, str] = {}
        for part in self.header("cookie").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name and name not in jar:
                jar[name] = value
        return jar


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (up to, excluding, the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HttpError(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are served")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        raw_name, sep, value = line.partition(":")
        name = raw_name.lower()
        if not sep or not name or name != name.strip() or " " in name:
            raise HttpError(400, "malformed header line")  # incl. obsolete line folding
        value = value.strip()
        if name in headers:
            joiner = "; " if name == "cookie" else ", "
            headers[name] = headers[name] + joiner + value
        else:
            headers[name] = value
    if not target.startswith("/"):
        raise HttpError(400, "only origin-form request targets are served")
    url = urlsplit(target)
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    return Request(
        method=method.upper(),
        target=target,
        path=url.path,
        query=dict(parse_qsl(url.query, keep_blank_values=True)),
        headers=headers,
        keep_alive=keep_alive,
    )


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, status: int, text: str, **kw: object) -> Response:
        return cls(status, text.encode(), **kw)  # type: ignore[arg-type]


@dataclass
class ServerSentEvent:
    data: str
    event: str | None = None
    id: str | None = None
    #: Reconnection delay the browser should use, in ms.
    retry: int | None = None

    def encode(self) -> bytes:
        lines = []
        if self.retry is not None:
            lines.append(f"retry: {self.retry}")
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.event is not None:
            lines.append(f"event: {self.event}")
        lines += [f"data: {line}" for line in self.data.split("\n")]
        return ("\n".join(lines) + "\n\n").encode()


@dataclass
class EventStream:
    """A `text/event-stream` response: the events of `events`, until it ends or the
    client goes away (then it is closed: its `finally` blocks run)."""

    events: AsyncIterator[ServerSentEvent]
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response | EventStream]]
#: Headers every response carries (security and caching policy of the application).
HeaderHook = Callable[[Request | None], list[tuple[str, str]]]


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [_status_line(status)]
    lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
    return b"".join(lines) + b"\r\n"


class _Connection:
    """One accepted connection, for the caps: whose it is and the task serving it."""

    __slots__ = ("peer", "task")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.task: asyncio.Task[None] | None = None


class HttpServer:
    def __init__(
        self, handler: Handler, common_headers: HeaderHook, limits: Limits | None = None
    ) -> None:
        self._handler = handler
        self._common_headers = common_headers
        self.limits = limits or Limits()
        self._server: asyncio.Server | None = None
        #: Every connection task still running, counted or not (stop() ends them all).
        self._tasks: set[asyncio.Task[None]] = set()
        #: The connections the caps count (an evicted one leaves at once).
        self._counted: set[_Connection] = set()
        self._counts = PeerCounts()
        #: Counted connections waiting for (the rest of) a request, longest waiting first.
        self._waiting: dict[_Connection, None] = {}

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful when `port` is 0)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    async def stop(self) -> None:
        """Stop listening and end every connection (event streams included)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("peername"))
        if not self._make_room(peer):
            await self._refuse(writer, HttpError(503, "too many connections"))
            return
        # The connection runs in a task of its own that stop() (or an eviction) may
        # cancel: asyncio's stream server does not expect its callback task to end
        # cancelled.
        connection = _Connection(peer)
        task = connection.task = asyncio.create_task(self._connection(connection, reader, writer))
        self._counted.add(connection)
        self._counts.add(peer)
        self._waiting[connection] = None  # for its first request
        self._tasks.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self._tasks.discard(task)
            self._uncount(connection)
            writer.close()  # in case the task was cancelled (evicted) before it started

    def _make_room(self, peer: str) -> bool:
        """Whether a new connection of `peer` may be served, after closing the connection
        that has waited longest for a request if the peer's or the global cap is reached
        (the peer's own first). False if every connection in the way is busy."""
        if self._counts.of(peer) >= self.limits.max_connections_per_peer:
            victim = next((c for c in self._waiting if c.peer == peer), None)
            if victim is None:
                return False
            self._evict(victim)
        if self._counts.total >= self.limits.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, connection: _Connection) -> None:
        self._uncount(connection)
        if connection.task is not None:
            connection.task.cancel()  # it is reading: no request of it is half-served

    def _uncount(self, connection: _Connection) -> None:
        if connection not in self._counted:
            return
        self._counted.discard(connection)
        self._waiting.pop(connection, None)
        self._counts.remove(connection.peer)

    async def _connection(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            first = True
            while await self._one_request(connection, reader, writer, first):
                first = False
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled
        except Exception:
            log.exception("dashboard: connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _refuse(self, writer: asyncio.StreamWriter, error: HttpError) -> None:
        with contextlib.suppress(Exception):
            await self._write_response(writer, None, Response.text(error.status, error.message))
        writer.close()

    async def _one_request(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bool,
    ) -> bool:
        """Serve one request; whether the connection may carry another."""
        try:
            request = await self._read_request(connection, reader, first)
        except HttpError as e:
            await self._write_response(writer, None, Response.text(e.status, e.message))
            return False
        if request is None:
            return False
        try:
            answer = await self._handler(request)
        except Exception:
            log.exception("dashboard: %s %s failed", request.method, request.path)
            answer = Response.text(500, "internal error")
        if isinstance(answer, EventStream):
            await self._stream(reader, writer, request, answer)
            return False
        await self._write_response(writer, request, answer)
        return request.keep_alive

    async def _read_request(
        self, connection: _Connection, reader: asyncio.StreamReader, first: bool
    ) -> Request | None:
        """The next request, whole; None if the connection ended (or idled) between
        requests. While it waits the connection is evictable (see `_make_room`)."""
        limits = self.limits
        if connection in self._counted:
            self._waiting.pop(connection, None)
            self._waiting[connection] = None  # the longest waiting are first
        try:
            lead = b""
            if not first:
                # A kept-alive connection may idle until its next request begins.
                try:
                    async with asyncio.timeout(limits.idle_timeout):
                        lead = await reader.readexactly(1)
                except (TimeoutError, asyncio.IncompleteReadError):
                    return None
            try:
                async with asyncio.timeout(limits.header_timeout):
                    head = lead + await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                raise HttpError(
                    408, f"no whole request head within {limits.header_timeout:g} s"
                ) from None
            except asyncio.IncompleteReadError as e:
                if e.partial or lead:
                    raise HttpError(400, "incomplete request head") from None
                return None  # closed between requests
            except asyncio.LimitOverrunError:
                raise HttpError(431, "request head too large") from None
            request = parse_head(head[:-4])
            try:
                async with asyncio.timeout(limits.header_timeout):
                    request.body = await self._read_body(reader, request)
            except TimeoutError:
                raise HttpError(
                    408, f"no whole request body within {limits.header_timeout:g} s"
                ) from None
            return request
        finally:
            self._waiting.pop(connection, None)

    async def _read_body(self, reader: asyncio.StreamReader, request: Request) -> bytes:
        if request.header("transfer-encoding"):
            raise HttpError(501, "chunked request bodies are not supported")
        raw = request.header("content-length") or "0"
        if not raw.isdigit():
            raise HttpError(400, "bad Content-Length")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await reader.readexactly(length) if length else b""

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    async def _write_response(
        self, writer: asyncio.StreamWriter, request: Request | None, response: Response
    ) -> None:
        headers = [
            ("Date", formatdate(usegmt=True)),
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *self._common_headers(request),
            *response.headers,
        ]
        if request is None or not request.keep_alive:
            headers.append(("Connection", "close"))
        body = b"" if request is not None and request.method == "HEAD" else response.body
        await self._write(writer, _head(response.status, headers) + body)

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Request,
        stream: EventStream,
    ) -> None:
        headers = [
            ("Date", formatdate(usegmt=True)),
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Connection", "close"),
            *self._common_headers(request),
            *stream.headers,
        ]
        events = stream.events
        # The client sends nothing more on an event stream: EOF means it went away.
        gone: asyncio.Future[Any] = asyncio.ensure_future(reader.read(1))
        upcoming: asyncio.Future[Any] | None = None
        try:
            await self._write(writer, _head(200, headers))
            while True:
                if upcoming is None:
                    upcoming = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait(
                    {upcoming, gone}, timeout=SSE_HEARTBEAT, return_when=asyncio.FIRST_COMPLETED
                )
                if gone in done:
                    return
                if upcoming not in done:
                    await self._write(writer, b": keep-alive\n\n")
                    continue
                try:
                    event = upcoming.result()
                except StopAsyncIteration:
                    return
                upcoming = None
                await self._write(writer, event.encode())
        finally:
            gone.cancel()
            if upcoming is not None and not upcoming.done():
                upcoming.cancel()
                with contextlib.suppress(BaseException):
                    await upcoming
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
