"""Frames past what a session stream carries (limits.MAX_FRAME_BYTES) are refused for
their client alone: a real core and gateway on loopback, the gateway's connections on one
multiplexed stream (as in `car-grpc serve`), and a bystander on that stream that keeps
working. Before, one such frame failed the stream and closed every connection on it.

Also the two facts the checks rest on: the bound on how much a client frame's text grows
as protobuf (jsonrpc.CHECK_SIZE_ABOVE), and the room MAX_FRAME_BYTES leaves for the
envelopes of a batch and a multiplexed record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from car_grpc.gateway import jsonrpc
from car_grpc.v1 import session_pb2
from car_grpc.wire import batch, limits, multiplex
from car_grpc.wire.errors import INVALID_PARAMS
from tests.conftest import make_config
from tests.ws_helpers import Rpc, rpc, running

#: What the refusals name.
LIMIT = f"over the {limits.MAX_FRAME_BYTES} bytes a frame may carry (MAX_FRAME_BYTES)"


@pytest.fixture
async def served(tmp_path: Path) -> Any:
    # State budgets wide enough for a snapshot past the limit.
    config = make_config(
        tmp_path, auth=False, state_value_max_bytes=16 << 20, state_max_bytes=128 << 20
    )
    async with running(config) as pair:
        yield pair


async def still_works(client: Rpc, value: int) -> None:
    await client.result("state.set", {"key": "alive", "value": value})
    assert await client.result("state.get", {"key": "alive"}) == value


async def test_a_request_that_grows_past_the_limit_as_protobuf_is_refused_alone(
    served: Any,
) -> None:
    _, gateway = served
    async with rpc(gateway.url, max_size=None) as client, rpc(gateway.url) as bystander:
        await client.login()
        await bystander.login()
        await still_works(bystander, 1)
        # 16 MB of bare zeros (within the 64 MiB WebSocket limit): 88 MB as protobuf.
        zeros = {"key": "k", "value": [0] * 8_000_000}
        error = await client.error("state.set", zeros, timeout=120)
        assert error["code"] == INVALID_PARAMS
        assert error["message"].startswith("invalid params: frame too large: 88000")
        assert error["message"].endswith(LIMIT)
        await still_works(bystander, 2)
        await still_works(client, 3)


async def test_an_answer_past_the_limit_fails_its_request_alone(served: Any) -> None:
    _, gateway = served
    async with rpc(gateway.url, max_size=None) as client, rpc(gateway.url) as bystander:
        await client.login()
        await bystander.login()
        await still_works(bystander, 1)
        value = "x" * (15 << 20)
        for n in range(6):  # 90 MiB of state, each value well within the limit
            await client.result("state.set", {"key": f"v{n}", "value": value}, timeout=60)
        error = await client.error("state.snapshot", {}, timeout=60)
        assert error["code"] == INVALID_PARAMS
        assert error["message"].startswith("invalid params: frame too large: ")
        assert error["message"].endswith(LIMIT)
        await still_works(bystander, 2)
        await still_works(client, 3)


def grown(method: str, params: Any) -> float:
    """Bytes of ClientFrame per character of the frame's text."""
    text = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    (message,) = jsonrpc.decode(text, {}, 1).messages
    assert message.frame is not None, message.reply
    frame = message.frame
    return (len(frame) if isinstance(frame, bytes) else frame.ByteSize()) / len(text)


def test_a_frame_grows_less_than_the_bound_the_check_rests_on() -> None:
    """The worst growths there are (jsonrpc.CHECK_SIZE_ABOVE's comment): under 18 bytes a
    character, where the check assumes 32."""
    assert jsonrpc.CHECK_SIZE_ABOVE == limits.MAX_FRAME_BYTES // 32
    zeros = grown("state.set", {"key": "k", "value": [0] * 20_000})
    assert 5.4 < zeros < 5.5  # a bare 0 in a free-form array: 11 bytes for `0,`
    assert grown("state.set", {"key": "k", "value": [[0]] * 20_000}) < 5.5
    assert grown("state.set", {"key": "k", "value": [{"a": 0}] * 20_000}) < 5.5
    assert grown("tools.register", [{"name": "t"}] * 20_000) < 5.5
    # A run turn's protobuf and its JSON text (turn_text.py), astral characters written
    # as two \u escapes each: 4 + 12 bytes a character.
    astral = {"run_id": "r", "turns": [{"output": "\U0001d11e" * 1300}] * 10}
    assert 15 < grown("runs.record_turns", astral) < 18
    turn_zeros = {"run_id": "r", "turns": [{"output": [0] * 2000}] * 10}
    assert grown("runs.record_turns", turn_zeros) < 7


def test_a_frame_at_the_limit_fits_in_a_message_with_its_envelopes() -> None:
    """A frame of MAX_FRAME_BYTES in a batch of its own, in a multiplexed record with every
    field at its largest, is still within the gRPC message limit."""
    frame = bytes(limits.MAX_FRAME_BYTES)
    record = multiplex.record(
        2**64 - 1,
        batch.encode([frame]),
        end=True,
        flag4=2**32 - 1,
        ack=(2**32 - 1, 2**64 - 1),
    )
    assert len(record) <= limits.MAX_MESSAGE_BYTES - 60_000


def test_each_kind_of_message_past_the_limit_is_refused_as_it_can_be() -> None:
    """A request gets the error, a notification nothing, an answer to a server request
    becomes an error for the core's call (which fails at once, not at its timeout)."""
    over = bytes(limits.MAX_FRAME_BYTES + 1)
    reason = f"frame too large: {len(over)} bytes as protobuf, {LIMIT}"
    request = jsonrpc._bounded(jsonrpc.Message(frame=over, client_id=7, answered=True))
    assert request.frame is None and request.reply is not None
    error = json.loads(request.reply)
    assert error == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": INVALID_PARAMS, "message": f"invalid params: {reason}"},
    }
    notice = jsonrpc._bounded(jsonrpc.Message(frame=over, notice=True))
    assert notice.frame is None and notice.reply is None
    answer = jsonrpc._bounded(jsonrpc.Message(frame=over, answer_to="cb-3"))
    assert isinstance(answer.frame, session_pb2.ClientFrame)
    assert answer.frame.id == "cb-3" and answer.frame.error.code == INVALID_PARAMS
    assert answer.frame.error.message == f"invalid answer: {reason}"
    fits = bytes(limits.MAX_FRAME_BYTES)
    assert jsonrpc._bounded(jsonrpc.Message(frame=fits, answered=True)).frame is fits
