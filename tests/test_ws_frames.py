"""The gateway's own reading and writing of whole data frames (gateway/ws_frames.py,
TrackedConnection): whatever way the client's bytes are split into reads, and whatever
frames websockets must see itself (pings, a fragmented message, a frame larger than the
gateway holds, a frame it refuses), every message reaches the core in order and the
connection behaves as websockets alone would have it. Real core, real gateway, a raw
client socket; the spy only counts the frames read by ws_frames."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.utils import apply_mask

from car_grpc.gateway import ws_frames
from car_grpc.gateway.connection import TrackedConnection
from tests.conftest import make_config
from tests.ws_helpers import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, running

OP_CONT = 0x0


def frame(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, first: int = 0) -> bytes:
    """A masked client frame (`first`: extra bits of its first byte, e.g. a reserved one)."""
    mask = os.urandom(4)
    n = len(payload)
    head = (0x80 if fin else 0) | first | opcode
    if n < 126:
        header = struct.pack("!BB", head, 0x80 | n)
    elif n < 2**16:
        header = struct.pack("!BBH", head, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", head, 0x80 | 127, n)
    return header + mask + apply_mask(payload, mask)


#: The most bytes an asyncio transport reads at once (selector_events' max_size).
ONE_READ = 256 * 1024
assert ONE_READ > ws_frames.PARTIAL_BYTES


def request(n: int, pad: int = 0) -> bytes:
    params = {"key": f"k{n}", **({"pad": "x" * pad} if pad else {})}
    return json.dumps({"jsonrpc": "2.0", "id": n, "method": "state.get", "params": params}).encode()


@pytest.fixture
def unmasked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the payloads ws_frames unmasked (the frames the gateway read itself)."""
    sizes: list[int] = []
    unmask = ws_frames.unmask

    def spy(data: bytes, start: int, end: int) -> bytes:
        sizes.append(end - start)
        return unmask(data, start, end)

    monkeypatch.setattr(ws_frames, "unmask", spy)
    return sizes


async def test_frames_split_anyhow_reach_the_core_in_order(
    tmp_path: Path, unmasked: list[int]
) -> None:
    """400 requests, and among them pings, a request in three fragments with a ping
    between them, and two requests larger than the gateway holds (PARTIAL_BYTES), all
    written in reads of 1 to 3,000 bytes: every request answered in order, every ping
    ponged with its payload; the gateway read the whole data frames itself."""
    config = make_config(tmp_path, auth=False, ws_max_message_bytes=1024 * 1024)
    rng = random.Random(16)
    async with running(config) as (_core, gateway):
        raw = await RawWebSocket.open("127.0.0.1", gateway.ws_port)
        raw.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await raw.send_text({"id": 0, "method": "session.auth", "params": {}})
        assert "result" in json.loads((await raw.read_frame())[1])
        stream, pings = [], []
        for n in range(1, 401):
            if n % 50 == 7:
                pings.append(f"ping {n}".encode())
                stream.append(frame(pings[-1], OP_PING))
            if n == 123:  # fragmented, a ping between the fragments
                text = request(n)
                stream += [
                    frame(text[:10], OP_TEXT, fin=False),
                    frame(b"between", OP_PING),
                    frame(text[10:30], OP_CONT, fin=False),
                    frame(text[30:], OP_CONT),
                ]
                pings.append(b"between")
            elif n in (200, 300):
                # Past what asyncio reads at once too: however the writes below coalesce
                # (a busy machine), it never comes whole in one read (then the gateway's).
                stream.append(frame(request(n, pad=ONE_READ + 5000)))
            else:
                stream.append(frame(request(n)))
        data = b"".join(stream)
        at = 0
        while at < len(data):
            step = rng.randint(1, 3000)
            raw.writer.write(data[at : at + step])
            await raw.writer.drain()
            at += step
            for _ in range(rng.randint(0, 3)):  # let the gateway read it as it comes
                await asyncio.sleep(0)
        answered: list[int] = []
        ponged: list[bytes] = []
        while len(answered) < 400 or len(ponged) < len(pings):
            opcode, payload = await raw.read_frame()
            if opcode == OP_PONG:
                ponged.append(payload)
            else:
                assert opcode == OP_TEXT, (opcode, payload)
                answered.append(json.loads(payload)["id"])
        raw.close()
    assert answered == list(range(1, 401))
    assert ponged == pings
    # Every whole data frame but the fragments and the two large ones (websockets')
    # was read by the gateway itself, also after websockets had read a large one.
    assert len(unmasked) == 400 - 1 - 2, len(unmasked)


#: Frames websockets refuses (built per test: each is masked afresh), and its close code.
BAD_FRAMES: dict[str, tuple[Callable[[], bytes], int]] = {
    "a reserved bit, no extension": (lambda: frame(b'{"id": 1}', first=0x40), 1002),
    "text that is not UTF-8": (lambda: frame(b'"\xff"'), 1007),
    "an unknown opcode": (lambda: frame(b"x", 0x3), 1002),
    "not masked": (lambda: struct.pack("!BB", 0x81, 2) + b"{}", 1002),
}


@pytest.mark.parametrize("bad", BAD_FRAMES)
async def test_a_frame_websockets_refuses_closes_as_it_would(
    tmp_path: Path, unmasked: list[int], bad: str
) -> None:
    """After a request read by the gateway itself, in the same read: the connection
    closes with websockets' code for the bad frame (the request's answer, when it comes
    before the close, is the only other frame)."""
    async with running(make_config(tmp_path, auth=False)) as (_core, gateway):
        raw = await RawWebSocket.open("127.0.0.1", gateway.ws_port)
        await raw.send_text({"id": 0, "method": "session.auth", "params": {}})
        assert "result" in json.loads((await raw.read_frame())[1])
        make, code = BAD_FRAMES[bad]
        raw.writer.write(frame(request(1)) + make())
        await raw.writer.drain()
        frames: list[tuple[int, bytes]] = []
        while not frames or frames[-1][0] != OP_CLOSE:
            frames.append(await raw.read_frame())
        raw.close()
    *before, (_, close) = frames
    assert [json.loads(answer)["id"] for _, answer in before] in ([], [1])
    assert struct.unpack("!H", close[:2])[0] == code
    assert unmasked  # the request was read by the gateway


async def test_a_frame_sent_a_byte_at_a_time_is_read_once_it_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 KiB request written one byte at a time: answered, and the gateway went over
    the bytes it holds only when its header and then the whole frame were there (not
    once a read, which would copy the held bytes again on every read)."""
    passes: list[int] = []
    read_frames = TrackedConnection._read_frames

    def spy(self: TrackedConnection, data: bytes) -> None:
        passes.append(len(data))
        read_frames(self, data)

    monkeypatch.setattr(TrackedConnection, "_read_frames", spy)
    async with running(make_config(tmp_path, auth=False)) as (_core, gateway):
        raw = await RawWebSocket.open("127.0.0.1", gateway.ws_port)
        raw.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await raw.send_text({"id": 0, "method": "session.auth", "params": {}})
        assert "result" in json.loads((await raw.read_frame())[1])
        data = frame(request(1, pad=4096))
        before = len(passes)
        for byte in range(len(data)):
            raw.writer.write(data[byte : byte + 1])
            await raw.writer.drain()
            await asyncio.sleep(0)
        opcode, payload = await raw.read_frame()
        raw.close()
    assert opcode == OP_TEXT and json.loads(payload)["id"] == 1
    # The first read (2 bytes or more), the header's rest, then the whole frame.
    assert 1 <= len(passes) - before <= 3, passes[before:]
