"""The gateway's frame parser (jsonrpc.parse: orjson where it reads as json does, json for
the rest) against json's own decoder: the same values (types, key order, -0.0 included),
and the same error for what json refuses, on the cases where orjson differs and on random
texts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from car_grpc.gateway import jsonrpc
from car_grpc.v1 import session_pb2


def _outcome(parse: Any, text: str) -> str:
    try:
        return "ok " + repr(parse(text))
    except RecursionError:
        return "recursion"
    except ValueError as e:
        return f"{type(e).__name__}: {e}"


def _reference(text: str) -> Any:
    return jsonrpc._decoder.decode(text)


@pytest.mark.parametrize(
    "text",
    [
        '"\\ud800"',  # a lone surrogate: json reads it, orjson refuses
        '{"a":"x\\udfff"}',
        "123456789012345678901234567890",  # past 64 bits: orjson would give a float
        "18446744073709551616",
        "-9223372036854775809",
        '{"n":18446744073709551615,"m":-9223372036854775808}',  # 64-bit bounds: ints in both
        '{"n":1.2345678901234567890}',
        "1e400",  # past the float range: json gives inf, orjson refuses
        "-1e400",
        "NaN",
        '{"a":Infinity}',
        '{"a":1,"b":2,"a":3}',  # a repeated key: the last value, the first place
        "\ufeff{}",
        "{}\x0c",
        '"\t"',
        "-0",
        "-0.0",
        '{"jsonrpc":"2.0","method":"agent.chat.event","params":{"kind":"token","delta":"é"}}',
    ],
)
def test_parse_reads_as_json_does(text: str) -> None:
    expected = _outcome(_reference, text)
    if expected == "recursion":
        expected = "ValueError: nested too deeply"
    if text.startswith("["):
        return  # arrays are batches, read entry by entry (test_gateway_jsonrpc.py)
    assert _outcome(jsonrpc.parse, text) == expected


def test_a_deep_object_is_nested_too_deeply_as_before() -> None:
    text = '{"a":' * 5000 + "1" + "}" * 5000
    assert _outcome(jsonrpc.parse, text) == "ValueError: nested too deeply"


NUMBERS = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
)
VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=4), VALUES, max_size=4), st.booleans())
def test_random_objects_read_as_json_reads_them(obj: dict[str, Any], ascii_only: bool) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only)
    assert _outcome(jsonrpc.parse, text) == _outcome(_reference, text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]":,0123456789.eE+-tfrueanlsN \\u\t\n\x00é', max_size=30))
def test_random_texts_read_or_fail_as_json(text: str) -> None:
    if text.lstrip(" \t\n\r").startswith("["):
        return  # a batch: read entry by entry by json itself
    assert _outcome(jsonrpc.parse, text) == _outcome(_reference, text)


def _nest(shape: str, levels: int) -> Any:
    deep: Any = 1
    for _ in range(levels):
        deep = {"a": deep} if shape == "object" else [deep]
    return deep


@pytest.mark.parametrize(
    ("method", "shape"),
    [("state.set", "object"), ("state.set", "array"), ("agent.chat.event", "object")],
)
def test_frames_too_flat_to_nest_past_the_core_are_not_checked_and_need_not_be(
    method: str, shape: str
) -> None:
    """decode skips the depth check (a re-parse) for frames of at most SHALLOW_BRACKETS
    `{` and `[`: the deepest such frames of the deepest shapes (free-form objects, three
    protobuf levels each; a chat event's inline members and Struct) still parse in upb."""
    levels = jsonrpc.SHALLOW_BRACKETS - 2  # the envelope and params take two
    params: dict[str, Any] = {"key": "k", "value": _nest(shape, levels)}
    if method == "agent.chat.event":
        params = {"session_id": "c", "kind": "token", "x": _nest(shape, levels)}
    text = json.dumps({"jsonrpc": "2.0", "method": method, "params": params})
    assert text.count("{") + text.count("[") == jsonrpc.SHALLOW_BRACKETS
    [message] = jsonrpc.decode(text, {}).messages
    assert isinstance(message.frame, session_pb2.ClientFrame), message.reply
    assert not jsonrpc._too_deep(message.frame)
