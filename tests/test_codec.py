"""Unit tests of the JSON <-> proto mapping (rules in proto/car/v1/options.proto)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from car_grpc.v1 import chats_pb2, runs_pb2, state_pb2, tools_pb2
from car_grpc.wire import codec
from car_grpc.wire.codec import CodecError

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_free_form_json_round_trips_exactly(data: Any) -> None:
    value = codec.to_value(data)
    out = codec.value_to_json(value)
    assert json.dumps(out, sort_keys=True) == json.dumps(data, sort_keys=True)


def test_snake_case_keys_and_presence() -> None:
    result = tools_pb2.ActionResult(action_id="a", status=tools_pb2.ACTION_STATUS_FAILED)
    out = codec.message_to_json(result)
    # Non-optional scalars always written, optional ones only when set.
    assert out == {"action_id": "a", "status": "failed", "duration_ms": 0, "timestamp": 0}
    result.error = "boom"
    result.rolled_back = False
    out = codec.message_to_json(result)
    assert out["error"] == "boom"
    assert out["rolled_back"] is False


def test_int64_is_a_json_number() -> None:
    out = codec.message_to_json(runs_pb2.RunSummary(started_at=1_700_000_000_123))
    assert out["started_at"] == 1_700_000_000_123


def test_enums_by_short_lowercase_name_and_unspecified_omitted() -> None:
    msg = state_pb2.PolicyDefinition(name="p", kind=state_pb2.POLICY_KIND_DENY_TOOL_PARAM)
    out = codec.message_to_json(msg)
    assert out["kind"] == "deny_tool_param"
    assert "rule" not in out  # unspecified enum never written
    back = state_pb2.PolicyDefinition()
    codec.json_to_message({"name": "p", "rule": "require_state"}, back)
    assert back.rule == state_pb2.POLICY_KIND_REQUIRE_STATE


def test_unknown_enum_value_names_the_field_and_the_choices() -> None:
    req = tools_pb2.SubmitProposalRequest()
    with pytest.raises(CodecError) as err:
        codec.json_to_message({"proposal": {"actions": [{"id": "a", "type": "nope"}]}}, req)
    assert err.value.path == "proposal.actions[0].type"
    assert "tool_call" in str(err.value)


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"key": 5}, "key", "expected a string"),
        ([], "", "expected an object"),
    ],
)
def test_wrong_types_name_the_field(data: Any, path: str, reason: str) -> None:
    with pytest.raises(CodecError) as err:
        codec.json_to_message(data, state_pb2.GetStateRequest())
    assert err.value.path == path
    assert reason in err.value.reason


def test_integer_range_and_kind_checked() -> None:
    with pytest.raises(CodecError, match=r"turns\[0\]\.index: out of range"):
        codec.json_to_message({"turns": [{"index": -1}]}, runs_pb2.RecordTurnsRequest())
    with pytest.raises(CodecError, match="expected an integer"):
        codec.json_to_message({"turns": [{"index": 1.5}]}, runs_pb2.RecordTurnsRequest())
    with pytest.raises(CodecError, match="expected an integer"):
        codec.json_to_message({"turns": [{"index": True}]}, runs_pb2.RecordTurnsRequest())
    msg = runs_pb2.RecordTurnsRequest()
    codec.json_to_message({"turns": [{"index": 2.0}]}, msg)
    assert msg.turns[0].index == 2


def test_null_reads_as_absent_except_for_free_form_values() -> None:
    msg = runs_pb2.RunTurn()
    codec.json_to_message({"prompt": None, "output": None}, msg)
    assert not msg.HasField("prompt")
    assert msg.HasField("output")
    assert codec.message_to_json(msg)["output"] is None


def test_inline_struct_collects_unknown_keys_and_writes_them_flat() -> None:
    data = {"session_id": "s", "kind": "token", "delta": "hi", "extra_key": {"n": [1, None]}}
    msg = chats_pb2.AgentChatEventNotice()
    codec.json_to_message(data, msg)
    assert msg.event.kind == "token"
    assert set(msg.event.extra.fields) == {"extra_key"}  # session_id is the parent's
    assert codec.message_to_json(msg) == data


def test_inline_message_fields_are_flat() -> None:
    record = runs_pb2.RunRecord(record=runs_pb2.RUN_RECORD_KIND_TURN, timestamp=7)
    record.turn.index = 0
    record.turn.prompt = "p"
    assert codec.message_to_json(record) == {
        "record": "turn",
        "timestamp": 7,
        "index": 0,
        "prompt": "p",
    }
    policy = state_pb2.RegisterPolicyRequest()
    codec.json_to_message({"name": "n", "kind": "deny_tool", "target": "rm"}, policy)
    assert policy.policy.target == "rm"


def test_bare_params_and_results() -> None:
    req = tools_pb2.RegisterToolsRequest()
    codec.params_to_message([{"name": "a"}, {"name": "b"}], req, "tools")
    assert [t.name for t in req.tools] == ["a", "b"]
    with pytest.raises(CodecError, match="tools: expected an array"):
        codec.params_to_message({"name": "a"}, tools_pb2.RegisterToolsRequest(), "tools")
    assert codec.message_to_result(tools_pb2.RegisterToolsResponse(count=2), "count") == 2
    got = state_pb2.GetStateResponse()
    assert codec.message_to_result(got, "value") is None  # unset bare Value reads as null
    got.value.CopyFrom(codec.to_value({"a": [1, 2]}))
    assert codec.message_to_result(got, "value") == {"a": [1, 2]}


def test_absent_params_read_as_empty_object() -> None:
    msg = tools_pb2.ListToolsRequest()
    codec.params_to_message(None, msg, "")
    assert msg == tools_pb2.ListToolsRequest()
