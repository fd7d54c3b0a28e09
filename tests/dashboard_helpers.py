"""Helpers for the dashboard tests: a raw HTTP/1.1 client on asyncio streams (so tests
choose every header, Host and Origin included), Server-Sent Event reading, the login
link the dashboard prints in its log, and half-open connections (a slowloris client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

LOGIN_LINE = re.compile(r"dashboard: log in at (?P<url>http://\S+)")


def printed_login_urls(records: Iterable[logging.LogRecord]) -> list[str]:
    """Every login link the dashboard logged, oldest first."""
    return [m["url"] for r in records if (m := LOGIN_LINE.search(r.getMessage()))]


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str:
        return ", ".join(self.headers.get(name.lower(), []))

    def json(self) -> Any:
        return json.loads(self.body)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, list[str]]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers


def _request_bytes(
    method: str, url: str, headers: dict[str, str] | None, body: bytes
) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    all_headers = {"Host": parts.netloc, "Connection": "close", **(headers or {})}
    if body or method == "POST":
        all_headers["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in all_headers.items()
    )
    return parts.hostname, parts.port, (head + "\r\n").encode() + body


async def request(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> HttpAnswer:
    """One request on a fresh connection; the whole answer (not for event streams)."""
    host, port, data = _request_bytes(method, url, headers, body)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            status, answer_headers = await _read_head(reader)
            length = int(answer_headers.get("content-length", ["0"])[0])
            payload = await reader.readexactly(length)
    finally:
        writer.close()
    return HttpAnswer(status, answer_headers, payload)


@dataclass
class Event:
    event: str
    data: str
    id: str | None


class EventReader:
    """An open `text/event-stream` response, read one event at a time."""

    def __init__(self, status: int, headers: dict[str, list[str]], reader: Any) -> None:
        self.status = status
        self.headers = headers
        self._reader: asyncio.StreamReader = reader

    async def next(self, timeout: float = 5) -> Event:
        fields: dict[str, list[str]] = {}
        async with asyncio.timeout(timeout):
            while True:
                line = (await self._reader.readline()).decode()
                if not line:
                    raise EOFError("the event stream ended")
                line = line.rstrip("\n")
                if line == "":
                    if "data" in fields:
                        return Event(
                            fields.get("event", ["message"])[-1],
                            "\n".join(fields["data"]),
                            fields.get("id", [None])[-1],
                        )
                    fields = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value.removeprefix(" "))

    async def next_of(self, kind: str, timeout: float = 5) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next(timeout)
                if event.event == kind:
                    return event


@contextlib.asynccontextmanager
async def event_stream(
    url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[EventReader]:
    host, port, data = _request_bytes("GET", url, headers, b"")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            status, answer_headers = await _read_head(reader)
        yield EventReader(status, answer_headers, reader)
    finally:
        writer.close()


async def log_in(login_url: str) -> str:
    """Open a login link; returns the `Cookie` header value it set."""
    answer = await request("GET", login_url)
    assert answer.status == 303, (answer.status, answer.body)
    cookie = answer.header("set-cookie").split(";", 1)[0]
    assert cookie.startswith("car_dashboard="), cookie
    return cookie


#: The start of a request head that never ends (no blank line): what a slowloris sends.
PARTIAL_HEAD = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


class HalfOpen:
    """A connection that sent `data` and then nothing; `closed` completes with what the
    server sent (at most 64 KiB) once the server closes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed: asyncio.Task[bytes] = asyncio.create_task(self._until_closed())

    async def _until_closed(self) -> bytes:
        received = b""
        with contextlib.suppress(ConnectionError):
            while len(received) < 64 * 1024 and (chunk := await self.reader.read(4096)):
                received += chunk
        return received

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    def close(self) -> None:
        self.closed.cancel()
        self.writer.close()


@contextlib.asynccontextmanager
async def half_open(
    port: int, count: int, source: str = "127.0.0.1", data: bytes = PARTIAL_HEAD
) -> AsyncIterator[list[HalfOpen]]:
    """`count` connections to 127.0.0.1:`port` from the address `source` (any 127.x.y.z
    is loopback: a peer of its own), each of which sends `data` and then nothing."""
    connections: list[HalfOpen] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            writer.write(data)
            connections.append(HalfOpen(reader, writer))
        yield connections
    finally:
        for connection in connections:
            connection.close()


async def until_closed(connections: list[HalfOpen], count: int, timeout: float = 5) -> None:
    """Wait until the server has closed at least `count` of `connections`."""
    async with asyncio.timeout(timeout):
        while sum(not c.is_open for c in connections) < count:
            await asyncio.wait(
                [c.closed for c in connections if c.is_open],
                return_when=asyncio.FIRST_COMPLETED,
            )
