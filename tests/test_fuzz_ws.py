"""Fuzzing the WebSocket front end: a real core and gateway on loopback, fed arbitrary text
and binary frames, JSON of every shape, every method of the API with mutated params, all
of it before auth too, and raw bytes on the socket.

The oracle (`Expected`) follows docs/protocol.md §1 alone: which frames are answered, under
which id and with which code (a parse error -32700 and an invalid request -32600 with id
null, an unknown method -32601, a known one a result or a handler's error), and that
nothing else is. Everything the server sends must be strict JSON. Each example has its
own connection and ends with Rig.settle: the session is gone without a trace, a bystander
is still served, and nothing raised inside the server. Waits are bounded: a hang fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from car_grpc.wire import api
from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from tests.fuzz_rig import DOCUMENTED, EXAMPLE_TIMEOUT, HANDLER_ERRORS, Rig, rig, strict_json
from tests.fuzz_strategies import FUZZ, MISSING, json_strings, json_values, params_for
from tests.ws_helpers import OP_CLOSE, OP_PONG, OP_TEXT, RawWebSocket, Rpc, rpc

JSON = Any

METHODS = sorted([*api.CLIENT_REQUESTS, *api.CLIENT_NOTIFICATIONS])
NULL = "null"  # the key of id null


@pytest.fixture
async def fuzzed(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path) as the_rig:
        yield the_rig


def key(id_: JSON) -> str:
    return json.dumps(id_, sort_keys=True)


# ------------------------------------------------------------------ the oracle


def accepts(kind: str, answer: dict[str, JSON]) -> bool:
    """Whether `answer` is what a frame of `kind` must get."""
    error = answer.get("error")
    code = error["code"] if isinstance(error, dict) else None
    if kind == "parse":
        return code == PARSE_ERROR
    if kind == "invalid":
        return code == INVALID_REQUEST
    if kind == "unknown":
        return code == METHOD_NOT_FOUND
    if kind == "known":
        return "result" in answer or code in HANDLER_ERRORS
    if kind == "notice":  # a notification method called with an id: an empty answer
        return answer.get("result", 0) is None or code == INVALID_PARAMS
    if kind == "auth":  # a fuzzed credential never authenticates
        return code in (INVALID_PARAMS, INTERNAL)
    assert kind == "refused"  # a request before auth: -32001 (or the gateway's own errors)
    return code in (INVALID_PARAMS, INTERNAL, AUTH_REQUIRED)


def valid_id(id_: JSON) -> bool:
    """A request id is a string, a finite number or null; any other is refused."""
    if isinstance(id_, bool):
        return False
    if isinstance(id_, float):
        return math.isfinite(id_)
    return id_ is None or isinstance(id_, str | int)


def check_shape(answer: JSON) -> None:
    """A JSON-RPC 2.0 response object; an error carries a documented code and a message."""
    assert isinstance(answer, dict) and answer.get("jsonrpc") == "2.0", answer
    assert "id" in answer and ("result" in answer) != ("error" in answer), answer
    if "error" in answer:
        error = answer["error"]
        assert isinstance(error, dict) and set(error) <= {"code", "message", "data"}, answer
        assert error["code"] in DOCUMENTED, answer
        assert isinstance(error["message"], str) and error["message"], answer


def is_audio(data: bytes) -> bool:
    """A binary frame that starts with a control byte other than JSON whitespace is an
    audio frame, not JSON (voice.proto)."""
    return bool(data) and 0x01 <= data[0] <= 0x1F and data[0] not in b"\t\n\r"


def is_valid_pcm(data: bytes) -> bool:
    """A PCM-in audio frame the gateway forwards (voice.proto): type 0x01, a 26-byte header,
    then whole 16-bit samples, at least one."""
    return len(data) > 26 and data[0] == 0x01 and (len(data) - 26) % 2 == 0


class Expected:
    """The answers a connection's frames must get: single answers by id, and batches."""

    def __init__(self, *, authenticated: bool) -> None:
        self.authenticated = authenticated
        self.singles: dict[str, list[str]] = {}
        self.batches: list[list[tuple[str, str]]] = []

    def frame(self, data: str | bytes) -> None:
        """Note what one frame sent by the client must produce."""
        if isinstance(data, bytes) and is_audio(data):
            if not is_valid_pcm(data):  # forwarded to the core, or -32600
                self._add((NULL, "invalid"))
            return
        try:
            message = strict_json(data)
        except ValueError:
            self._add((NULL, "parse"))
            return
        if isinstance(message, list):
            if not message:
                self._add((NULL, "invalid"))
            elif entries := [e for m in message for e in self._one(m)]:
                self.batches.append(entries)
            return
        for entry in self._one(message):
            self._add(entry)

    def _one(self, m: JSON) -> list[tuple[str, str]]:
        if not isinstance(m, dict):
            return [(NULL, "invalid")]
        method = m.get("method")
        if method is None:
            if "id" in m and ("result" in m or "error" in m):
                return []  # an answer to a server request: never answered
            return [(NULL, "invalid")]
        if not isinstance(method, str):
            return [(NULL, "invalid")]
        if "id" not in m:
            return []  # a notification: never answered, not even with an error
        if not valid_id(m["id"]):
            return [(NULL, "invalid")]
        return [(key(m["id"]), self._kind(method))]

    def _kind(self, method: str) -> str:
        if method in api.CLIENT_NOTIFICATIONS and method not in api.CLIENT_REQUESTS:
            return "notice"
        if method not in api.CLIENT_REQUESTS:
            return "unknown"
        if self.authenticated:
            return "known"
        return "auth" if method == "session.auth" else "refused"

    def _add(self, entry: tuple[str, str]) -> None:
        self.singles.setdefault(entry[0], []).append(entry[1])

    @property
    def done(self) -> bool:
        return not self.batches and not any(self.singles.values())

    def answer(self, answer: JSON) -> None:
        check_shape(answer)
        kinds = self.singles.get(key(answer["id"]), [])
        for i, kind in enumerate(kinds):
            if accepts(kind, answer):
                del kinds[i]
                return
        raise AssertionError(f"unexpected answer {answer!r}; still expected {self.singles}")

    def batch(self, answers: JSON) -> None:
        assert isinstance(answers, list) and answers, answers
        for answer in answers:
            check_shape(answer)
        for i, entries in enumerate(self.batches):
            if _matches(entries, answers):
                del self.batches[i]
                return
        raise AssertionError(f"unexpected batch answer {answers!r}; expected {self.batches}")


def _matches(entries: list[tuple[str, str]], answers: list[dict[str, JSON]]) -> bool:
    if len(entries) != len(answers):
        return False
    left = list(entries)
    for answer in answers:
        found = next((e for e in left if e[0] == key(answer["id"]) and accepts(e[1], answer)), None)
        if found is None:
            return False
        left.remove(found)
    return True


# ------------------------------------------------------------------ talking to the gateway

#: Answers a fuzzing client gives to the server's own requests (tools.execute, agent.chat).
server_answers = st.one_of(
    json_values.map(lambda r: {"result": r}),
    st.fixed_dictionaries(
        {"code": st.integers(), "message": json_strings}, optional={"data": json_values}
    ).map(lambda e: {"error": e}),
    json_values.map(lambda e: {"error": e}),
)

_serial = itertools.count()
ID_TYPES = st.sampled_from(["int", "str", "float", "list", "object", "bool", "null"])


def unique_id(kind: str) -> JSON:
    """A request id of the JSON type `kind` that no other request of the run uses (lists,
    objects and booleans are not ids: each of those requests is refused under id null)."""
    n = next(_serial)
    ids: dict[str, JSON] = {
        "int": n,
        "str": f"r{n}",
        "float": n + 0.5,
        "list": [n],
        "object": {"n": n},
        "bool": n % 2 == 0,
        "null": None,
    }
    return ids[kind]


async def exchange(
    ws: ClientConnection,
    frames: list[str | bytes],
    expected: Expected,
    data: st.DataObject,
    *,
    may_close: bool = False,
) -> tuple[int, str] | None:
    """Send the frames, then read until every expected answer came, answering the server's
    requests as the fuzzer likes. Returns the server's (code, reason) if it closed."""
    for frame in frames:
        await ws.send(frame)
    try:
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            while not expected.done:
                raw = await ws.recv()
                assert isinstance(raw, str), f"a binary frame from the server: {raw!r}"
                message = strict_json(raw)
                if isinstance(message, list):
                    expected.batch(message)
                elif isinstance(message, dict) and "method" in message:
                    assert message.get("jsonrpc") == "2.0" and isinstance(message["method"], str)
                    if "id" in message:  # the server's own request
                        reply = data.draw(server_answers, label=f"answer to {message['method']}")
                        await ws.send(json.dumps({"jsonrpc": "2.0", "id": message["id"], **reply}))
                else:
                    expected.answer(message)
    except ConnectionClosed:
        rcvd = ws.protocol.close_rcvd
        code, reason = (rcvd.code, rcvd.reason) if rcvd else (1006, "")
        assert may_close, f"the server closed the connection: {code} {reason}"
        return code, reason
    return None


async def login(client: Rpc, fuzzed: Rig, role: str) -> None:
    await client.result("session.auth", fuzzed.credentials(role))
    await client.result("server.handshake", {"protocol_version": 3})


def request_frame(method: str, params: JSON, id_: JSON, *, notify: bool) -> dict[str, JSON]:
    frame: dict[str, JSON] = {"jsonrpc": "2.0", "method": method}
    if not notify:
        frame["id"] = id_
    if params is not MISSING:
        frame["params"] = params
    return frame


ROLES = st.sampled_from(["agent", "host", "daemon"])
SENTINEL = json.dumps({"jsonrpc": "2.0", "id": "#sentinel", "method": "state.keys"})


async def close(client: Rpc, data: st.DataObject) -> None:
    """Leave politely (a close frame) or as car-runtime does (drop TCP)."""
    if data.draw(st.booleans(), label="drop tcp"):
        client.ws.transport.abort()


async def answered(fuzzed: Rig, role: str, frames: list[str | bytes], data: st.DataObject) -> None:
    """`frames` and the sentinel on a connection logged in as `role`: each gets its precise
    answer; then the connection goes (`close`) and the server settles."""
    async with rpc(fuzzed.gateway.url) as client:
        await login(client, fuzzed, role)
        expected = Expected(authenticated=True)
        for frame in [*frames, SENTINEL]:
            expected.frame(frame)
        await exchange(client.ws, [*frames, SENTINEL], expected, data)
        await close(client, data)
    await fuzzed.settle()


# ------------------------------------------------------------------ every method


@pytest.mark.parametrize("method", METHODS)
@settings(FUZZ, max_examples=10)
@given(data=st.data())
async def test_every_method_with_mutated_params(
    fuzzed: Rig, method: str, data: st.DataObject
) -> None:
    role = data.draw(ROLES, label="role")
    calls = data.draw(
        st.lists(st.tuples(params_for(method), st.booleans(), ID_TYPES), min_size=1, max_size=3),
        label="calls (params, as notification, id type)",
    )
    messages = [
        request_frame(method, params, unique_id(id_type), notify=notify and len(calls) > 1)
        for params, notify, id_type in calls
    ]
    if len(messages) > 1 and data.draw(st.booleans(), label="as one batch"):
        frames: list[str | bytes] = [json.dumps(messages)]
    else:
        frames = [json.dumps(m) for m in messages]
    if data.draw(st.booleans(), label="in binary frames"):
        frames = [f.encode() if isinstance(f, str) else f for f in frames]
    await answered(fuzzed, role, frames, data)


# ------------------------------------------------------------------ any frame at all

jsonrpc_objects = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | json_values,
        "id": json_values,
        "method": st.sampled_from(METHODS) | json_values,
        "params": json_values,
        "result": json_values,
        "error": json_values,
    },
)
json_texts = st.one_of(
    json_values,
    jsonrpc_objects,
    st.lists(jsonrpc_objects | json_values, max_size=4),
).map(json.dumps)


@st.composite
def audio_frames(draw: st.DrawFn) -> bytes:
    """A CAR binary audio frame, well-formed or not."""
    kind = draw(st.sampled_from([0x01, 0x02, 0x03, 0x04]) | st.integers(0x01, 0x1F))
    header = struct.pack(
        "<B16sQB",
        kind,
        draw(st.binary(min_size=16, max_size=16)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 255)),
    )
    frame = header + draw(st.binary(max_size=12))
    return frame[: draw(st.integers(1, len(frame)))] if draw(st.booleans()) else frame


any_frame: st.SearchStrategy[str | bytes] = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    json_texts,
    json_texts.map(str.encode),
    st.tuples(json_texts, st.sampled_from(["utf-16", "utf-16-be", "utf-32-le"])).map(
        lambda t: t[0].encode(t[1])
    ),
    audio_frames(),
)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
async def test_any_frame_gets_its_precise_answer(fuzzed: Rig, data: st.DataObject) -> None:
    role = data.draw(ROLES, label="role")
    frames = data.draw(st.lists(any_frame, min_size=1, max_size=4), label="frames")
    await answered(fuzzed, role, frames, data)


# ------------------------------------------------------------------ before auth

#: A request that is still open after a -32001: it ends the connection.
AUTH_SENTINEL = json.dumps({"jsonrpc": "2.0", "id": "#auth", "method": "session.auth"})


@st.composite
def known_requests(draw: st.DrawFn) -> str:
    method = draw(st.sampled_from(METHODS))
    frame = request_frame(
        method,
        draw(params_for(method)),
        draw(json_values),
        notify=draw(st.booleans()),
    )
    return json.dumps(frame)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
async def test_before_auth_every_frame_is_refused_precisely(
    fuzzed: Rig, data: st.DataObject
) -> None:
    """Before session.auth: the gateway's own errors keep the connection open; a request
    for the core gets -32001 and then the close 1008; no fuzzed credential gets in."""
    frame = data.draw(any_frame | known_requests(), label="frame")
    async with rpc(fuzzed.gateway.url) as client:
        expected = Expected(authenticated=False)
        for each in (frame, AUTH_SENTINEL):
            expected.frame(each)
        closed = await exchange(client.ws, [frame, AUTH_SENTINEL], expected, data, may_close=True)
        if closed is not None:
            assert closed == (1008, "auth required")
        await close(client, data)
    await fuzzed.settle()


# ------------------------------------------------------------------ raw bytes on the socket


@st.composite
def ws_frames(draw: st.DrawFn) -> bytes:
    """One RFC 6455 frame as a client might (mis)write it: any flags, opcode, mask, length."""
    fin = draw(st.booleans())
    rsv = draw(st.sampled_from([0, 0, 0]) | st.integers(0, 7))
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]) | st.integers(0, 15))
    payload = draw(st.binary(max_size=200) | json_texts.map(str.encode))
    masked = draw(st.sampled_from([True, True, False]))
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 2**16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return header + payload
    mask = draw(st.binary(min_size=4, max_size=4))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def valid_close_code(code: int) -> bool:
    """A code a close frame may carry (RFC 6455 §7.4)."""
    return 1000 <= code <= 4999 and code not in (1004, 1005, 1006, 1015)


@settings(FUZZ, max_examples=60)
@given(chunks=st.lists(st.binary(min_size=1, max_size=64) | ws_frames(), min_size=1, max_size=3))
async def test_raw_bytes_on_the_socket(fuzzed: Rig, chunks: list[bytes]) -> None:
    """Whatever bytes follow the opening handshake, the server answers with well-formed
    frames (JSON-RPC text, pongs, a close with a valid code) and cleans up on EOF."""
    raw = await RawWebSocket.open("127.0.0.1", fuzzed.gateway.ws_port)
    try:
        # A first round trip through the core: the session exists before the bytes arrive.
        await raw.send_text({"jsonrpc": "2.0", "id": 1, "method": "session.auth", "params": {}})
        opcode, payload = await raw.read_frame()
        assert opcode == OP_TEXT and json.loads(payload)["error"]["code"] == INTERNAL
        with contextlib.suppress(ConnectionError):
            for chunk in chunks:
                raw.writer.write(chunk)
            await raw.writer.drain()
            raw.writer.write_eof()
        frames = await read_to_eof(raw)
    finally:
        raw.close()
    for opcode, payload in frames:
        if opcode == OP_TEXT:
            message = strict_json(payload)
            for answer in message if isinstance(message, list) else [message]:
                if "method" not in answer:
                    check_shape(answer)
        elif opcode == OP_CLOSE and len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            assert valid_close_code(code), code
        else:
            assert opcode in (OP_PONG, OP_CLOSE), opcode
    await fuzzed.settle()


async def read_to_eof(raw: RawWebSocket) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it drops the connection (bounded)."""
    frames: list[tuple[int, bytes]] = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            frames.append(await raw.read_frame(EXAMPLE_TIMEOUT))
    return frames
