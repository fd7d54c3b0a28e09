"""The codec as it was before compilation (car_grpc/wire/codec.py at f91b770): the plan of each
message type walked for every message. Kept as the reference that the compiled converters
of car_grpc.wire.codec are checked against (tests/test_codec_compiled.py): the same
messages, errors, dicts and bytes on every input. Unchanged but for what the codec learnt
since, beside it (the two JSON forms of `json_with` / `json_without`, options.proto).
Never imported by car_grpc. What
compilation left unchanged (Struct values, enums, the plan of a message type, the error)
is imported from the codec rather than copied.
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from car_grpc.wire.codec import (
    CodecError,
    _enum_type,
    _join,
    _message_type,
    _plan,
    enum_names,
    enum_to_json,
    json_to_struct,
    json_to_value,
    struct_to_json,
    to_value,
    value_to_json,
)

#: The unchanged parts, taken from the codec, that the tests use from here as well.
__all__ = ["CodecError", "_plan", "json_to_struct", "json_to_value", "to_value", "value_to_json"]

JSON = Any  # any value json.loads can produce

_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_LIST = struct_pb2.ListValue.DESCRIPTOR.full_name

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


# ---------------------------------------------------------------- free-form JSON


# ---------------------------------------------------------------- enums


# ---------------------------------------------------------------- message plans


# ---------------------------------------------------------------- message -> JSON


def message_to_json(msg: Message) -> dict[str, JSON]:
    """The JSON object of a message, following the rules of options.proto."""
    out: dict[str, JSON] = {}
    _write(msg, out)
    return out


def _write(msg: Message, out: dict[str, JSON]) -> None:
    for f in _plan(msg.DESCRIPTOR).fields:
        if f.form_of and msg.HasField(f.form_of) != f.form_when_set:
            continue  # a field of the message's other JSON form (json_with / json_without)
        if f.presence and not msg.HasField(f.name):
            if f.form_of and f.form_when_set:
                out[f.key] = None  # json_with: always in its form, null when unset
            continue
        value = getattr(msg, f.name)
        if f.is_enum and not f.repeated and value == 0:
            continue  # _UNSPECIFIED is never written
        if f.inline:
            if f.wkt == _STRUCT:
                for k, v in value.fields.items():
                    out.setdefault(k, value_to_json(v))
            else:
                _write(value, out)
            continue
        out[f.key] = field_to_json(f.fd, value, f.repeated)


def field_to_json(fd: FieldDescriptor, value: Any, repeated: bool = False) -> JSON:
    """The JSON of one field's value (the whole list for a repeated field)."""
    if repeated:
        return [_single_to_json(fd, v) for v in value]
    return _single_to_json(fd, value)


def _single_to_json(fd: FieldDescriptor, value: Any) -> JSON:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        name = _message_type(fd).full_name
        if name == _VALUE:
            return value_to_json(value)
        if name == _STRUCT:
            return struct_to_json(value)
        if name == _LIST:
            return [value_to_json(v) for v in value.values]
        return message_to_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return enum_to_json(_enum_type(fd), value)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        raise TypeError(f"{fd.full_name}: bytes fields have no JSON mapping here")
    return value


# ---------------------------------------------------------------- JSON -> message


def json_to_message(data: JSON, msg: Message, path: str = "") -> None:
    """Fill `msg` from a JSON object. Raises CodecError naming the offending field."""
    if not isinstance(data, dict):
        raise CodecError(path, "expected an object")
    _read(data, msg, path, frozenset())


def _read(data: dict[str, JSON], msg: Message, path: str, outer: frozenset[str]) -> None:
    """Read `msg` from `data`; `outer` holds keys taken by enclosing (inlining) messages."""
    plan = _plan(msg.DESCRIPTOR)
    for f in plan.fields:
        if f.inline:
            continue
        if f.key not in data:
            continue
        item = data[f.key]
        fpath = _join(path, f.key)
        if item is None and f.wkt != _VALUE:
            continue  # null reads as absent
        if f.repeated:
            if not isinstance(item, list):
                raise CodecError(fpath, "expected an array")
            target = getattr(msg, f.name)
            for i, element in enumerate(item):
                _read_repeated_element(f.fd, target, element, f"{fpath}[{i}]")
        else:
            _read_single(f.fd, msg, item, fpath)
    for f in plan.inline_messages:
        sub = _plan(_message_type(f.fd))
        taken = outer | plan.known_keys
        if any(k in data for k in sub.known_keys) or (
            sub.rest is not None and any(k not in sub.known_keys | taken for k in data)
        ):
            if f.fd.containing_oneof is not None and msg.WhichOneof(f.fd.containing_oneof.name):
                continue  # an earlier member of the same oneof took the keys
            child = getattr(msg, f.name)
            child.SetInParent()
            _read(data, child, path, taken)
    if plan.rest is not None:
        rest = getattr(msg, plan.rest.name)
        for key, item in data.items():
            if key not in plan.known_keys and key not in outer:
                json_to_value(item, rest.fields[key], _join(path, key))


def _read_single(fd: FieldDescriptor, msg: Message, item: JSON, path: str) -> None:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        child = getattr(msg, fd.name)
        _read_message_value(fd, child, item, path)
        return
    setattr(msg, fd.name, _scalar(fd, item, path))


def _read_repeated_element(fd: FieldDescriptor, target: Any, item: JSON, path: str) -> None:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        _read_message_value(fd, target.add(), item, path)
    else:
        target.append(_scalar(fd, item, path))


def _read_message_value(fd: FieldDescriptor, child: Any, item: JSON, path: str) -> None:
    name = _message_type(fd).full_name
    if name == _VALUE:
        json_to_value(item, child, path)
    elif name == _STRUCT:
        json_to_struct(item, child, path)
    elif name == _LIST:
        if not isinstance(item, list):
            raise CodecError(path, "expected an array")
        child.SetInParent()
        for i, element in enumerate(item):
            json_to_value(element, child.values.add(), f"{path}[{i}]")
    else:
        if not isinstance(item, dict):
            raise CodecError(path, "expected an object")
        child.SetInParent()
        _read(item, child, path, frozenset())


def _scalar(fd: FieldDescriptor, item: JSON, path: str) -> Any:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        if not isinstance(item, str):
            raise CodecError(path, "expected a string")
        return item
    if t == FieldDescriptor.TYPE_BOOL:
        if not isinstance(item, bool):
            raise CodecError(path, "expected a boolean")
        return item
    if t == FieldDescriptor.TYPE_ENUM:
        names = enum_names(_enum_type(fd))[1]
        if not isinstance(item, str) or item not in names:
            allowed = ", ".join(sorted(names))
            raise CodecError(path, f"expected one of: {allowed}")
        return names[item]
    if t in _FLOATS:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise CodecError(path, "expected a number")
        return float(item)
    if t in _INT_RANGES:
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise CodecError(path, "expected an integer")
        low, high = _INT_RANGES[t]
        if not low <= item <= high:
            raise CodecError(path, f"out of range ({low}..{high})")
        return item
    raise CodecError(path, f"unsupported field type {t}")


# ---------------------------------------------------------------- bare params / results


def params_to_message(data: JSON, msg: Message, bare_field: str) -> None:
    """Fill a request or notification message from JSON-RPC params.

    Absent params read as an empty object. With `bare_field`, the whole params value is
    that field's value (e.g. the bare array of tools.register).
    """
    if bare_field:
        fd = msg.DESCRIPTOR.fields_by_name[bare_field]
        if data is None and fd.is_repeated:
            return
        json_to_message({bare_field: data}, msg)
        return
    json_to_message({} if data is None else data, msg)


def message_to_result(msg: Message, bare_field: str) -> JSON:
    """The JSON-RPC result of a response message."""
    if bare_field:
        fd = cast(FieldDescriptor, msg.DESCRIPTOR.fields_by_name[bare_field])
        if fd.has_presence and not msg.HasField(bare_field):
            return None
        return field_to_json(fd, getattr(msg, bare_field), fd.is_repeated)
    return message_to_json(msg)
