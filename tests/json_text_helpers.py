"""What tests/test_turn_text.py and tests/test_chat_text.py share: random JSON to check a
JSON text written once (wire/turn_text.py, wire/chat_text.py) against the codec's, and a
WebSocket session read frame by frame as text."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.ws_client import HANDSHAKE

JSON = Any

_CHARS = ["a", "Z", " ", '"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "€", "😀"]


def random_string(rng: random.Random) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 6)))


def random_json(rng: random.Random, depth: int = 0, *, plain: bool = True) -> JSON:
    """Free-form JSON; `plain`: only what a text is written for (strings, booleans, null,
    integers of at most 53 bits, objects and arrays of them)."""
    kind = rng.randint(0, 6 if depth < 3 else 3)
    if kind == 0:
        return random_string(rng)
    if kind == 1:
        return rng.choice([True, False, None])
    if kind == 2:
        numbers = [0, -1, 7, 2**53, -(2**53), 123456789]
        return rng.choice(numbers if plain else [*numbers, 1.5, 60.0, -0.0, 2**53 + 1, 1e300])
    if kind == 3:
        return rng.choice(["", "x"])
    if kind in (4, 5):
        return {
            random_string(rng) + str(i): random_json(rng, depth + 1, plain=plain)
            for i in range(rng.randint(0, 3))
        }
    return [random_json(rng, depth + 1, plain=plain) for _ in range(rng.randint(0, 3))]


def one_key_objects(value: JSON) -> bool:
    """Whether every object in `value` has at most one key (so key order cannot differ)."""
    if isinstance(value, dict):
        return len(value) <= 1 and all(one_key_objects(v) for v in value.values())
    if isinstance(value, list):
        return all(one_key_objects(v) for v in value)
    return True


async def recv_text(ws: ClientConnection) -> str:
    async with asyncio.timeout(10):
        text = await ws.recv()
    assert isinstance(text, str)
    return text


async def ws_session(url: str, auth: dict[str, str]) -> ClientConnection:
    """A WebSocket session, authenticated and past the handshake, read frame by frame."""
    ws = await connect(url, ping_interval=None, max_size=None)
    for n, (method, params) in enumerate((("session.auth", auth), ("server.handshake", HANDSHAKE))):
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": n, "method": method, "params": params}))
        assert "result" in json.loads(await recv_text(ws))
    return ws
