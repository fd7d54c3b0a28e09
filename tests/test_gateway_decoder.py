"""Large frames decoded off the event loop: which frames go, the gateway ids set aside for
them, and the worker processes (real ones) with their bounds in time and memory."""

from __future__ import annotations

import json
from typing import Any

import pytest

from car_grpc.gateway import decoder
from car_grpc.gateway.decoder import DecodeFailed, DecoderPool, inline
from car_grpc.gateway.jsonrpc import Bridge, Decoded, decode
from car_grpc.v1 import session_pb2
from car_grpc.wire.errors import INVALID_PARAMS, METHOD_NOT_FOUND
from tests.bounded import stopped


def test_small_frames_with_few_values_are_decoded_inline() -> None:
    assert inline('{"id":1,"method":"tools.list"}')
    assert inline(b'{"id":1,"method":"tools.list"}')
    big_string = json.dumps({"id": 1, "method": "state.set", "params": {"value": "x" * 900_000}})
    assert inline(big_string)  # large, but one value: cheap to parse and convert
    assert not inline("x" * (decoder.INLINE_BYTES + 1))
    many = json.dumps([1] * (decoder.INLINE_COMMAS + 2))
    assert len(many) < 10_000 and not inline(many) and not inline(many.encode())


def reply(frame: session_pb2.ClientFrame, gid: str) -> session_pb2.ServerFrame:
    answer = session_pb2.ServerFrame(id=gid)
    answer.tools_list.count = 0
    return answer


def test_requests_decoded_elsewhere_bring_the_gateway_ids_set_aside_for_them() -> None:
    bridge = Bridge()
    [before] = bridge.from_client('{"id":"a","method":"tools.list"}').frames
    first = bridge.reserve_ids(1000)
    batch = [
        {"id": 1, "method": "tools.list"},
        {"method": "agent.chat.event", "params": {"session_id": "s", "kind": "token"}},
        {"method": "tools.list"},  # a request sent as a notification still gets an id
        {"id": 2, "method": "tools.list"},
    ]
    decoded = decode(json.dumps(batch), bridge.callbacks, first)
    inbound = bridge.admit(decoded)
    ids = [f.id for f in inbound.frames]
    assert ids == [str(first), "", str(first + 1), str(first + 2)]
    [after] = bridge.from_client('{"id":"b","method":"tools.list"}').frames
    assert int(before.id) < first and int(after.id) == first + 1000  # no id is used twice
    texts = [bridge.from_core(reply(f, f.id)) for f in inbound.frames if f.id]
    assert texts[:2] == [None, None] and texts[2] is not None
    assert sorted(e["id"] for e in json.loads(texts[2])) == [1, 2]


def big_batch() -> tuple[str, list[Any]]:
    """A frame the gateway sends to a worker, with every kind of message in it."""
    batch: list[Any] = [
        {"id": 1, "method": "state.set", "params": {"key": "k", "value": "x" * 2_000_000}},
        {"id": 2, "method": "no.such"},
        {"id": 3, "method": "tools.unregister", "params": {"name": 5}},
        {"method": "agent.chat.event", "params": {"session_id": "s", "kind": "token"}},
        {"id": "cb-1", "result": {"ok": [1, 2]}},
    ]
    return json.dumps(batch), batch


async def test_a_worker_decodes_as_the_event_loop_would() -> None:
    text, _ = big_batch()
    assert not inline(text)
    callbacks = {"cb-1": "tools.execute"}
    pool = DecoderPool(1)
    try:
        for frame in (text, text.encode()):  # a text frame, and JSON in a binary frame
            remote = await pool.decode(frame, callbacks, 7)
            local = decode(text, callbacks, 7)
            assert [m.reply for m in remote.messages] == [m.reply for m in local.messages]
            for r, m in zip(remote.messages, local.messages, strict=True):
                if m.frame is None:
                    assert r.frame is None
                    continue
                assert isinstance(r.frame, bytes) and isinstance(m.frame, session_pb2.ClientFrame)
                assert session_pb2.ClientFrame.FromString(r.frame) == m.frame
                assert (r.gid, r.notice, r.answer_to) == (m.gid, m.notice, m.answer_to)
            assert remote.batch and remote.messages[0].gid == "7"
        assert pool.workers == 1  # one worker, reused
    finally:
        await stopped(pool.stop())
    assert pool.workers == 0


async def test_a_frame_that_takes_too_long_fails_and_its_worker_is_killed() -> None:
    heavy = json.dumps({"id": 1, "method": "no.such", "params": [{"k": 1}] * 2_000_000})
    pool = DecoderPool(1, timeout=0.05)
    try:
        with pytest.raises(DecodeFailed, match=r"took more than 0\.05s"):
            await pool.decode(heavy, {}, 1)
        assert pool.workers == 0
        pool.timeout = 30
        decoded = await pool.decode(heavy, {}, 1)  # a fresh worker
        [message] = decoded.messages
        assert message.reply is not None
        assert json.loads(message.reply)["error"]["code"] == METHOD_NOT_FOUND
    finally:
        await stopped(pool.stop())


async def test_a_worker_that_grew_large_retires_after_its_frame() -> None:
    text, _ = big_batch()
    pool = DecoderPool(1, retire_rss=1)  # any worker is "large"
    try:
        for _ in range(2):
            decoded = await pool.decode(text, {}, 1)
            assert json.loads(decoded.messages[2].reply or "")["error"]["code"] == INVALID_PARAMS
            assert pool.workers == 0  # gone after each frame; the next one starts afresh
    finally:
        await stopped(pool.stop())


async def test_a_stopped_pool_decodes_nothing() -> None:
    pool = DecoderPool(1)
    await stopped(pool.stop())
    with pytest.raises(DecodeFailed, match="stopping"):
        await pool.decode("[1]", {}, 1)


def test_a_frame_that_could_not_be_decoded_gets_32603_with_id_null() -> None:
    inbound = Bridge().admit(decoder.failed("decoding the frame took more than 60s"))
    assert [json.loads(t) for t in inbound.replies] == [
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32603,
                "message": "internal error: decoding the frame took more than 60s",
            },
        }
    ]
    assert isinstance(decoder.failed("x"), Decoded)
