"""`python -m tests.ws_burst PORT TOKEN N`: a burst of N WebSocket connections at once.

Every TCP connection is made first, then every upgrade request is written in one go, so
the gateway takes the handshakes (and opens the Connect streams) as fast as it can. Each
connection then authenticates and does one round trip (tools.list); all stay open until
all are done. Prints one JSON line: {"results": {outcome: count}, "seconds": ...}, the
outcome "ok" or what went wrong (e.g. the close frame's reason)."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import struct
import sys
import time
from typing import Any

from tests.ws_helpers import OP_CLOSE, RawWebSocket

TIMEOUT = 30.0


async def _answer(ws: RawWebSocket) -> Any:
    opcode, payload = await ws.read_frame(TIMEOUT)
    if opcode == OP_CLOSE:
        (code,) = struct.unpack("!H", payload[:2])
        return {"closed": f"{code} {payload[2:].decode(errors='replace')}"}
    return json.loads(payload)


async def burst(port: int, token: str, n: int) -> dict[str, Any]:
    streams = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    start = time.monotonic()
    for _, writer in streams:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
    results: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            if not head.startswith(b"HTTP/1.1 101"):
                results[head.split(b"\r\n")[0].decode()] += 1
                return
            ws = RawWebSocket(reader, writer)
            auth = {"token": token}
            await ws.send_text(
                {"jsonrpc": "2.0", "id": 1, "method": "session.auth", "params": auth}
            )
            answers = [await _answer(ws)]
            await ws.send_text({"jsonrpc": "2.0", "id": 2, "method": "tools.list"})
            answers.append(await _answer(ws))
            bad = [a for a in answers if "result" not in a]
            results["ok" if not bad else json.dumps(bad[0])[:120]] += 1
        except Exception as e:  # any failure is an outcome to report
            results[repr(e)[:120]] += 1
        finally:
            if sum(results.values()) == n:
                done.set()
            await asyncio.wait_for(done.wait(), 2 * TIMEOUT)
            writer.close()

    await asyncio.gather(*(one(reader, writer) for reader, writer in streams))
    return {"results": dict(results), "seconds": time.monotonic() - start}


def main() -> None:
    port, token, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    print(json.dumps(asyncio.run(burst(port, token, n))), flush=True)


if __name__ == "__main__":
    main()
