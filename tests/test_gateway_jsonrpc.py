"""The gateway's JSON-RPC layer, without sockets: framing, errors, batches, correlation and
the translation of every frame kind in both directions."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from car_grpc.gateway.jsonrpc import MAX_BATCH, MAX_OPEN_CALLBACKS, Bridge, Inbound, dumps
from car_grpc.v1 import errors_pb2, session_pb2, tools_pb2
from car_grpc.wire import api, codec
from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)


def send(bridge: Bridge, message: Any) -> Inbound:
    return bridge.from_client(message if isinstance(message, str) else json.dumps(message))


def strict_json(text: str) -> Any:
    """Parse as a strict peer would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def only_reply(inbound: Inbound) -> Any:
    assert not inbound.frames
    assert len(inbound.replies) == 1
    return json.loads(inbound.replies[0])


def answer_tools_list(bridge: Bridge, frame: session_pb2.ClientFrame) -> str | None:
    """What the core would answer to a tools.list frame."""
    reply = session_pb2.ServerFrame(id=frame.id)
    reply.tools_list.count = 0
    return bridge.from_core(reply)


# ------------------------------------------------------------------ framing errors


@pytest.mark.parametrize("text", ["not json", "{", '{"id": 1,}', "NaN", '{"x": Infinity}', ""])
def test_non_json_is_a_parse_error_with_null_id(text: str) -> None:
    reply = only_reply(Bridge().from_client(text))
    assert reply["id"] is None
    assert reply["error"]["code"] == PARSE_ERROR
    assert reply["error"]["message"].startswith("parse error")
    assert "data" not in reply["error"]


def test_bytes_that_are_not_utf8_are_a_parse_error() -> None:
    reply = only_reply(Bridge().from_client(b"\xff\xfe{"))
    assert reply == {"jsonrpc": "2.0", "id": None, "error": reply["error"]}
    assert reply["error"]["code"] == PARSE_ERROR


def test_absurd_nesting_is_a_parse_error() -> None:
    reply = only_reply(Bridge().from_client("[" * 100_000 + "]" * 100_000))
    assert reply["error"]["code"] == PARSE_ERROR


@pytest.mark.parametrize(
    "message",
    [5, "text", None, True, {}, {"id": 1}, {"jsonrpc": "2.0"}, {"method": 5, "id": 1}],
)
def test_json_that_is_not_a_request_is_invalid_with_null_id(message: Any) -> None:
    reply = only_reply(Bridge().from_client(json.dumps(message)))
    assert reply["id"] is None
    assert reply["error"]["code"] == INVALID_REQUEST


def test_unknown_method() -> None:
    reply = only_reply(send(Bridge(), {"jsonrpc": "2.0", "id": 9, "method": "no.such"}))
    assert reply == {
        "jsonrpc": "2.0",
        "id": 9,
        "error": {"code": METHOD_NOT_FOUND, "message": "unknown method: no.such"},
    }


def test_unknown_notification_gets_no_answer() -> None:
    inbound = send(Bridge(), {"jsonrpc": "2.0", "method": "no.such"})
    assert inbound.frames == [] and inbound.replies == []


def test_bad_params_name_the_field() -> None:
    reply = only_reply(
        send(Bridge(), {"id": 1, "method": "tools.unregister", "params": {"name": 5}})
    )
    assert reply["id"] == 1
    assert reply["error"] == {
        "code": INVALID_PARAMS,
        "message": "invalid params: expected a string: name",
        "data": {"field": "name"},
    }


def test_bad_nested_params_name_the_path() -> None:
    params = [{"name": "a"}, {"name": "b", "idempotent": "yes"}]
    reply = only_reply(send(Bridge(), {"id": 1, "method": "tools.register", "params": params}))
    assert reply["error"]["code"] == INVALID_PARAMS
    assert reply["error"]["data"] == {"field": "tools[1].idempotent"}


def test_params_of_the_wrong_shape() -> None:
    reply = only_reply(send(Bridge(), {"id": 1, "method": "state.get", "params": [1, 2]}))
    assert reply["error"]["code"] == INVALID_PARAMS
    assert reply["error"]["message"] == "invalid params: expected an object"


def test_lone_surrogate_is_invalid_params_not_a_crash() -> None:
    reply = only_reply(
        Bridge().from_client('{"id":1,"method":"state.get","params":{"key":"\\ud800"}}')
    )
    assert reply["error"]["code"] == INVALID_PARAMS


def test_params_nested_deeper_than_the_core_reads_are_refused() -> None:
    deep: Any = 1
    for _ in range(60):
        deep = {"a": deep}
    params = {"key": "k", "value": deep}
    reply = only_reply(send(Bridge(), {"id": 1, "method": "state.set", "params": params}))
    assert reply["error"]["code"] == INVALID_PARAMS
    assert "nested" in reply["error"]["message"]


def nested(depth: int) -> Any:
    """Objects `depth` levels deep: JSON reads 480 of them, the conversion to protobuf
    (two Python calls a level) cannot, and upb reads no more than 33 (3 levels each)."""
    deep: Any = 1
    for _ in range(depth):
        deep = {"a": deep}
    return deep


DEEP_PARAMS = {
    "code": INVALID_PARAMS,
    "message": "invalid params: nested more than 100 levels deep",
}


def test_params_nested_deeper_than_python_recurses_get_the_precise_error() -> None:
    params = {"key": "k", "value": nested(480)}
    reply = only_reply(send(Bridge(), {"id": 1, "method": "state.set", "params": params}))
    assert reply == {"jsonrpc": "2.0", "id": 1, "error": DEEP_PARAMS}


def test_deeply_nested_answers_to_server_requests_fail_precisely_not_the_connection() -> None:
    bridge = Bridge()
    for n in range(1, 4):
        bridge.from_core(tools_execute(f"cb-{n}"))
    [result] = send(bridge, {"id": "cb-1", "result": nested(480)}).frames
    assert result.id == "cb-1" and result.error.code == INVALID_PARAMS
    assert result.error.message == (
        "invalid answer to tools.execute: nested more than 100 levels deep"
    )
    # An error answer keeps its code and message; data the core could not read is left
    # out (deeper than upb reads, or than Python converts).
    for cb, depth in (("cb-2", 60), ("cb-3", 480)):
        error = {"code": -32000, "message": "disk gone", "data": nested(depth)}
        [failed] = send(bridge, {"id": cb, "error": error}).frames
        assert failed.id == cb and failed.error.code == -32000
        assert failed.error.message == "disk gone" and not failed.error.HasField("data")
        session_pb2.ClientFrame.FromString(failed.SerializeToString())  # upb reads it


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("\ud800", '"\\ud800"'),  # not an object: described as JSON
        ({"code": -32000, "message": "disk \udfff gone"}, "disk \\udfff gone"),
        ({"code": -32000, "message": ["\ud83d"]}, '["\\ud83d"]'),
    ],
)
def test_an_error_answer_holding_a_lone_surrogate_reaches_the_core(
    error: Any, message: str
) -> None:
    """A client's error answer with an escaped lone surrogate (valid JSON, no valid
    protobuf string): the core gets the error, its message escaped, and from_client does
    not raise."""
    bridge = Bridge()
    bridge.from_core(tools_execute("cb-1"))
    [failed] = send(bridge, {"id": "cb-1", "error": error}).frames
    assert failed.id == "cb-1" and failed.error.message == message
    session_pb2.ClientFrame.FromString(failed.SerializeToString())


def test_bad_params_of_a_notification_are_dropped_silently() -> None:
    inbound = send(Bridge(), {"method": "tools.unregister", "params": {"name": 5}})
    assert inbound.frames == [] and inbound.replies == []


# ------------------------------------------------------------------ requests and ids


@pytest.mark.parametrize("client_id", [0, 7, -3, 2**70, 1.5, -2.5e300, "abc", "", None])
def test_string_number_and_null_ids_are_echoed_exactly(client_id: Any) -> None:
    bridge = Bridge()
    inbound = send(bridge, {"jsonrpc": "2.0", "id": client_id, "method": "tools.list"})
    assert inbound.replies == []
    [frame] = inbound.frames
    text = answer_tools_list(bridge, frame)
    assert text is not None
    reply = json.loads(text)
    assert reply == {"jsonrpc": "2.0", "id": client_id, "result": {"tools": [], "count": 0}}
    assert type(reply["id"]) is type(client_id)


INVALID_ID = {
    "code": INVALID_REQUEST,
    "message": "invalid request: id must be a string, a finite number or null",
}


@pytest.mark.parametrize(
    "id_text", ['{"nested":[1,"x"]}', "{}", "[1,2]", "[]", "1e400", "-1e400", "true", "false"]
)
def test_object_array_boolean_and_non_finite_ids_are_invalid_with_null_id(id_text: str) -> None:
    bridge = Bridge()
    text = '{"jsonrpc":"2.0","id":' + id_text + ',"method":"tools.list"}'
    inbound = bridge.from_client(text)
    assert inbound.frames == [] and bridge.open_requests == 0  # nothing reached the core
    [reply] = inbound.replies
    assert strict_json(reply) == {"jsonrpc": "2.0", "id": None, "error": INVALID_ID}


def test_an_invalid_id_in_a_batch_spoils_only_its_entry() -> None:
    bridge = Bridge()
    inbound = bridge.from_client(
        '[{"id":1e999,"method":"tools.list"},{"id":{"a":1},"method":"no.such"},'
        '{"id":2,"method":"tools.list"}]'
    )
    [frame] = inbound.frames
    text = answer_tools_list(bridge, frame)
    assert text is not None
    entries = strict_json(text)
    assert [e["id"] for e in entries] == [None, None, 2]
    assert [e["error"] for e in entries[:2]] == [INVALID_ID, INVALID_ID]


def test_non_finite_numbers_from_the_core_are_sent_as_null() -> None:
    """The choice for a NaN or Infinity inside a Value from the core: JSON null (codec),
    so the frame stays strict JSON; nothing else changes."""
    bridge = Bridge()
    [frame] = send(bridge, {"id": 5, "method": "state.get", "params": {"key": "k"}}).frames
    reply = session_pb2.ServerFrame(id=frame.id)
    values = reply.state_get.value.list_value.values
    for number in (math.nan, math.inf, -math.inf, 1.5):
        values.add().number_value = number
    text = bridge.from_core(reply)
    assert text is not None
    assert strict_json(text) == {"jsonrpc": "2.0", "id": 5, "result": [None, None, None, 1.5]}


def test_the_encoder_refuses_nan_and_infinity() -> None:
    for number in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            dumps({"x": [number]})


def test_integer_ids_stay_integers_on_the_wire() -> None:
    bridge = Bridge()
    [frame] = send(bridge, {"id": 3, "method": "tools.list"}).frames
    text = answer_tools_list(bridge, frame)
    assert text is not None and '"id":3,' in text


def test_request_without_params_still_selects_its_member() -> None:
    [frame] = send(Bridge(), {"id": 1, "method": "tools.list"}).frames
    assert frame.WhichOneof("body") == "tools_list"


def test_gateway_ids_are_fresh_even_when_client_ids_repeat() -> None:
    bridge = Bridge()
    first = send(bridge, {"id": 1, "method": "tools.list"}).frames[0]
    second = send(bridge, {"id": 1, "method": "tools.list"}).frames[0]
    assert first.id and second.id and first.id != second.id
    assert bridge.open_requests == 2
    answer_tools_list(bridge, second)
    answer_tools_list(bridge, first)
    assert bridge.open_requests == 0


def test_bare_array_params_and_bare_result() -> None:
    bridge = Bridge()
    params = [{"name": "add", "parameters": {"type": "object"}}]
    [frame] = send(bridge, {"id": "r", "method": "tools.register", "params": params}).frames
    assert [t.name for t in frame.tools_register.tools] == ["add"]
    assert codec.struct_to_json(frame.tools_register.tools[0].parameters) == {"type": "object"}
    reply = session_pb2.ServerFrame(id=frame.id)
    reply.tools_register.count = 1
    text = bridge.from_core(reply)
    assert text is not None and json.loads(text)["result"] == 1


def test_free_form_json_round_trips_exactly() -> None:
    bridge = Bridge()
    value = {"n": 1, "f": 2.5, "neg": -7, "s": "é", "null": None, "list": [True, {"x": []}]}
    [frame] = send(
        bridge, {"id": 1, "method": "state.set", "params": {"key": "k", "value": value}}
    ).frames
    assert codec.value_to_json(frame.state_set.value) == value
    reply = session_pb2.ServerFrame(id="nope")
    reply.state_get.value.CopyFrom(codec.to_value(value))
    reply.id = frame.id
    text = bridge.from_core(reply)
    assert text is not None and json.loads(text)["result"] == value
    assert text.isascii()  # non-ASCII is escaped: the connection sizes frames by len()


def test_core_errors_keep_code_message_and_data() -> None:
    bridge = Bridge()
    [frame] = send(bridge, {"id": 4, "method": "tools.list"}).frames
    error = errors_pb2.Error(code=-32003, message="approval denied")
    error.data.CopyFrom(codec.to_value({"approval_id": "a1"}))
    text = bridge.from_core(session_pb2.ServerFrame(id=frame.id, error=error))
    assert text is not None
    assert json.loads(text)["error"] == {
        "code": -32003,
        "message": "approval denied",
        "data": {"approval_id": "a1"},
    }


def test_core_errors_without_data_have_no_data_key() -> None:
    bridge = Bridge()
    [frame] = send(bridge, {"id": 4, "method": "tools.list"}).frames
    error = errors_pb2.Error(code=INTERNAL, message="boom")
    text = bridge.from_core(session_pb2.ServerFrame(id=frame.id, error=error))
    assert text is not None and json.loads(text)["error"] == {"code": INTERNAL, "message": "boom"}


def test_auth_required_marks_the_connection_for_closing() -> None:
    bridge = Bridge()
    [frame] = send(bridge, {"id": 2, "method": "server.handshake"}).frames
    error = errors_pb2.Error(code=AUTH_REQUIRED, message="auth required: call session.auth first")
    assert not bridge.auth_refused
    text = bridge.from_core(session_pb2.ServerFrame(id=frame.id, error=error))
    assert text is not None and json.loads(text)["error"]["code"] == AUTH_REQUIRED
    assert bridge.auth_refused


def test_answers_for_unknown_gateway_ids_are_dropped() -> None:
    reply = session_pb2.ServerFrame(id="99")
    reply.tools_list.count = 0
    assert Bridge().from_core(reply) is None


def test_request_method_sent_as_notification_runs_but_is_not_answered() -> None:
    bridge = Bridge()
    [frame] = send(bridge, {"jsonrpc": "2.0", "method": "tools.list"}).frames
    assert frame.id  # the core answers every request ...
    assert answer_tools_list(bridge, frame) is None  # ... and the gateway drops it
    assert bridge.open_requests == 0


# ------------------------------------------------------------------ batches


def test_empty_batch_is_one_invalid_request_error() -> None:
    reply = only_reply(Bridge().from_client("[]"))
    assert isinstance(reply, dict)
    assert reply["id"] is None and reply["error"]["code"] == INVALID_REQUEST


def tools_lists(n: int) -> str:
    return "[" + ",".join(f'{{"id":{i},"method":"tools.list"}}' for i in range(n)) + "]"


def test_batch_of_1000_entries_is_served() -> None:
    bridge = Bridge()
    inbound = bridge.from_client(tools_lists(MAX_BATCH))
    assert MAX_BATCH == 1000
    assert len(inbound.frames) == 1000 and inbound.replies == []
    texts = [answer_tools_list(bridge, frame) for frame in inbound.frames]
    assert texts[:-1] == [None] * 999 and texts[-1] is not None
    assert sorted(e["id"] for e in json.loads(texts[-1])) == list(range(1000))


TOO_LONG = {"code": INVALID_REQUEST, "message": "invalid request: batch of more than 1000 entries"}


def test_batch_of_more_than_1000_entries_is_refused_whole() -> None:
    bridge = Bridge()
    inbound = bridge.from_client(tools_lists(1001))
    assert inbound.frames == [] and bridge.open_requests == 0
    assert only_reply(inbound) == {"jsonrpc": "2.0", "id": None, "error": TOO_LONG}


def test_a_long_batch_is_not_read_past_its_1001st_entry() -> None:
    """800,000 entries (37 MB) cost no more than 1,001: what follows is never parsed
    (here it is not even JSON, yet the answer is the batch's refusal)."""
    entry = '{"jsonrpc":"2.0","id":1,"method":"tools.list"}'
    for text in ("[" + ",".join([entry] * 800_000) + "]", tools_lists(1000)[:-1] + ",{{{"):
        assert only_reply(Bridge().from_client(text))["error"] == TOO_LONG


def test_batch_is_answered_as_one_array_when_complete() -> None:
    bridge = Bridge()
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools.list"},
        {
            "jsonrpc": "2.0",
            "method": "agent.chat.event",
            "params": {"session_id": "s", "kind": "x"},
        },
        {"jsonrpc": "2.0", "id": "two", "method": "tools.list"},
        {"jsonrpc": "2.0", "id": 3, "method": "no.such"},
        42,
    ]
    inbound = send(bridge, batch)
    assert inbound.replies == []  # waits for the two tools.list answers
    requests = [f for f in inbound.frames if f.WhichOneof("body") == "tools_list"]
    assert len(requests) == 2
    notice = [f for f in inbound.frames if f.WhichOneof("body") == "agent_chat_event"]
    assert len(notice) == 1 and notice[0].id == ""
    assert answer_tools_list(bridge, requests[1]) is None
    text = answer_tools_list(bridge, requests[0])
    assert text is not None
    entries = json.loads(text)
    assert isinstance(entries, list) and len(entries) == 4  # the notification has no entry
    by_id = {json.dumps(e["id"]): e for e in entries if e["id"] is not None}
    assert by_id["1"]["result"] == {"tools": [], "count": 0}
    assert by_id['"two"']["result"] == {"tools": [], "count": 0}
    assert by_id["3"]["error"]["code"] == METHOD_NOT_FOUND
    [invalid] = [e for e in entries if e["id"] is None]
    assert invalid["error"]["code"] == INVALID_REQUEST


def test_batch_of_errors_only_is_answered_at_once() -> None:
    inbound = send(Bridge(), [{"id": 1, "method": "no.such"}, [1]])
    assert inbound.frames == []
    [text] = inbound.replies
    entries = json.loads(text)
    assert [e["error"]["code"] for e in entries] == [METHOD_NOT_FOUND, INVALID_REQUEST]


def test_batch_of_notifications_gets_no_answer() -> None:
    bridge = Bridge()
    event = {"method": "agent.chat.event", "params": {"session_id": "s", "kind": "token"}}
    inbound = send(bridge, [event, {"method": "tools.list"}])
    assert inbound.replies == []
    [_, request] = inbound.frames
    assert answer_tools_list(bridge, request) is None


def test_abandon_fails_open_requests_and_completes_batches() -> None:
    bridge = Bridge()
    [single] = send(bridge, {"id": 1, "method": "tools.list"}).frames
    batch = send(bridge, [{"id": 2, "method": "tools.list"}, {"id": 3, "method": "tools.list"}])
    answer_tools_list(bridge, batch.frames[0])
    texts = [json.loads(t) for t in bridge.abandon("core unavailable: UNAVAILABLE")]
    assert texts[0] == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": INTERNAL, "message": "core unavailable: UNAVAILABLE"},
    }
    assert [e["id"] for e in texts[1]] == [2, 3]
    assert texts[1][1]["error"]["code"] == INTERNAL
    assert bridge.open_requests == 0
    assert single.id


# ------------------------------------------------------------------ server-initiated calls


def tools_execute(cb: str) -> session_pb2.ServerFrame:
    frame = session_pb2.ServerFrame(id=cb)
    req = frame.tools_execute
    req.action_id, req.tool, req.attempt, req.request_id = "a1", "add", 1, cb
    req.parameters.CopyFrom(codec.to_struct({"a": 1, "b": 2}))
    return frame


def test_server_request_becomes_a_json_rpc_request_with_its_cb_id() -> None:
    text = Bridge().from_core(tools_execute("cb-1"))
    assert text is not None
    assert json.loads(text) == {
        "jsonrpc": "2.0",
        "id": "cb-1",
        "method": "tools.execute",
        "params": {
            "action_id": "a1",
            "tool": "add",
            "parameters": {"a": 1, "b": 2},
            "attempt": 1,
            "request_id": "cb-1",
        },
    }


def test_client_result_becomes_the_answer_member() -> None:
    bridge = Bridge()
    bridge.from_core(tools_execute("cb-1"))
    inbound = send(bridge, {"id": "cb-1", "jsonrpc": "2.0", "result": {"sum": 3}})
    [frame] = inbound.frames
    assert inbound.replies == []
    assert frame.id == "cb-1" and frame.WhichOneof("body") == "tools_execute"
    assert codec.value_to_json(frame.tools_execute.output) == {"sum": 3}


def test_client_error_becomes_client_frame_error_with_data() -> None:
    bridge = Bridge()
    bridge.from_core(tools_execute("cb-2"))
    answer = {
        "error": {"code": -32000, "data": {"terminal": True}, "message": "disk gone"},
        "id": "cb-2",
        "jsonrpc": "2.0",
    }
    [frame] = send(bridge, answer).frames
    assert frame.id == "cb-2" and frame.WhichOneof("body") == "error"
    assert frame.error.code == -32000 and frame.error.message == "disk gone"
    assert codec.value_to_json(frame.error.data) == {"terminal": True}


def test_unknown_late_or_duplicate_answers_are_dropped() -> None:
    bridge = Bridge()
    assert send(bridge, {"id": "cb-9", "result": 1}).frames == []
    bridge.from_core(tools_execute("cb-1"))
    assert len(send(bridge, {"id": "cb-1", "result": 1}).frames) == 1
    assert send(bridge, {"id": "cb-1", "result": 1}).frames == []
    assert send(bridge, {"id": 1, "result": 1}).replies == []


def test_an_answer_that_does_not_fit_fails_the_call_at_once() -> None:
    bridge = Bridge()
    frame = session_pb2.ServerFrame(id="cb-3")
    frame.agent_chat.session_id = "chat-1"
    frame.agent_chat.prompt = "hi"
    assert bridge.from_core(frame) is not None
    [answer] = send(bridge, {"id": "cb-3", "result": {"accepted": "yes"}}).frames
    assert answer.id == "cb-3" and answer.WhichOneof("body") == "error"
    assert answer.error.code == INVALID_PARAMS
    assert answer.error.message == "invalid answer to agent.chat: expected a boolean: accepted"


def test_open_callbacks_are_bounded() -> None:
    bridge = Bridge()
    for n in range(MAX_OPEN_CALLBACKS + 1):
        bridge.from_core(tools_execute(f"cb-{n}"))
    assert send(bridge, {"id": "cb-0", "result": 1}).frames == []  # the oldest is forgotten
    assert len(send(bridge, {"id": "cb-1", "result": 1}).frames) == 1


def test_server_notification() -> None:
    frame = session_pb2.ServerFrame(
        tools_cancel=tools_pb2.CancelToolNotice(request_id="cb-2", action_id="s1", reason="timeout")
    )
    text = Bridge().from_core(frame)
    assert text is not None
    assert json.loads(text) == {
        "jsonrpc": "2.0",
        "method": "tools.cancel",
        "params": {"request_id": "cb-2", "action_id": "s1", "reason": "timeout"},
    }


def test_client_notification_becomes_a_frame_without_id() -> None:
    params = {"delta": "Hel", "kind": "token", "session_id": "chat-1"}
    inbound = send(Bridge(), {"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
    # A token's frame is written serialized (chat_text.event_frame).
    [frame] = [session_pb2.ClientFrame.FromString(data) for data in inbound.wire]
    assert inbound.replies == []
    assert frame.id == "" and frame.WhichOneof("body") == "agent_chat_event"
    assert frame.agent_chat_event.session_id == "chat-1"
    assert codec.message_to_json(frame.agent_chat_event) == params


def test_notification_method_called_with_an_id_is_forwarded_and_answered() -> None:
    params = {"kind": "done", "session_id": "chat-1"}
    inbound = send(Bridge(), {"id": 8, "method": "agent.chat.event", "params": params})
    [frame] = inbound.frames
    assert frame.WhichOneof("body") == "agent_chat_event"
    assert [json.loads(t) for t in inbound.replies] == [{"jsonrpc": "2.0", "id": 8, "result": None}]


def test_members_that_are_not_json_rpc_are_not_rendered_as_json() -> None:
    assert api.SERVER_BINARY  # e.g. voice_audio, a CAR binary frame on the WebSocket
    for member in api.SERVER_BINARY.values():
        frame = session_pb2.ServerFrame()
        getattr(frame, member.field).SetInParent()
        assert Bridge().from_core(frame) is None
