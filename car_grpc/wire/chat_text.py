"""A chat event's JSON, written once: from the agent's JSON by the gateway that reads its
`agent.chat.event`, spliced by the core into the host's `agents.chat.event` for a host
behind car-grpc's own gateway (AgentChatEventNotice.event_text, ChatEventNotice.params_text).

Per chat token, converting the event to protobuf and back (the core's copy into the host's
notice, its serialization, the gateway's codec.message_to_text) cost more than the relay
itself (bench/README.md, issue 16). The text written here is what the codec writes of the
host's ChatEventNotice after its `session_id` and `agent_id`: the event's members in field
order (`kind` always, the others when present), then its other keys (the event's `extra`),
strings, booleans, nulls and integers as the codec writes them (json's ASCII encoder). As
for a run turn (turn_text.py), one freedom is taken: the other keys, and a free-form
object's, come in the agent's order, where the codec writes protobuf's map order (a hash
order; JSON objects are unordered). Where the two could differ otherwise, no text is
written and the event is converted as before: a number in a free-form value that is not an
integer of at most 53 bits (the codec writes what the double holds), a text over
TEXT_LIMIT.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor

from car_grpc.v1 import chats_pb2, options_pb2, session_pb2
from car_grpc.wire.batch import length_delimited, member_frame, varint
from car_grpc.wire.turn_text import plain

#: An event whose text is longer goes without (it would double a large frame on its way
#: to the core; a token is a few dozen bytes).
TEXT_LIMIT = 16 * 1024

# What a member of ChatEvent is, for writing it.
_STRING, _BOOL, _INTEGER = 0, 1, 2


def _wire_fields(desc: Any) -> list[FieldDescriptor]:
    """A message's fields that the JSON wire has (no typed twins, nothing internal)."""
    out = []
    for fd in desc.fields:
        extensions = fd.GetOptions().Extensions
        if not (extensions[options_pb2.json_twin] or extensions[options_pb2.json_internal]):
            out.append(fd)
    return out


def _members() -> list[tuple[str, str, int, bool]]:
    """ChatEvent's typed members in field order as (key, its text with the colon, kind,
    written when absent); its inline `extra` (the other keys) is written after them."""
    kinds = {FieldDescriptor.TYPE_STRING: _STRING, FieldDescriptor.TYPE_BOOL: _BOOL}
    kinds[FieldDescriptor.TYPE_UINT32] = _INTEGER
    out = []
    for fd in _wire_fields(chats_pb2.ChatEvent.DESCRIPTOR):
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            continue  # `extra`
        key = fd.GetOptions().Extensions[options_pb2.json_key] or fd.name
        out.append((key, encode_basestring_ascii(key) + ":", kinds[fd.type], not fd.has_presence))
    return out


_MEMBERS = _members()
_NOTICES = (chats_pb2.AgentChatEventNotice.DESCRIPTOR, chats_pb2.ChatEventNotice.DESCRIPTOR)
#: Keys that are not the event's other keys: its members, and the notices' own members
#: (the agent's session_id; the host's session_id and agent_id, which an event key of the
#: same name never replaces).
_TAKEN = frozenset(
    [key for key, *_ in _MEMBERS]
    + [
        fd.name
        for desc in _NOTICES
        for fd in _wire_fields(desc)
        if fd.type != FieldDescriptor.TYPE_MESSAGE
    ]
)
#: json's strict ASCII encoder: the codec's text of strings, integers, booleans and null.
_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def event_text(params: Any) -> str:
    """The members of the host's agents.chat.event after session_id and agent_id, as the
    codec writes them of the event read from `params` (an agent.chat.event's, already read
    by the codec: its members have their types); "" when not written here."""
    if type(params) is not dict:
        return ""
    parts = []
    taken = 0  # keys of `params` that are members (or session_id)
    for key, prefix, kind, always in _MEMBERS:
        value = params.get(key)
        if value is None:
            if always:
                parts.append(prefix + '""')  # a member without presence is written, empty
            taken += key in params
            continue
        taken += 1
        if kind == _STRING:
            parts.append(prefix + encode_basestring_ascii(value))
        elif kind == _BOOL:
            parts.append(prefix + ("true" if value else "false"))
        else:
            parts.append(prefix + int.__repr__(int(value)))  # 3.0 reads as 3
    if len(params) > taken + ("session_id" in params):
        for key, value in params.items():
            if key not in _TAKEN:
                if not plain(value) or (value_text := _free_text(value)) is None:
                    return ""
                parts.append(encode_basestring_ascii(key) + ":" + value_text)
    text = ",".join(parts)
    return text if len(text) <= TEXT_LIMIT else ""


def _free_text(value: Any) -> str | None:
    """A free-form value (plain: turn_text.plain) as the codec writes it, its objects' keys
    in the client's order; None when nested past orjson's limit."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None
    # orjson writes other than ASCII as UTF-8, and DEL as itself: json escapes both.
    return data.decode() if data.isascii() and b"\x7f" not in data else _ascii.encode(value)


# ---------------------------------------------------------------- the core's side


def notice_head(session_id: str, agent_id: str) -> bytes:
    """What every agents.chat.event of a chat starts with, up to the event's members."""
    return (
        f'{{"session_id":{encode_basestring_ascii(session_id)},'
        f'"agent_id":{encode_basestring_ascii(agent_id)},'
    ).encode()


_PARAMS_TEXT_FIELD = chats_pb2.ChatEventNotice.DESCRIPTOR.fields_by_name["params_text"].number
_NOTICE_FIELD = session_pb2.ServerFrame.DESCRIPTOR.fields_by_name["agents_chat_event"].number
_NOTICE_TAG = varint(_NOTICE_FIELD << 3 | 2)


def notice_frame(head: bytes, members: str) -> bytes:
    """The serialized ServerFrame `agents_chat_event` of the event whose members are
    `members` (`head`: notice_head), for car-grpc's gateway (ChatEventNotice.params_text
    alone)."""
    params = head + members.encode() + b"}"
    return member_frame(_NOTICE_TAG, length_delimited(_PARAMS_TEXT_FIELD, params))
