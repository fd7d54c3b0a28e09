"""JSON <-> protobuf for the car.v1 messages, driven by the descriptors.

The mapping rules are documented in proto/car/v1/options.proto: snake_case proto names as
keys (or a field's declared `json_key`), presence-aware omission, int64 as JSON numbers,
enum values as their lowercased name without the enum prefix (or its `json_value`),
Struct/Value as free-form JSON, `json_inline` fields merged into their parent object, and
`json_twin` fields (the typed API's enums beside a wire string, wire/twins.py) and
`json_internal` ones (the bridge's own) neither written nor read.
google.protobuf.json_format does not follow these rules (it writes int64 as strings and
enums by full name), hence this module.

Conversion plans are computed once per message type and compiled into converters (one
loop of steps specialized per field) on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from json.encoder import encode_basestring_ascii
from typing import Any, cast

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from car_grpc.v1 import options_pb2

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


class CodecError(ValueError):
    """The JSON does not fit the message. `path` names the offending field."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------- free-form JSON


def value_to_json(value: struct_pb2.Value) -> JSON:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        n = value.number_value
        if not math.isfinite(n):
            return None  # JSON has no NaN or Infinity (a gRPC client may send them): null
        # JSON has one number type; give integers back as integers.
        return int(n) if n.is_integer() and abs(n) <= 2**53 else n
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_json(value.struct_value)
    if kind == "list_value":
        return [value_to_json(v) for v in value.list_value.values]
    return None  # null_value, or unset


def struct_to_json(struct: struct_pb2.Struct) -> dict[str, JSON]:
    fields = struct.fields  # (by key: a map's items() is a Python view, ~1 us a member)
    return {k: value_to_json(fields[k]) for k in fields}


def json_to_value(data: JSON, out: struct_pb2.Value, path: str = "") -> None:
    if data is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        out.bool_value = data
    elif isinstance(data, str):
        out.string_value = data
    elif isinstance(data, int | float):
        if isinstance(data, float) and not math.isfinite(data):
            raise CodecError(path, "number must be finite")
        out.number_value = data
    elif isinstance(data, dict):
        json_to_struct(data, out.struct_value, path)
    elif isinstance(data, list):
        lst = out.list_value
        lst.SetInParent()
        for i, item in enumerate(data):
            json_to_value(item, lst.values.add(), f"{path}[{i}]")
    else:
        raise CodecError(path, f"not JSON: {type(data).__name__}")


def json_to_struct(data: JSON, out: struct_pb2.Struct, path: str = "") -> None:
    if not isinstance(data, dict):
        raise CodecError(path, "expected an object")
    out.SetInParent()
    for key, item in data.items():
        json_to_value(item, out.fields[key], _join(path, key))


def to_value(data: JSON) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_to_value(data, out)
    return out


def to_struct(data: dict[str, JSON]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    json_to_struct(data, out)
    return out


# ---------------------------------------------------------------- enums


def _enum_prefix(enum: EnumDescriptor) -> str:
    name = enum.name
    snake = "".join(("_" + c if c.isupper() and i else c) for i, c in enumerate(name))
    return snake.upper() + "_"


@cache
def enum_names(enum: EnumDescriptor) -> tuple[dict[int, str], dict[str, int]]:
    """(number -> JSON name, JSON name -> number) for an enum, e.g. 1 <-> "tool_call"."""
    prefix = _enum_prefix(enum)
    to_name: dict[int, str] = {}
    for v in enum.values:
        if v.number == 0:
            continue
        custom = v.GetOptions().Extensions[options_pb2.json_value]
        to_name[v.number] = custom or v.name.removeprefix(prefix).lower()
    return to_name, {n: num for num, n in to_name.items()}


def enum_to_json(enum: EnumDescriptor, number: int) -> str:
    return enum_names(enum)[0].get(number, "")


# ---------------------------------------------------------------- message plans


def _message_type(fd: FieldDescriptor) -> Descriptor:
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _enum_type(fd: FieldDescriptor) -> EnumDescriptor:
    assert fd.enum_type is not None, fd.full_name
    return fd.enum_type


@dataclass
class _Field:
    fd: FieldDescriptor
    name: str
    key: str  # the JSON key: the field name, or its `json_key`
    repeated: bool
    presence: bool
    inline: bool
    wkt: str  # full name of Struct/Value/ListValue, or ""
    is_enum: bool
    # `json_with` / `json_without`: the field (with presence) whose being set (True) or
    # not (False) the field's writing needs, or "" (options.proto).
    form_of: str = ""
    form_when_set: bool = True


@dataclass
class _Plan:
    fields: list[_Field]
    known_keys: frozenset[str]  # keys consumed by this message, inline members included
    rest: _Field | None  # the inline Struct that collects every other key
    inline_messages: list[_Field] = field(default_factory=list)


@cache
def _plan(desc: Descriptor) -> _Plan:
    fields: list[_Field] = []
    known: set[str] = set()
    rest: _Field | None = None
    inline_messages: list[_Field] = []
    for fd in desc.fields:
        options = fd.GetOptions()
        if (
            options.Extensions[options_pb2.json_twin]
            or options.Extensions[options_pb2.json_internal]
        ):
            continue  # the typed API's mirror of another field, or the bridge's: not on the wire
        repeated = fd.is_repeated
        wkt = ""
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            message_type = _message_type(fd)
            if message_type.GetOptions().map_entry:
                raise TypeError(f"{fd.full_name}: map fields are not supported")
            if message_type.full_name in (_STRUCT, _VALUE, _LIST):
                wkt = message_type.full_name
        inline = fd.GetOptions().Extensions[options_pb2.json_inline]
        is_enum = fd.type == FieldDescriptor.TYPE_ENUM
        key = fd.GetOptions().Extensions[options_pb2.json_key] or fd.name
        f = _Field(fd, fd.name, key, repeated, fd.has_presence, inline, wkt, is_enum)
        f.form_of, f.form_when_set = _form(desc, fd)
        fields.append(f)
        if inline and wkt == _STRUCT:
            rest = f
        elif inline:
            inline_messages.append(f)
            known |= _plan(_message_type(fd)).known_keys
        else:
            known.add(key)
    return _Plan(fields, frozenset(known), rest, inline_messages)


def _form(desc: Descriptor, fd: FieldDescriptor) -> tuple[str, bool]:
    """A field's `json_with` / `json_without` (options.proto): (the field named, whether it
    must be set), or ("", True)."""
    options = fd.GetOptions()
    with_, without = (
        options.Extensions[options_pb2.json_with],
        options.Extensions[options_pb2.json_without],
    )
    named = with_ or without
    if not named:
        return "", True
    other = desc.fields_by_name.get(named)
    if (with_ and without) or other is None or not other.has_presence or other.is_repeated:
        raise TypeError(f"{fd.full_name}: json_with/json_without name one field with presence")
    if options.Extensions[options_pb2.json_inline]:
        raise TypeError(f"{fd.full_name}: json_with/json_without on an inline field")
    return named, bool(with_)


# ---------------------------------------------------------------- compiled converters
#
# Each message type's conversion is compiled once, from its plan, into a loop over
# precomputed steps, one per field and specialized to the field's type: converting a
# frame then costs a dict lookup and an attribute access or two per field, and never
# consults the descriptors again. Converters compile lazily, on first use, through a
# _Slot, so that recursive message types compile and a type is compiled only when met.

Reader = Callable[[dict[str, JSON], Message, str], None]
Writer = Callable[[Message, dict[str, Any]], None]


class _Slot:
    """A converter compiled on first use. Callers keep the slot and call `run` each time
    (never `run` itself kept aside: before the first call it is the builder)."""

    __slots__ = ("_build", "run")

    def __init__(self, build: Callable[[], Callable[..., None]]) -> None:
        self._build = build
        self.run: Callable[..., None] = self._first

    def _first(self, *args: Any) -> None:
        if self.run == self._first:
            self.run = self._build()
        self.run(*args)


_READERS: dict[tuple[Any, frozenset[str]], _Slot] = {}
_WRITERS: dict[tuple[Any, bool], _Slot] = {}

# Descriptors are typed Any here: a message's DESCRIPTOR is typed as upb's or as the
# pure Python one, the same object at run time.


def _reader(desc: Any, outer: frozenset[str]) -> _Slot:
    """The compiled reader of `desc`, inlined where `outer` keys are already taken."""
    slot = _READERS.get((desc, outer))
    if slot is None:
        slot = _READERS[desc, outer] = _Slot(lambda: _compile_reader(desc, outer))
    return slot


def _writer(desc: Any, text: bool) -> _Slot:
    """The compiled writer of `desc`: into a dict of JSON values, or (text) of JSON texts
    of `"key":value` members."""
    slot = _WRITERS.get((desc, text))
    if slot is None:
        slot = _WRITERS[desc, text] = _Slot(lambda: _compile_writer(desc, text))
    return slot


# ---------------------------------------------------------------- message -> JSON


def message_to_json(msg: Message) -> dict[str, JSON]:
    """The JSON object of a message, following the rules of options.proto."""
    out: dict[str, JSON] = {}
    _writer(msg.DESCRIPTOR, False).run(msg, out)
    return out


def message_to_text(msg: Message) -> str:
    """The JSON text of message_to_json(msg), written straight from the message: compact,
    ASCII only, strict (exactly what json.dumps(..., separators=(",", ":"),
    ensure_ascii=True, allow_nan=False) writes of it; ValueError for NaN or Infinity)."""
    out: dict[str, str] = {}
    _writer(msg.DESCRIPTOR, True).run(msg, out)
    return "{" + ",".join(out.values()) + "}"


def field_to_json(fd: FieldDescriptor, value: Any, repeated: bool = False) -> JSON:
    """The JSON of one field's value (the whole list for a repeated field)."""
    return _converter(fd, repeated, False)(value)


def field_to_text(fd: FieldDescriptor, value: Any, repeated: bool = False) -> str:
    """The JSON text of field_to_json(fd, value, repeated), as message_to_text writes."""
    text: str = _converter(fd, repeated, True)(value)
    return text


# Strings as the gateway's encoder writes them (ensure_ascii): json's own C function.
_string_text: Callable[[str], str] = encode_basestring_ascii


def _float_text(n: float) -> str:
    if not math.isfinite(n):  # allow_nan=False
        raise ValueError("Out of range float values are not JSON compliant")
    return float.__repr__(n)


def _bool_text(b: bool) -> str:
    return "true" if b else "false"


def value_to_text(value: struct_pb2.Value) -> str:
    """The JSON text of value_to_json(value)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return _string_text(value.string_value)
    if kind == "number_value":
        n = value.number_value
        if not math.isfinite(n):
            return "null"
        return int.__repr__(int(n)) if n.is_integer() and abs(n) <= 2**53 else float.__repr__(n)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "struct_value":
        return struct_to_text(value.struct_value)
    if kind == "list_value":
        return list_to_text(value.list_value)
    return "null"


def struct_to_text(struct: struct_pb2.Struct) -> str:
    """The JSON text of struct_to_json(struct)."""
    fields = struct.fields  # (by key: a map's items() is a Python view, ~1 us a member)
    members = [_string_text(k) + ":" + value_to_text(fields[k]) for k in fields]
    return "{" + ",".join(members) + "}"


def list_to_json(values: struct_pb2.ListValue) -> list[JSON]:
    return [value_to_json(v) for v in values.values]


def list_to_text(values: struct_pb2.ListValue) -> str:
    return "[" + ",".join([value_to_text(v) for v in values.values]) + "]"


@cache
def _converter(fd: FieldDescriptor, repeated: bool, text: bool) -> Callable[[Any], Any]:
    """What one field's value becomes: its JSON value, or (text) its JSON text."""
    single = _single_converter(fd, text)
    if not repeated:
        return single
    if text:
        return lambda values: "[" + ",".join([single(v) for v in values]) + "]"
    return lambda values: [single(v) for v in values]


def _single_converter(fd: FieldDescriptor, text: bool) -> Callable[[Any], Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        name = _message_type(fd).full_name
        if name == _VALUE:
            return value_to_text if text else value_to_json
        if name == _STRUCT:
            return struct_to_text if text else struct_to_json
        if name == _LIST:
            return list_to_text if text else list_to_json
        slot = _writer(_message_type(fd), text)

        def message(value: Message) -> Any:
            out: dict[str, Any] = {}
            slot.run(value, out)
            return "{" + ",".join(out.values()) + "}" if text else out

        return message
    if t == FieldDescriptor.TYPE_ENUM:
        names = enum_names(_enum_type(fd))[0]
        if text:
            texts = {number: _string_text(name) for number, name in names.items()}
            return lambda number: texts.get(number, '""')
        return lambda number: names.get(number, "")
    if t == FieldDescriptor.TYPE_BYTES:

        def refuse(value: Any) -> Any:
            raise TypeError(f"{fd.full_name}: bytes fields have no JSON mapping here")

        return refuse
    if not text:
        return _same
    if t == FieldDescriptor.TYPE_STRING:
        return _string_text
    if t == FieldDescriptor.TYPE_BOOL:
        return _bool_text
    if t in _FLOATS:
        return _float_text
    return int.__repr__


def _same(value: Any) -> Any:
    return value


# The kinds of a writer's step: a member, an enum member (not when 0), an inline message,
# an inline Struct, a member of one of two forms (json_with / json_without).
_WRITE, _ENUM, _INLINE, _MERGE, _FORM = 0, 1, 2, 3, 4


def _compile_writer(desc: Descriptor, text: bool) -> Writer:
    # One step per field, in field order: (name, key, presence, kind, convert).
    steps: list[tuple[str, str, bool, int, Any]] = []
    for f in _plan(desc).fields:
        if f.inline and f.wkt == _STRUCT:
            steps.append((f.name, f.key, f.presence, _MERGE, _merge_struct(text)))
            continue
        if f.inline:
            steps.append((f.name, f.key, f.presence, _INLINE, _writer(_message_type(f.fd), text)))
            continue
        convert = _converter(f.fd, f.repeated, text)
        if text:
            convert = _keyed(_string_text(f.key) + ":", convert)
        kind = _ENUM if f.is_enum and not f.repeated else _WRITE
        if f.form_of:  # its own presence is the form step's to check
            steps.append((f.name, f.key, False, _FORM, _form_step(f, kind, convert, text)))
            continue
        steps.append((f.name, f.key, f.presence, kind, convert))

    def write(msg: Message, out: dict[str, Any]) -> None:
        for name, key, presence, kind, convert in steps:
            if presence and not msg.HasField(name):
                continue
            value = getattr(msg, name)
            if kind == _WRITE:
                out[key] = convert(value)
            elif kind == _ENUM:
                if value != 0:  # _UNSPECIFIED is never written
                    out[key] = convert(value)
            elif kind == _INLINE:
                convert.run(value, out)  # merged into the parent: its keys are out's
            elif kind == _FORM:
                convert(msg, value, out)
            else:
                convert(value, out)  # an inline Struct: the keys not taken yet

    return write


def _form_step(
    f: _Field, kind: int, convert: Callable[[Any], Any], text: bool
) -> Callable[[Message, Any, dict[str, Any]], None]:
    """Write a field of one form: only in its form, and in the `json_with` one always
    (`null` when unset)."""
    name, key, presence, form_of, when_set = f.name, f.key, f.presence, f.form_of, f.form_when_set
    null = _string_text(key) + ":null" if text else None

    def write(msg: Message, value: Any, out: dict[str, Any]) -> None:
        if msg.HasField(form_of) != when_set:
            return
        if presence and not msg.HasField(name):
            if when_set:
                out[key] = null
        elif kind != _ENUM or value != 0:
            out[key] = convert(value)

    return write


def _keyed(prefix: str, convert: Callable[[Any], str]) -> Callable[[Any], str]:
    return lambda value: prefix + convert(value)


def _merge_struct(text: bool) -> Callable[[struct_pb2.Struct, dict[str, Any]], None]:
    """An inline Struct's keys merged into the parent's, never replacing one of its own."""

    def merge(struct: struct_pb2.Struct, out: dict[str, Any]) -> None:
        fields = struct.fields  # (by key: see struct_to_text)
        for k in fields:
            if k not in out:
                v = fields[k]
                out[k] = _string_text(k) + ":" + value_to_text(v) if text else value_to_json(v)

    return merge


# ---------------------------------------------------------------- JSON -> message


def json_to_message(data: JSON, msg: Message, path: str = "") -> None:
    """Fill `msg` from a JSON object. Raises CodecError naming the offending field."""
    if not isinstance(data, dict):
        raise CodecError(path, "expected an object")
    _reader(msg.DESCRIPTOR, _NONE).run(data, msg, path)


_NONE: frozenset[str] = frozenset()


def _compile_reader(desc: Descriptor, outer: frozenset[str]) -> Reader:
    """Read `desc` from a JSON object; `outer` holds keys taken by enclosing (inlining)
    messages."""
    plan = _plan(desc)
    fields = [(f.key, _field_reader(f)) for f in plan.fields if not f.inline]
    taken = outer | plan.known_keys
    # Per inline message: (field, its keys, every key it cannot take when it collects the
    # rest (else None), its oneof, its reader).
    inlines: list[tuple[str, frozenset[str], frozenset[str] | None, str, _Slot]] = []
    for f in plan.inline_messages:
        sub_desc = _message_type(f.fd)
        sub = _plan(sub_desc)
        beyond = sub.known_keys | taken if sub.rest is not None else None
        oneof = f.fd.containing_oneof.name if f.fd.containing_oneof is not None else ""
        inlines.append((f.name, sub.known_keys, beyond, oneof, _reader(sub_desc, taken)))
    rest = plan.rest.name if plan.rest is not None else ""
    skip = plan.known_keys | outer

    def read(data: dict[str, JSON], msg: Message, path: str) -> None:
        for key, read_field in fields:
            if key in data:
                read_field(data[key], msg, path)
        for name, keys, beyond, oneof, child in inlines:
            if not keys.isdisjoint(data) or (beyond is not None and not beyond.issuperset(data)):
                if oneof and msg.WhichOneof(oneof):
                    continue  # an earlier member of the same oneof took the keys
                sub = getattr(msg, name)
                sub.SetInParent()
                child.run(data, sub, path)
        if rest:
            extra = getattr(msg, rest)
            for key, item in data.items():
                if key not in skip:
                    json_to_value(item, extra.fields[key], _join(path, key))

    return read


class _Reject(Exception):
    """A scalar that does not fit its field (the caller adds the path)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _field_reader(f: _Field) -> Callable[[JSON, Message, str], None]:
    """Read one (not inline) field's JSON value into the message."""
    name, key, fd = f.name, f.key, f.fd
    if f.repeated:
        add = _element_reader(fd)
        nullable = f.wkt != _VALUE

        def read_repeated(item: JSON, msg: Message, path: str) -> None:
            if item is None and nullable:
                return  # null reads as absent
            fpath = _join(path, key)
            if not isinstance(item, list):
                raise CodecError(fpath, "expected an array")
            target = getattr(msg, name)
            for i, element in enumerate(item):
                add(target, element, fpath, i)

        return read_repeated
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        read_value = _message_value_reader(fd)
        nullable = f.wkt != _VALUE

        def read_message(item: JSON, msg: Message, path: str) -> None:
            if item is None and nullable:
                return
            read_value(item, getattr(msg, name), _join(path, key))

        return read_message
    convert = _scalar_converter(fd)

    def read_scalar(item: JSON, msg: Message, path: str) -> None:
        if item is None:
            return
        try:
            value = convert(item)
        except _Reject as e:
            raise CodecError(_join(path, key), e.reason) from None
        setattr(msg, name, value)

    return read_scalar


def _element_reader(fd: FieldDescriptor) -> Callable[[Any, JSON, str, int], None]:
    """Append one JSON element to a repeated field (`path`, `i`: the element's place)."""
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        read_value = _message_value_reader(fd)

        def add_message(target: Any, item: JSON, path: str, i: int) -> None:
            read_value(item, target.add(), f"{path}[{i}]")

        return add_message
    convert = _scalar_converter(fd)

    def add_scalar(target: Any, item: JSON, path: str, i: int) -> None:
        try:
            value = convert(item)
        except _Reject as e:
            raise CodecError(f"{path}[{i}]", e.reason) from None
        target.append(value)

    return add_scalar


def _message_value_reader(fd: FieldDescriptor) -> Callable[[JSON, Any, str], None]:
    """Fill a message-typed field's message (`child`) from its JSON value (`item`)."""
    name = _message_type(fd).full_name
    if name == _VALUE:
        return json_to_value
    if name == _STRUCT:
        return json_to_struct
    if name == _LIST:
        return _read_list
    slot = _reader(_message_type(fd), _NONE)

    def read_message(item: JSON, child: Any, path: str) -> None:
        if not isinstance(item, dict):
            raise CodecError(path, "expected an object")
        child.SetInParent()
        slot.run(item, child, path)

    return read_message


def _read_list(item: JSON, child: struct_pb2.ListValue, path: str) -> None:
    if not isinstance(item, list):
        raise CodecError(path, "expected an array")
    child.SetInParent()
    for i, element in enumerate(item):
        json_to_value(element, child.values.add(), f"{path}[{i}]")


def _scalar_converter(fd: FieldDescriptor) -> Callable[[JSON], Any]:
    """A JSON scalar as the field's value; _Reject when it does not fit."""
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return _string
    if t == FieldDescriptor.TYPE_BOOL:
        return _bool
    if t == FieldDescriptor.TYPE_ENUM:
        names = enum_names(_enum_type(fd))[1]
        allowed = "expected one of: " + ", ".join(sorted(names))

        def enum(item: JSON) -> int:
            if not isinstance(item, str) or item not in names:
                raise _Reject(allowed)
            return names[item]

        return enum
    if t in _FLOATS:
        return _float
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        out_of_range = f"out of range ({low}..{high})"

        def integer(item: JSON) -> int:
            if isinstance(item, float) and item.is_integer():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int):
                raise _Reject("expected an integer")
            if not low <= item <= high:
                raise _Reject(out_of_range)
            return item

        return integer

    def unsupported(item: JSON) -> Any:
        raise _Reject(f"unsupported field type {t}")

    return unsupported


def _string(item: JSON) -> str:
    if not isinstance(item, str):
        raise _Reject("expected a string")
    return item


def _bool(item: JSON) -> bool:
    if not isinstance(item, bool):
        raise _Reject("expected a boolean")
    return item


def _float(item: JSON) -> float:
    if isinstance(item, bool) or not isinstance(item, int | float):
        raise _Reject("expected a number")
    return float(item)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


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


def result_to_text(msg: Message, bare_field: str) -> str:
    """The JSON text of message_to_result(msg, bare_field), as message_to_text writes."""
    if bare_field:
        fd = cast(FieldDescriptor, msg.DESCRIPTOR.fields_by_name[bare_field])
        if fd.has_presence and not msg.HasField(bare_field):
            return "null"
        return field_to_text(fd, getattr(msg, bare_field), fd.is_repeated)
    return message_to_text(msg)
