"""A turn's JSON written once (wire/turn_text.py): the gateway writes each turn of a
runs.record_turns as the codec would write the stored turn, and the core puts the turn's
runs.trace.event together from it for the subscribers behind car-grpc's gateway.

The text is the codec's, member for member, except that a free-form object keeps the
client's key order (the codec writes protobuf's map order); where the two could differ
otherwise no text is written and the event is converted as before. Only car-grpc's own
gateway (a ConnectMultiplexed session) is trusted with such text, both ways."""

from __future__ import annotations

import json
import random
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import ClientConnection

from car_grpc.core.run_turns import FIELD_CAP
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.gateway.jsonrpc import Bridge, decode
from car_grpc.v1 import runs_pb2, session_pb2
from car_grpc.wire import codec, turn_text
from tests import json_text_helpers as helpers
from tests import roles
from tests.runs_helpers import state_of

JSON = Any
TRACE_EVENT = "runs.trace.event"


def _codec_text(turn: JSON) -> str:
    """What the codec writes of the RunTurn read from `turn` (its index left out)."""
    message = runs_pb2.RunTurn()
    codec.json_to_message(turn, message)
    message.ClearField("index")
    return codec.message_to_text(message)


def _turn(rng: random.Random, *, plain: bool = True) -> dict[str, JSON]:
    turn: dict[str, JSON] = {}
    for key in ("prompt", "tool", "verifier_verdict"):
        if rng.random() < 0.6:
            turn[key] = helpers.random_string(rng) if rng.random() < 0.9 else None
    for key in ("parameters", "output", "cli_outcome"):
        if rng.random() < 0.6:
            turn[key] = helpers.random_json(rng, plain=plain)
    if rng.random() < 0.3:
        turn["policy_rejected"] = rng.choice([True, False, None])
    if rng.random() < 0.2:
        turn["index"] = rng.choice([0, 9, 2**32 - 1, None])
    if rng.random() < 0.1:
        turn["unknown"] = 1  # ignored, as the codec ignores it
    keys = list(turn)
    rng.shuffle(keys)  # the client's member order is its own
    return {k: turn[k] for k in keys}


def _decoded(turns: list[JSON]) -> runs_pb2.RecordTurnsRequest:
    """The request the gateway sends the core for a runs.record_turns of `turns`."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns"}
    text = json.dumps(request | {"params": {"run_id": "r", "turns": turns}})
    [message] = decode(text, {}).messages
    assert isinstance(message.frame, session_pb2.ClientFrame), message.reply
    return message.frame.runs_record_turns


def _codec_read(turns: list[JSON]) -> runs_pb2.RecordTurnsRequest:
    read = runs_pb2.RecordTurnsRequest()
    codec.params_to_message({"run_id": "r", "turns": turns}, read, "")
    return read


@pytest.mark.parametrize("plain", [True, False])
def test_the_gateway_reads_turns_as_the_codec_and_writes_their_text(plain: bool) -> None:
    rng = random.Random(16)
    turns = [_turn(rng, plain=plain) for _ in range(600)]
    exact = written = 0
    for start in range(0, len(turns), 200):
        batch = turns[start : start + 200]
        request = _decoded(batch)
        assert list(request.turns) == list(_codec_read(batch).turns)
        assert len(request.turn_texts) == len(batch)
        for turn, text in zip(batch, request.turn_texts, strict=True):
            if not text:
                continue
            written += 1
            expected = _codec_text(turn)
            assert text.isascii()
            assert json.loads(text) == json.loads(expected)
            if all(helpers.one_key_objects(v) for v in turn.values()):
                assert text == expected, turn
                exact += 1
    if plain:
        assert written == len(turns) and exact > 100
    else:
        assert 100 < written < len(turns)  # none for a turn holding a float or a large int


@pytest.mark.parametrize(
    "turn",
    [
        {"output": 1.5},  # a float: the codec writes its own digits
        {"output": 60.0},  # the codec writes 60
        {"parameters": {"n": 2**53 + 1}},  # rounded to a double by the codec
        {"cli_outcome": [-(2**60)]},
        {"prompt": "x" * (turn_text.TEXT_LIMIT + 1)},  # too long to carry twice
    ],
)
def test_no_text_where_it_could_differ(turn: JSON) -> None:
    request = _decoded([turn])
    assert list(request.turn_texts) == [""]
    assert list(request.turns) == list(_codec_read([turn]).turns)


@pytest.mark.parametrize(
    ("turn", "field"),
    [({"prompt": 5}, "turns[0].prompt"), ({"index": -1}, "turns[0].index"), (7, "turns[0]")],
)
def test_a_malformed_turn_gets_the_codecs_error(turn: JSON, field: str) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns"}
    text = json.dumps(request | {"params": {"run_id": "r", "turns": [turn]}})
    [message] = decode(text, {}).messages
    assert message.frame is None and message.reply is not None
    error = json.loads(message.reply)["error"]
    assert error["code"] == -32602 and error["data"] == {"field": field}


def _read_here(turns: list[JSON]) -> tuple[int, runs_pb2.RecordTurnsRequest]:
    request = runs_pb2.RecordTurnsRequest()
    return turn_text.read_turns({"run_id": "r", "turns": turns}, request), request


@pytest.mark.parametrize("plain", [True, False])
def test_turns_read_in_one_pass_are_the_codecs(plain: bool) -> None:
    """read_turns (the gateway's reading of runs.record_turns) gives the codec's message
    and turn_texts' texts; a turn it does not read (a float, a large integer) the codec
    reads, and the frame is then checked for depth as any other."""
    rng = random.Random(17)
    turns = [_turn(rng, plain=plain) for _ in range(400)]
    how, request = _read_here(turns)
    assert how == (turn_text.READ_FLAT if plain else turn_text.READ)
    assert list(request.turns) == list(_codec_read(turns).turns) and request.run_id == "r"
    assert list(request.turn_texts) == turn_text.turn_texts(turns)


def _nest(depth: int) -> JSON:
    """`depth` brackets, objects and arrays in turn."""
    value: JSON = "x"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


@pytest.mark.parametrize("depth", [turn_text.FLAT_NESTING - 4, turn_text.FLAT_NESTING - 3, 25, 40])
def test_turns_nested_deeper_than_flat_are_the_codecs_and_checked(depth: int) -> None:
    """A turn's free-form value opens brackets from the fifth on (message, params, turns,
    turn); up to FLAT_NESTING the frame cannot nest past the core's parser and is not
    checked, deeper the codec reads the turn and decode checks the frame's depth (40
    brackets of a turn: past upb's limit)."""
    turns = [{"prompt": "p"}, {"parameters": _nest(depth)}]
    how, request = _read_here(turns)
    flat = 4 + depth <= turn_text.FLAT_NESTING
    assert how == (turn_text.READ_FLAT if flat else turn_text.READ)
    assert list(request.turns) == list(_codec_read(turns).turns)
    params = {"run_id": "r", "turns": turns}
    text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns", "params": params})
    [message] = decode(text, {}).messages
    if depth < 40:
        assert isinstance(message.frame, session_pb2.ClientFrame), message.reply
        session_pb2.ClientFrame.FromString(message.frame.SerializeToString())  # upb reads it
    else:
        assert message.frame is None and message.reply is not None
        assert "nested more than 100 levels deep" in json.loads(message.reply)["error"]["message"]


def test_a_turn_protobuf_refuses_gets_the_codecs_error() -> None:
    """A string protobuf refuses (a lone surrogate) met before a member of the wrong type
    that the codec reads first: the codec's error, for the member it names."""
    turn = {"tool": "\ud800", "prompt": 5}
    request = {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns"}
    text = json.dumps(request | {"params": {"run_id": "r", "turns": [{"prompt": "p"}, turn]}})
    [message] = decode(text, {}).messages
    assert message.reply is not None
    assert json.loads(message.reply)["error"]["data"] == {"field": "turns[1].prompt"}


def test_keys_keep_the_clients_order() -> None:
    turn = {"parameters": {"b": 1, "a": 2, "c": 3}}
    assert list(_decoded([turn]).turn_texts) == ['{"parameters":{"b":1,"a":2,"c":3}}']
    assert json.loads(_codec_text(turn)) == turn


def test_a_client_cannot_send_the_text_itself() -> None:
    """turn_texts is the bridge's own (json_internal): never read from the client's JSON."""
    for turns in ([{"prompt": "p"}], [{"prompt": "p", "output": 1.5}]):  # text, none
        params = {"run_id": "r", "turns": turns, "turn_texts": ['{"prompt":"forged"}']}
        request = {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns", "params": params}
        [message] = decode(json.dumps(request), {}).messages
        assert isinstance(message.frame, session_pb2.ClientFrame)
        assert "forged" not in str(message.frame.runs_record_turns.turn_texts)
    event = runs_pb2.RunTraceEvent(params_text="x", run_id="r")
    assert "params_text" not in codec.message_to_json(event)


# ---------------------------------------------------------------- end to end


async def _call(ws: ClientConnection, method: str, params: JSON) -> JSON:
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": 99, "method": method, "params": params}))
    answer = json.loads(await helpers.recv_text(ws))
    assert answer["id"] == 99 and "result" in answer, answer
    return answer["result"]


def _expected_event(run_id: str, record: runs_pb2.RunRecord, cursor: int) -> str:
    """The event's text as the gateway writes it from the event's protobuf."""
    frame = session_pb2.ServerFrame()
    event = frame.runs_trace_event
    event.run_id, event.agent_id, event.cursor = run_id, "bot", cursor
    event.status = runs_pb2.RUN_STATUS_IN_PROGRESS
    event.record.CopyFrom(record)
    text = Bridge().from_core(frame)
    assert text is not None
    return text


async def test_events_behind_the_gateway_are_put_together_from_the_turns_text(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    state = state_of(core)
    token = await state.agent_tokens.add("bot")
    agent = await helpers.ws_session(gateway.url, {"agent_id": "bot", "token": token})
    host = await helpers.ws_session(gateway.url, {"host_token": state.tokens.host})
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        typed = await roles.host_role(core, channel)  # takes the events as protobuf
        run_id = (await _call(agent, "runs.start", {"intent": "i"}))["run_id"]
        await _call(host, "runs.subscribe", {"run_id": run_id})
        await typed.request("runs_subscribe", runs_pb2.SubscribeRunRequest(run_id=run_id))
        turns: list[JSON] = [
            {"prompt": "p", "parameters": {"b": 1, "a": [2, {"c": None}]}},  # keys as sent
            {"tool": "t"},  # the core adds the verdict
            {"policy_rejected": True},  # ... before policy_rejected: converted
            {"verifier_verdict": "passed", "policy_rejected": False, "index": 40},
            {},
            {"output": 2.5},  # no text: converted
            {"prompt": "é" * FIELD_CAP},  # capped by the core: converted
            {"cli_outcome": "\x7f\x00😀"},
        ]
        answer = await _call(agent, "runs.record_turns", {"run_id": run_id, "turns": turns})
        assert answer["ok"] and answer["count"] == len(turns)
        received = [await helpers.recv_text(host) for _ in turns]
        protos = [await typed.next_notification() for _ in turns]
        await typed.close()
    stored = await state.runs.store.records(run_id, 1, len(turns))
    for cursor, (text, record, proto) in enumerate(zip(received, stored, protos, strict=True), 1):
        expected = _expected_event(run_id, record, cursor)
        if cursor == 1:  # keys in the client's order (protobuf's map has its own)
            assert '"parameters":{"b":1,"a":[2,{"c":null}]}' in text
            assert json.loads(text) == json.loads(expected)
        else:
            assert text == expected
        event = proto.runs_trace_event
        assert event.record == record and event.cursor == cursor
        assert not event.HasField("params_text")  # protobuf, not text, for a typed session
    for ws in (agent, host):
        await ws.close()


async def test_text_from_a_session_not_of_the_gateway_is_ignored(
    served: tuple[Core, Gateway],
) -> None:
    """A typed client's RecordTurnsRequest.turn_texts never reaches a subscriber."""
    core, gateway = served
    state = state_of(core)
    host = await helpers.ws_session(gateway.url, {"host_token": state.tokens.host})
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        agent = await roles.agent(core, channel, "bot")
        start = runs_pb2.StartRunRequest(intent="i")
        run_id = (await agent.request("runs_start", start)).run_id
        await _call(host, "runs.subscribe", {"run_id": run_id})
        forged = runs_pb2.RecordTurnsRequest(
            run_id=run_id,
            turns=[runs_pb2.RunTurn(prompt="real")],
            turn_texts=['{"prompt":"forged"}'],
        )
        assert (await agent.request("runs_record_turns", forged)).ok
        await agent.close()
    event = json.loads(await helpers.recv_text(host))
    assert event["method"] == TRACE_EVENT
    assert event["params"]["record"]["prompt"] == "real"
    await host.close()
