"""A run turn's JSON, written once: from the client's JSON by the gateway that reads it,
spliced by the core into the turn's `runs.trace.event` for the subscribers behind
car-grpc's own gateway (RecordTurnsRequest.turn_texts, RunTraceEvent.params_text).

Converting each event back from protobuf (codec.message_to_text) cost more than anything
else the core or the gateway does per turn (bench/README.md, issue 16). The text written
here is the one the codec writes of the stored turn, member for member: the members in
field order, strings, booleans, nulls and integers as the codec writes them (json's ASCII
encoder). One freedom is taken: a free-form object's keys come in the client's order,
where the codec writes the order of protobuf's map (a hash order; JSON objects are
unordered). Where the two could differ otherwise, no text is written and the event is
converted as before: a number that is not an integer of at most 53 bits (the codec writes
what the double holds: 60.0 as 60, 2**60 rounded), a member of a type not handled here,
a text over TEXT_LIMIT.

The gateway reads the turns here too (`read_turns`): the protobuf the codec would build and
the texts in one pass, for the usual turn (plain members), without the codec's generic
steps; the codec reads every other turn, and refuses what it refuses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

import orjson
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor

from car_grpc.v1 import options_pb2, runs_pb2
from car_grpc.wire import codec

#: A turn whose text is longer goes without (it would double a large frame on its way to
#: the core; the usual turn is about 1 KiB).
TEXT_LIMIT = 16 * 1024
#: Integers up to this magnitude are exact as doubles: the codec writes them back as they
#: came.
_EXACT = 2**53

# What a member of RunTurn is, for writing it.
_SCALAR, _FREE = 1, 2


def _members() -> list[tuple[str, int]]:
    """RunTurn's JSON members in field order as (key, kind), `index` left out (the core
    stamps it); kind 0 for a type not handled here."""
    out = []
    for fd in runs_pb2.RunTurn.DESCRIPTOR.fields:
        options = fd.GetOptions()
        if fd.name == "index" or options.Extensions[options_pb2.json_internal]:
            continue
        if options.Extensions[options_pb2.json_twin]:
            continue
        key = options.Extensions[options_pb2.json_key] or fd.name
        if fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BOOL):
            kind = _SCALAR if fd.has_presence and not fd.is_repeated else 0
        elif fd.message_type is not None and fd.message_type.full_name == _VALUE:
            kind = _FREE if not fd.is_repeated else 0
        else:
            kind = 0
        out.append((key, kind))
    return out


_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_MEMBERS = _members()
#: json's strict ASCII encoder: the codec's text of strings, integers, booleans and null.
_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


#: The most objects and arrays orjson writes nested in one another.
_ORJSON_NESTING = 254


def plain(value: Any, depth: int = 0) -> bool:
    """Whether free-form `value` holds only what orjson writes as the codec does (nested
    no deeper than it writes: deeper, this would recurse past Python's limit; `depth`: the
    objects and arrays `value` is in)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_EXACT <= value <= _EXACT)
    if kind is dict:
        items = value.values()
    elif kind is list:
        items = value
    else:
        return False
    if depth >= _ORJSON_NESTING:
        return False
    depth += 1
    for item in items:  # scalars here, without a call each
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if -_EXACT <= item <= _EXACT:
                continue
            return False
        if not plain(item, depth):
            return False
    return True


def turn_text(turn: Any) -> str:
    """The JSON object of a client's turn (as parsed) without `index`, as the codec writes
    the RunTurn read from it; "" when it is not written here (see the module's doc). The
    turn must have been read by the codec already (its members have their types)."""
    if type(turn) is not dict:
        return ""
    out = {}
    for key, kind in _MEMBERS:
        if key not in turn:
            continue
        value = turn[key]
        if kind == _SCALAR:
            if value is None:
                continue  # null reads as absent
        elif kind != _FREE or not plain(value):
            return ""
        out[key] = value
    try:
        data = orjson.dumps(out)
    except orjson.JSONEncodeError:  # nested past orjson's limit
        return ""
    # orjson writes other than ASCII as UTF-8, and DEL as itself: json escapes both.
    text = data.decode() if data.isascii() and b"\x7f" not in data else _ascii.encode(out)
    return text if len(text) <= TEXT_LIMIT else ""


def turn_texts(turns: Sequence[Any]) -> list[str]:
    return [turn_text(turn) for turn in turns]


# ---------------------------------------------------------------- the gateway's reading

#: What read_turns did: left the params to the codec, or read them (and whether every
#: turn was read here, free-form values nested at most FLAT_NESTING deep, so that the
#: frame cannot be deeper than the core parses).
NOT_READ, READ, READ_FLAT = 0, 1, 2
#: The deepest bracket a free-form value of a turn read here may open, counted from the
#: JSON-RPC message's own `{` (message, params, turns and the turn are 4): a frame nested
#: no deeper than the gateway's SHALLOW_BRACKETS cannot pass the core's parser's depth
#: (jsonrpc._shallow). Deeper turns are read by the codec.
FLAT_NESTING = 19

# RunTurn's members as read_turns reads them.
_INDEX, _STRING, _BOOL = 3, 4, 5
_UINT32_MAX = 2**32 - 1


def _read_members() -> dict[str, tuple[int, str, int]]:
    """RunTurn's JSON members by key: (field number, field name, kind)."""
    out = {}
    for fd in runs_pb2.RunTurn.DESCRIPTOR.fields:
        options = fd.GetOptions()
        if (
            options.Extensions[options_pb2.json_internal]
            or options.Extensions[options_pb2.json_twin]
        ):
            continue
        key = options.Extensions[options_pb2.json_key] or fd.name
        if fd.name == "index":
            kind = _INDEX
        elif fd.message_type is not None and fd.message_type.full_name == _VALUE:
            kind = _FREE
        elif fd.type == FieldDescriptor.TYPE_STRING:
            kind = _STRING
        elif fd.type == FieldDescriptor.TYPE_BOOL:
            kind = _BOOL
        else:
            raise TypeError(f"{fd.full_name}: not read by turn_text.read_turns")
        if fd.is_repeated or (kind != _FREE and not fd.has_presence):
            raise TypeError(f"{fd.full_name}: not read by turn_text.read_turns")
        out[key] = (fd.number, fd.name, kind)
    return out


_READ_MEMBERS = _read_members()


def read_turns(params: Any, request: runs_pb2.RecordTurnsRequest) -> int:
    """Read a runs.record_turns' params into `request` as the codec reads them (the same
    message) and each turn's text beside it (`turn_texts`, as turn_texts() writes them), in
    one pass: the turns' protobuf built without the codec's generic steps, and no second
    walk for their text.

    NOT_READ, with `request` untouched, for params not read here (not an object, run_id
    not a string): the codec reads them. A turn that is not read here (not an object, a
    member not of its field's type, a free-form value that is not plain or nests deeper
    than FLAT_NESTING, a string protobuf refuses) is read again by the codec, which
    refuses what it refuses, and gets its text from turn_text(); READ_FLAT when there was
    none such."""
    if type(params) is not dict:
        return NOT_READ
    run_id = params.get("run_id")
    if run_id is not None and type(run_id) is not str:
        return NOT_READ
    turns = params.get("turns")
    if turns is not None and type(turns) is not list:
        return NOT_READ
    if run_id is not None:
        request.run_id = run_id
    if not turns:
        return READ_FLAT
    flat = True
    add = request.turns.add
    texts = []
    for i, turn in enumerate(turns):
        message = add()
        try:
            text = _read_turn(turn, message) if type(turn) is dict else None
        except ValueError:  # e.g. a lone surrogate: the codec says where
            text = None
        if text is None:
            message.Clear()
            codec.json_to_message(turn, message, f"turns[{i}]")
            text = turn_text(turn)
            flat = False
        texts.append(text)
    request.turn_texts.extend(texts)
    return READ_FLAT if flat else READ


def _read_turn(turn: dict[str, Any], message: runs_pb2.RunTurn) -> str | None:
    """Fill `message` from a turn and return its text; None (`message` part filled) where
    the codec must read it (see read_turns)."""
    # The text is the turn's own JSON when its members come in field order and each is
    # written (no index, no null scalar, no unknown key); else the members are picked.
    as_sent = True
    last = 0
    for key, value in turn.items():
        member = _READ_MEMBERS.get(key)
        if member is None:
            as_sent = False  # ignored, as the codec ignores it
            continue
        number, name, kind = member
        if number < last:
            as_sent = False
        last = number
        if kind == _FREE:
            if not _fill(value, getattr(message, name), 5):
                return None
        elif value is None:
            as_sent = False  # null reads as absent
        elif kind == _STRING:
            if type(value) is not str:
                return None
            setattr(message, name, value)
        elif kind == _BOOL:
            if type(value) is not bool:
                return None
            setattr(message, name, value)
        else:  # the index: not in the text
            if type(value) is not int or not 0 <= value <= _UINT32_MAX:
                return None  # (3.0, -1, true): the codec's
            setattr(message, name, value)
            as_sent = False
    out = turn if as_sent else _picked(turn)
    try:
        data = orjson.dumps(out)
    except orjson.JSONEncodeError:  # nested past orjson's limit (not here: FLAT_NESTING)
        return ""
    # orjson writes other than ASCII as UTF-8, and DEL as itself: json escapes both.
    text = data.decode() if data.isascii() and b"\x7f" not in data else _ascii.encode(out)
    return text if len(text) <= TEXT_LIMIT else ""


def _picked(turn: dict[str, Any]) -> dict[str, Any]:
    """The members of a turn that its text holds, in field order."""
    out = {}
    for key, kind in _MEMBERS:
        if key in turn:
            value = turn[key]
            if value is not None or kind == _FREE:
                out[key] = value
    return out


def _fill(value: Any, out: struct_pb2.Value, depth: int) -> bool:
    """Fill a Value from a plain free-form value as codec.json_to_value does (`depth`: the
    bracket it would open); False where the codec must read it (not plain, too deep)."""
    kind = type(value)
    if kind is str:
        out.string_value = value
    elif kind is dict:
        if depth > FLAT_NESTING:
            return False
        struct = out.struct_value
        if not value:
            struct.SetInParent()
            return True
        fields = struct.fields
        depth += 1
        for key, item in value.items():
            if not _fill(item, fields[key], depth):
                return False
    elif kind is bool:
        out.bool_value = value
    elif kind is int:
        if not -_EXACT <= value <= _EXACT:
            return False
        out.number_value = value
    elif value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif kind is list:
        if depth > FLAT_NESTING:
            return False
        values = out.list_value
        values.SetInParent()
        add = values.values.add
        depth += 1
        for item in value:
            if not _fill(item, add(), depth):
                return False
    else:
        return False
    return True


# ---------------------------------------------------------------- the core's side


def event_head(run_id: str, agent_id: str) -> str:
    """What every turn event of a run starts with, up to the record's timestamp."""
    return (
        f'{{"run_id":{encode_basestring_ascii(run_id)},'
        f'"agent_id":{encode_basestring_ascii(agent_id)},'
        '"record":{"record":"turn","timestamp":'
    )


def event_tail(status: str) -> str:
    """What every turn event of a run ends with after its cursor (`status`: the run
    status's JSON name)."""
    return f',"status":{encode_basestring_ascii(status)}}}' if status else "}"


def event_text(head: str, timestamp: int, index: int, members: str, cursor: int, tail: str) -> str:
    """The params of a turn's runs.trace.event; `members`: the turn's after `index`, as
    JSON object members ("a":1,"b":2), or ""."""
    if members:
        return f'{head}{timestamp},"index":{index},{members}}},"cursor":{cursor}{tail}'
    return f'{head}{timestamp},"index":{index}}},"cursor":{cursor}{tail}'
