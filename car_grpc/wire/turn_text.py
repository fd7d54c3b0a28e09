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


def plain(value: Any) -> bool:
    """Whether free-form `value` holds only what orjson writes as the codec does."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_EXACT <= value <= _EXACT)
    if kind is dict:
        return all(plain(item) for item in value.values())
    if kind is list:
        return all(plain(item) for item in value)
    return False


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
