"""The compiled codec against the reference (tests/codec_reference.py, the descriptor walker
it replaced), on random messages and random JSON of every frame member's type: the same
dicts, the same JSON text (byte for byte, as the gateway writes it), the same messages read,
and the same errors (type, field path, reason) where the input does not fit."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given, settings
from hypothesis import strategies as st

from car_grpc.core.session import notification_bytes
from car_grpc.gateway import jsonrpc
from car_grpc.v1 import chats_pb2, options_pb2, runs_pb2, session_pb2
from car_grpc.wire import api, codec, twins
from tests import codec_reference as reference

MEMBERS = [*api.CLIENT_MEMBERS.values(), *api.SERVER_MEMBERS.values()]
TYPES = sorted({m.message.full_name: m.message for m in MEMBERS}.items())

#: Strings that json escapes in ASCII mode: controls, DEL, quotes, non-ASCII, astral.
TEXT = st.text(
    st.characters(min_codepoint=0, max_codepoint=0x1F600, exclude_categories=["Cs"]),
    max_size=6,
) | st.sampled_from(["", "a", '"', "\\", "\x7f", "\n", "é", "😀", "/", "\u2028"])
NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from([0.0, -0.0, 1e16, 1e-7, 2.0**53, 2.0**53 + 2, 1e308, 0.1])
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)


def _text(data: Any) -> str:
    """A JSON value as text, key order and NaN included (for comparing two values)."""
    return json.dumps(data, ensure_ascii=True)


def _outcome(convert: Any, *args: Any) -> tuple[str, str]:
    """What a conversion gives: ('ok', its text) or (exception type, message)."""
    try:
        result = convert(*args)
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)
    return "ok", result if isinstance(result, str) else _text(result)


# ------------------------------------------------------------------ random messages


def _set_scalar(draw: Any, msg: Message, fd: FieldDescriptor, repeated: bool) -> None:
    t = fd.type
    values: st.SearchStrategy[Any]
    if t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        numbers = [v.number for v in fd.enum_type.values]
        values = st.sampled_from(numbers) | st.integers(min_value=0, max_value=40)
    elif t == FieldDescriptor.TYPE_STRING:
        values = TEXT
    elif t == FieldDescriptor.TYPE_BOOL:
        values = st.booleans()
    elif t == FieldDescriptor.TYPE_DOUBLE:
        values = st.floats()
    elif t == FieldDescriptor.TYPE_FLOAT:
        values = st.floats(width=32)
    elif t == FieldDescriptor.TYPE_BYTES:
        values = st.binary(max_size=3)
    else:
        low, high = codec._INT_RANGES[t]
        values = st.integers(min_value=low, max_value=high)
    try:
        if repeated:
            getattr(msg, fd.name).extend(draw(st.lists(values, max_size=3)))
        else:
            setattr(msg, fd.name, draw(values))
    except ValueError:
        pass  # a closed enum's unknown number


def _fill(draw: Any, msg: Message, depth: int) -> Message:
    """Set a random subset of the message's fields (nested messages up to `depth`)."""
    desc: Any = msg.DESCRIPTOR
    for fd in desc.fields:
        # The bridge's own fields are no part of the JSON the reference writes: the texts
        # in them are the core's, tested against the codec in test_turn_text.py.
        if fd.GetOptions().Extensions[options_pb2.json_internal] or not draw(st.booleans()):
            continue
        repeated = fd.is_repeated
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            _set_scalar(draw, msg, fd, repeated)
            continue
        assert fd.message_type is not None
        name = fd.message_type.full_name
        if name in ("google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue"):
            value = draw(JSON.filter(functools.partial(_fits, name)))
            for target in [getattr(msg, fd.name).add()] if repeated else [getattr(msg, fd.name)]:
                _free_form(name, value, target)
            continue
        if depth == 0:
            continue
        for _ in range(draw(st.integers(min_value=0, max_value=2)) if repeated else 1):
            child = getattr(msg, fd.name).add() if repeated else getattr(msg, fd.name)
            child.SetInParent()
            _fill(draw, child, depth - 1)
    return msg


def _fits(name: str, value: Any) -> bool:
    def finite(v: Any) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list):
            return all(finite(x) for x in v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        return True

    shape = {"google.protobuf.Struct": dict, "google.protobuf.ListValue": list}.get(name, object)
    return isinstance(value, shape) and finite(value)


def _free_form(name: str, value: Any, target: Any) -> None:
    if name == "google.protobuf.Struct":
        reference.json_to_struct(value, target)
    elif name == "google.protobuf.ListValue":
        target.CopyFrom(reference.to_value(value).list_value)
    else:
        reference.json_to_value(value, target)
    # Numbers as a gRPC client may send them: non-finite too (written as null).


@st.composite
def messages(draw: Any) -> Message:
    _, desc = draw(st.sampled_from(TYPES))
    return _fill(draw, GetMessageClass(desc)(), depth=2)


# ------------------------------------------------------------------ proto -> JSON


@settings(max_examples=400, deadline=None)
@given(messages())
def test_message_to_json_and_text_are_the_reference_exactly(msg: Message) -> None:
    expected = _outcome(reference.message_to_json, msg)
    assert _outcome(codec.message_to_json, msg) == expected
    # The text is what the gateway's encoder writes of the reference dict, byte for byte
    # (ASCII escapes, float repr, NaN refused), or the same ValueError.
    assert _outcome(codec.message_to_text, msg) == _outcome(
        lambda m: jsonrpc.dumps(reference.message_to_json(m)), msg
    )


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_results_of_bare_fields_are_the_reference_exactly(data: st.DataObject) -> None:
    member = data.draw(st.sampled_from([m for m in MEMBERS if m.bare_field]))
    msg = _fill(data.draw, GetMessageClass(member.message)(), depth=2)
    bare = member.bare_field
    assert _outcome(codec.message_to_result, msg, bare) == _outcome(
        reference.message_to_result, msg, bare
    )
    assert _outcome(codec.result_to_text, msg, bare) == _outcome(
        lambda m, b: jsonrpc.dumps(reference.message_to_result(m, b)), msg, bare
    )


@settings(max_examples=100, deadline=None)
@given(JSON.filter(lambda v: _fits("google.protobuf.Value", v)), st.floats())
def test_free_form_text_is_the_reference_exactly(value: Any, number: float) -> None:
    v = reference.to_value(value)
    assert codec.value_to_text(v) == jsonrpc.dumps(reference.value_to_json(v))
    n = struct_pb2.Value(number_value=number)  # NaN and Infinity (a gRPC client's) too
    assert codec.value_to_text(n) == jsonrpc.dumps(reference.value_to_json(n))
    # A double field (none in the frames yet) as the encoder writes a float, NaN refused.
    double = struct_pb2.Value.DESCRIPTOR.fields_by_name["number_value"]
    assert _outcome(codec.field_to_text, double, number) == _outcome(jsonrpc.dumps, number)


@settings(max_examples=200, deadline=None)
@given(messages(), st.sampled_from([None, 7, -1, 2**70, 1.5, "id", "é\x7f"]))
def test_gateway_frames_from_the_core_are_the_reference_text(msg: Message, client_id: Any) -> None:
    """Notifications and answers as the gateway writes them, against dumps() of the JSON-RPC
    object built from the reference's payload (what from_core did before)."""
    for name, m in api.SERVER_MEMBERS.items():
        if m.message.full_name != msg.DESCRIPTOR.full_name or m.kind != api.NOTIFICATION:
            continue
        frame = session_pb2.ServerFrame()
        getattr(frame, name).CopyFrom(msg)
        # The reference reads the frame's copy: a copy may list a map's keys in another
        # order than its source (upb), and JSON text keeps the order it is given.
        sent = getattr(frame, name)
        try:
            expected: str | None = jsonrpc.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": m.method,
                    "params": reference.message_to_result(sent, m.bare_field),
                }
            )
        except ValueError:
            expected = None  # dropped (logged)
        assert jsonrpc.Bridge().from_core(frame) == expected
    outcome, result = _outcome(codec.message_to_text, msg)
    if outcome == "ok":
        expected = jsonrpc.response(client_id, reference.message_to_json(msg))
        assert jsonrpc._response_text(client_id, result) == expected


# ------------------------------------------------------------------ JSON -> proto


def _read(module: Any, desc: Any, data: Any) -> tuple[str, str]:
    msg = GetMessageClass(desc)()
    try:
        module.json_to_message(data, msg, "params")
    except (ValueError, TypeError) as e:
        detail = (
            (e.path, e.reason) if isinstance(e, codec.CodecError | reference.CodecError) else ()
        )
        return type(e).__name__, f"{e} {detail}"
    return "ok", msg.SerializeToString(deterministic=True).hex()


def _keys(desc: Descriptor) -> list[str]:
    return sorted(reference._plan(desc).known_keys)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_json_to_message_is_the_reference_exactly(data: st.DataObject) -> None:
    """Random objects over each type's own keys (and others), with values of every JSON
    type: the same message, or the same error at the same path."""
    _, desc = data.draw(st.sampled_from(TYPES))
    keys = st.sampled_from(_keys(desc)) | TEXT if _keys(desc) else TEXT
    obj = data.draw(st.dictionaries(keys, JSON, max_size=5))
    assert _read(codec, desc, obj) == _read(reference, desc, obj)


@settings(max_examples=400, deadline=None)
@given(messages(), st.data())
def test_json_of_messages_reads_back_as_the_reference_reads_it(
    msg: Message, data: st.DataObject
) -> None:
    """Valid JSON (a message's own) and the same with one member replaced, dropped or
    added: mostly fits, so the deeper fields are read too."""
    try:
        obj = reference.message_to_json(msg)
    except TypeError:  # a bytes field (no JSON mapping): the other changes still apply
        obj = {}
    change = data.draw(st.sampled_from(["none", "replace", "drop", "add", "null"]))
    if obj and change in ("replace", "drop", "null"):
        key = data.draw(st.sampled_from(sorted(obj)))
        if change == "drop":
            del obj[key]
        else:
            obj[key] = None if change == "null" else data.draw(JSON)
    elif change == "add":
        obj[data.draw(TEXT)] = data.draw(JSON)
    desc = msg.DESCRIPTOR
    assert _read(codec, desc, obj) == _read(reference, desc, obj)


def test_a_chat_token_reads_and_writes_as_before() -> None:
    """The hottest frames, spelled out: an agent's token in, the host's event out."""
    params = {"session_id": "c-1", "kind": "token", "delta": "tok é", "seq": 3}
    notice = chats_pb2.AgentChatEventNotice()
    codec.params_to_message(params, notice, "")
    expected = chats_pb2.AgentChatEventNotice()
    reference.params_to_message(params, expected, "")
    assert notice == expected and notice.event.extra.fields["seq"].number_value == 3
    out = chats_pb2.ChatEventNotice(session_id="c-1", agent_id="a", event=notice.event)
    text = '{"session_id":"c-1","agent_id":"a","kind":"token","delta":"tok \\u00e9","seq":3}'
    assert codec.message_to_text(out) == text == jsonrpc.dumps(reference.message_to_json(out))


def test_an_inline_struct_never_replaces_a_member_and_keeps_the_reference_order() -> None:
    event = chats_pb2.ChatEvent(kind="token", delta="x")
    for key, value in (("zeta", 1), ("kind", "not me"), ("session_id", "nor me"), ("a", 2.5)):
        reference.json_to_value(value, event.extra.fields[key])
    out = chats_pb2.ChatEventNotice(session_id="c-1", agent_id="a", event=event)
    expected = reference.message_to_json(out)
    assert list(codec.message_to_json(out).items()) == list(expected.items())
    assert codec.message_to_text(out) == jsonrpc.dumps(expected)
    assert expected["kind"] == "token" and expected["session_id"] == "c-1"


def test_inline_oneof_members_take_keys_in_field_order_as_the_reference() -> None:
    """A run record's detail is one of three inline messages: with keys of two, the first
    member in field order takes them and the other's keys are not read."""
    for obj in (
        {"record": "turn", "run_id": "r", "index": 2, "tool": "t"},
        {"index": 2, "status": "succeeded"},
        {"outcome": "x", "intent": "i"},
        {"timestamp": 5, "index": "not an integer", "status": 3},
    ):
        assert _read(codec, runs_pb2.RunRecord.DESCRIPTOR, obj) == _read(
            reference, runs_pb2.RunRecord.DESCRIPTOR, obj
        )


# ------------------------------------------------------------------ typed twins


def _reference_walk(msg: Message, incoming: bool) -> None:
    """wire/twins.py's walk before it was compiled: the plan walked for every message."""
    plan = twins._plan(msg.DESCRIPTOR)
    for pair in plan.pairs:
        if incoming:
            pair.fill(msg)
        pair.derive(msg)
    for name, repeated in plan.children:
        if repeated:
            for child in getattr(msg, name):
                _reference_walk(child, incoming)
        elif msg.HasField(name):
            _reference_walk(getattr(msg, name), incoming)
    for oneof, members in plan.oneofs:
        member = msg.WhichOneof(oneof)
        if member in members:
            _reference_walk(getattr(msg, member), incoming)


@settings(max_examples=300, deadline=None)
@given(messages(), st.booleans())
def test_twins_are_filled_and_derived_as_the_reference_walk(msg: Message, incoming: bool) -> None:
    """Random messages of every member type, alone and in their frame (twins set at
    random too: the typed API may set either side)."""
    frames: list[Message] = [msg]
    for frame_type, members in (
        (session_pb2.ClientFrame, api.CLIENT_MEMBERS),
        (session_pb2.ServerFrame, api.SERVER_MEMBERS),
    ):
        for name, m in members.items():
            if m.message.full_name == msg.DESCRIPTOR.full_name:
                frame = frame_type()
                getattr(frame, name).CopyFrom(msg)
                frames.append(frame)
                break
    for original in frames:
        expected, compiled = type(original)(), type(original)()
        expected.CopyFrom(original)
        compiled.CopyFrom(original)
        _reference_walk(expected, incoming)
        (twins.fill_in if incoming else twins.fill_out)(compiled)
        assert compiled.SerializeToString(deterministic=True) == expected.SerializeToString(
            deterministic=True
        )


@settings(max_examples=100, deadline=None)
@given(messages())
def test_notification_bytes_are_the_frame_built_and_filled_out(msg: Message) -> None:
    """ClientSession.notify writes a notification from its member alone: the same frame
    as one built around a copy of it, twins derived (field order and map order aside)."""
    for name, m in api.SERVER_MEMBERS.items():
        if m.message.full_name != msg.DESCRIPTOR.full_name or m.kind != api.NOTIFICATION:
            continue
        frame = session_pb2.ServerFrame()
        getattr(frame, name).CopyFrom(msg)
        expected = twins.fill_out(frame)
        written = notification_bytes(name, type(msg).FromString(msg.SerializeToString()))
        assert session_pb2.ServerFrame.FromString(written) == expected
