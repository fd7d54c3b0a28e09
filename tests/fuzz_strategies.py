"""Hypothesis strategies for hostile input, derived from the car.v1 descriptors alone.

Nothing here names a method or a field: the JSON-RPC methods, their params and the
ClientFrame members come from car_grpc.wire.api, so a new operation is fuzzed the day its
proto lands. Three families:

- free-form JSON of every shape (`json_values`), and text/bytes that may or may not be
  JSON;
- JSON-RPC params that follow a request's message (`params_for`), mostly well-formed so
  that handlers are reached, with one field or the whole params mutated now and then;
- protobuf messages of any car.v1 type (`messages`), with values JSON cannot carry (NaN,
  unknown enum numbers, every integer in range, raw bytes), and whole ClientFrames.

`FUZZ` is the one Hypothesis profile of the fuzz tests: derandomized and without the
example database, so every run of the suite draws the same examples.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from car_grpc.v1 import errors_pb2, options_pb2, session_pb2
from car_grpc.wire import api, codec

JSON = Any

#: Derandomized, no example database, no deadline (each example talks to real sockets),
#: and no shrinking: a failing example is reported as drawn (each draw is labelled), since
#: shrinking one that hangs would take EXAMPLE_TIMEOUT per attempt.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

#: The agent the fuzzing sessions attach as, and a run it owns, kept open by the test:
#: strings drawn from this pool reach past "unknown id" checks into the handlers.
FUZZ_AGENT = "fuzz-agent"
FUZZ_RUN = "fuzz-run"
KNOWN_STRINGS = ("", FUZZ_AGENT, FUZZ_RUN, "cb-1", "name:bot", "approve", "chat-1")
#: Frame ids the fuzzer draws never contain this character; the tests' own ids do.
OWN_ID_MARK = "#"

#: Longer than the 16 KiB field cap of run turns.
long_texts = st.integers(16 * 1024, 16 * 1024 + 64).map(lambda n: "x" * n)
strings = st.sampled_from(KNOWN_STRINGS) | st.text(max_size=16) | long_texts
#: JSON strings may also hold what no protobuf string can: a lone surrogate.
json_strings = strings | st.just("\ud800")

# ------------------------------------------------------------------ free-form JSON

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_strings
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

# ------------------------------------------------------------------ JSON params of a message

#: Whether a field is set: mostly, so that requests get past "missing field" to the handler.
present = st.integers(0, 3).map(bool)

_MAX_DEPTH = 3
_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_LIST = struct_pb2.ListValue.DESCRIPTOR.full_name
_INT_RANGES = codec._INT_RANGES
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def _inline(fd: FieldDescriptor) -> bool:
    return bool(fd.GetOptions().Extensions[options_pb2.json_inline])


def _json_single(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[JSON]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return json_strings
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        names = sorted(codec.enum_names(fd.enum_type)[1])
        return st.sampled_from(names) | st.text(max_size=8) if names else st.text(max_size=8)
    if t in _FLOATS:
        return st.floats(allow_nan=False, allow_infinity=False)
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.integers(low, high) | st.integers()  # the second may be out of range
    if t == FieldDescriptor.TYPE_MESSAGE:
        assert fd.message_type is not None
        name = fd.message_type.full_name
        if name == _VALUE:
            return json_values
        if name == _STRUCT:
            return st.dictionaries(st.text(max_size=8), json_values, max_size=4)
        if name == _LIST:
            return st.lists(json_values, max_size=4)
        if depth >= _MAX_DEPTH:
            return st.just({})
        return json_object(fd.message_type, depth + 1)
    return json_values  # bytes and anything else have no JSON form: any JSON will do


@cache
def _json_field(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[JSON]:
    single = _json_single(fd, depth)
    return st.lists(single, max_size=3) if fd.is_repeated else single


@cache
def json_object(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, JSON]]:
    """A JSON object that follows `desc` (json_inline members merged into it)."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, JSON]:
        out: dict[str, JSON] = {}
        for fd in desc.fields:
            if not draw(present):
                continue
            if _inline(fd):
                assert fd.message_type is not None
                if fd.message_type.full_name == _STRUCT:  # "every other key"
                    out.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
                else:
                    out.update(draw(json_object(fd.message_type, depth)))
                continue
            # The field's JSON key (its `json_key`, e.g. A2UI's camelCase `surfaceId`).
            key = fd.GetOptions().Extensions[options_pb2.json_key] or fd.name
            out[key] = draw(_json_field(fd, depth))
        return out

    return build()


class _Missing:
    """Params left out of the request altogether."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@cache
def params_for(method: str) -> st.SearchStrategy[JSON]:
    """Params for a client request or notification `method`: well-formed most of the time,
    else with one key set to any JSON, or any JSON at all, or none."""
    member = api.CLIENT_REQUESTS.get(method) or api.CLIENT_NOTIFICATIONS[method]
    if member.bare_field:
        conforming: st.SearchStrategy[JSON] = _json_field(
            member.message.fields_by_name[member.bare_field], 0
        )
    else:
        conforming = json_object(member.message)
    names = [fd.name for fd in member.message.fields] or ["x"]

    @st.composite
    def one_mutation(draw: st.DrawFn) -> JSON:
        if member.bare_field:  # a bare array: one element of any JSON
            items = draw(st.lists(json_values, max_size=2))
            return [*items, draw(json_values)] if draw(st.booleans()) else draw(json_values)
        obj = draw(json_object(member.message))
        obj[draw(st.sampled_from(names) | st.text(max_size=6))] = draw(json_values)
        return obj

    return st.one_of(
        conforming,
        conforming,
        conforming,
        one_mutation(),
        json_values,
        st.just(MISSING),
    )


# ------------------------------------------------------------------ protobuf messages


def _value_leaves() -> st.SearchStrategy[struct_pb2.Value]:
    return st.one_of(
        st.builds(lambda: struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        st.booleans().map(lambda b: struct_pb2.Value(bool_value=b)),
        st.floats(allow_nan=False, allow_infinity=False).map(
            lambda f: struct_pb2.Value(number_value=f)
        ),
        st.sampled_from([math.nan, math.inf, -math.inf]).map(
            lambda f: struct_pb2.Value(number_value=f)  # numbers no JSON can carry
        ),
        strings.map(lambda s: struct_pb2.Value(string_value=s)),
        st.just(struct_pb2.Value()),  # no kind set at all
    )


def _list_of(values: list[struct_pb2.Value]) -> struct_pb2.Value:
    out = struct_pb2.Value()
    out.list_value.SetInParent()
    out.list_value.values.extend(values)
    return out


def _struct_of(items: dict[str, struct_pb2.Value]) -> struct_pb2.Value:
    out = struct_pb2.Value()
    out.struct_value.SetInParent()
    for key, value in items.items():
        out.struct_value.fields[key].CopyFrom(value)
    return out


proto_values: st.SearchStrategy[struct_pb2.Value] = st.recursive(
    _value_leaves(),
    lambda children: (
        st.lists(children, max_size=3).map(_list_of)
        | st.dictionaries(st.text(max_size=8), children, max_size=3).map(_struct_of)
    ),
    max_leaves=10,
)


def _proto_single(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return strings
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=48)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [v.number for v in fd.enum_type.values]
        return st.sampled_from(known) | st.integers(-(2**31), 2**31 - 1)  # open enums
    if t in _FLOATS:
        if t == FieldDescriptor.TYPE_FLOAT:
            return st.floats(width=32)
        return st.floats()
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.integers(low, high)
    assert t == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None
    name = fd.message_type.full_name
    if name == _VALUE:
        return proto_values
    if name == _STRUCT:
        return st.dictionaries(st.text(max_size=8), proto_values, max_size=3).map(
            lambda items: _struct_of(items).struct_value
        )
    if name == _LIST:
        return st.lists(proto_values, max_size=3).map(lambda vs: _list_of(vs).list_value)
    if depth >= _MAX_DEPTH:
        return st.just(None)  # present but empty
    return messages(fd.message_type, depth + 1)


@cache
def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type `desc`: each field set or not, to any value of its type."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(desc)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for fd in desc.fields:
            if not draw(present):
                continue
            single = _proto_single(fd, depth)
            if fd.is_repeated:
                target = getattr(msg, fd.name)
                for item in draw(st.lists(single, max_size=3)):
                    if fd.type == FieldDescriptor.TYPE_MESSAGE:
                        child = target.add()
                        if item is not None:
                            child.CopyFrom(item)
                    else:
                        target.append(item)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                child = getattr(msg, fd.name)
                child.SetInParent()
                item = draw(single)
                if item is not None:
                    child.CopyFrom(item)
            else:
                setattr(msg, fd.name, draw(single))
        return msg

    return build()


#: Frame ids as a client might send them (never with OWN_ID_MARK).
frame_ids = st.sampled_from(["", "1", "cb-1", "cb-2"]) | st.text(
    alphabet=st.characters(blacklist_characters=OWN_ID_MARK, codec="utf-8"), max_size=6
)

_MEMBERS = sorted(api.CLIENT_MEMBERS)


@st.composite
def client_frames(draw: st.DrawFn) -> session_pb2.ClientFrame:
    """Any ClientFrame: a request, notification, answer, error, binary member or no body."""
    frame = session_pb2.ClientFrame(id=draw(frame_ids))
    choice = draw(st.sampled_from([*_MEMBERS, "error", ""]))
    if choice == "error":
        frame.error.CopyFrom(draw(messages(errors_pb2.Error.DESCRIPTOR)))  # type: ignore[arg-type]
    elif choice:
        body = getattr(frame, choice)
        body.SetInParent()
        body.CopyFrom(draw(messages(api.CLIENT_MEMBERS[choice].message)))
    return frame


def mutate_bytes(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` cut short, with bytes flipped, or with junk spliced in."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            how = draw(st.sampled_from(["flip", "cut", "splice"]))
            at = draw(st.integers(0, max(len(out) - 1, 0)))
            if how == "flip" and out:
                out[at] ^= draw(st.integers(1, 255))
            elif how == "cut":
                del out[at:]
            else:
                out[at:at] = draw(st.binary(min_size=1, max_size=8))
        return bytes(out)

    return build()
