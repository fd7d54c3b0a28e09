"""A chat event's JSON, written once: from the agent's JSON by the gateway that reads its
`agent.chat.event`, spliced by the core into the host's `agents.chat.event` for a host
behind car-grpc's own gateway (AgentChatEventNotice.event_text, ChatEventNotice.params_text).

Per chat token, converting the event to protobuf and back (the core's copy into the host's
notice, its serialization, the gateway's codec.message_to_text) cost more than the relay
itself (bench/README.md, issue 16). The gateway reads the event here, as the codec reads
it, and writes its text in the same pass (`read_event`); whatever is not read here the
codec reads, and then no text is written. For the usual event (its members and
session_id only) the gateway writes the whole frame for the core as bytes in that pass
(`event_frame`), without a protobuf message.

The text is what the codec writes of the host's ChatEventNotice after its `session_id` and
`agent_id`: the event's members in field order (`kind` always, the others when present),
then its other keys (the event's `extra`), strings, booleans, nulls and integers as the
codec writes them (json's ASCII encoder). As for a run turn (turn_text.py), one freedom is
taken: the other keys, and a free-form object's, come in the agent's order, where the codec
writes protobuf's map order (a hash order; JSON objects are unordered). Where the two could
differ otherwise, the event is left to the codec: a number in a free-form value that is not
an integer of at most 53 bits (the codec writes what the double holds); and a text over
TEXT_LIMIT is not sent.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor

from car_grpc.v1 import chats_pb2, options_pb2, session_pb2
from car_grpc.wire import codec
from car_grpc.wire.batch import varint
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


def _members() -> list[tuple[str, str, str, int, bool]]:
    """ChatEvent's typed members in field order as (field name, key, the key's text with
    the colon, kind, written when absent); its inline `extra` (the other keys) comes after
    them."""
    kinds = {FieldDescriptor.TYPE_STRING: _STRING, FieldDescriptor.TYPE_BOOL: _BOOL}
    kinds[FieldDescriptor.TYPE_UINT32] = _INTEGER
    out = []
    for fd in _wire_fields(chats_pb2.ChatEvent.DESCRIPTOR):
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            continue  # `extra`
        key = fd.GetOptions().Extensions[options_pb2.json_key] or fd.name
        prefix = encode_basestring_ascii(key) + ":"
        out.append((fd.name, key, prefix, kinds[fd.type], not fd.has_presence))
    return out


def _own_keys(desc: Any) -> set[str]:
    """The keys of a notice's own (not inline) members."""
    return {fd.name for fd in _wire_fields(desc) if fd.type != FieldDescriptor.TYPE_MESSAGE}


_MEMBERS = _members()
_UINT32_MAX = 2**32 - 1
#: Keys that are not the event's other keys (`extra`) when the agent's notice is read:
#: the event's members and the notice's session_id.
_READ = frozenset(
    {key for _, key, *_ in _MEMBERS} | _own_keys(chats_pb2.AgentChatEventNotice.DESCRIPTOR)
)
#: Keys of the host's notice that an other key of the same name never replaces.
_HOST = frozenset(_own_keys(chats_pb2.ChatEventNotice.DESCRIPTOR))
#: json's strict ASCII encoder: the codec's text of strings, integers, booleans and null.
_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _typed(kind: int, value: Any) -> tuple[str, Any] | None:
    """A typed member's text as the codec writes it and its value as the codec reads it
    (3.0 as 3); None for a value not of the member's type (the codec reads it)."""
    if kind == _STRING:
        return (encode_basestring_ascii(value), value) if type(value) is str else None
    if kind == _BOOL:
        return ("true" if value else "false", value) if type(value) is bool else None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 <= value <= _UINT32_MAX:
        return None
    return int.__repr__(value), value


def read_event(params: Any, notice: chats_pb2.AgentChatEventNotice) -> bool:
    """Read an agent.chat.event's params into `notice` as the codec reads them (the same
    message), and the event's text beside it (`event_text`, "" when over TEXT_LIMIT), in
    one pass: for a token, a third of the codec's reading alone.

    False, with `notice` untouched, for params not read here: a member that is not of its
    field's type, another key whose value is not plain (turn_text.plain): the codec reads
    those (and refuses what it refuses), and no text is written. Only for params too flat
    to nest deeply (`plain` recurses)."""
    if type(params) is not dict:
        return False
    session_id = params.get("session_id")
    if session_id is not None and type(session_id) is not str:
        return False
    parts: list[str] = []
    members: list[tuple[str, Any]] = []
    taken = int("session_id" in params)  # keys of `params` read so far
    for name, key, prefix, kind, always in _MEMBERS:
        value = params.get(key)
        if value is None:  # null reads as absent
            if always:
                parts.append(prefix + '""')  # a member without presence is written, empty
            taken += key in params
            continue
        taken += 1
        if (typed := _typed(kind, value)) is None:
            return False
        text, value = typed
        parts.append(prefix + text)
        members.append((name, value))
    others: list[tuple[str, Any]] = []
    if len(params) > taken:
        for key, value in params.items():
            if key not in _READ:
                if not plain(value) or (value_text := _free_text(value)) is None:
                    return False
                others.append((key, value))
                if key not in _HOST:
                    parts.append(encode_basestring_ascii(key) + ":" + value_text)
    # As the codec: session_id when given, the event once any other key is there.
    if session_id is not None:
        notice.session_id = session_id
    if len(params) > ("session_id" in params):
        event = notice.event
        event.SetInParent()
        for name, value in members:
            setattr(event, name, value)
        for key, value in others:
            codec.json_to_value(value, event.extra.fields[key])
    text = ",".join(parts)
    notice.event_text = text if len(text) <= TEXT_LIMIT else ""
    return True


# ---------------------------------------------------------------- a token's whole frame


def _frame_members() -> list[tuple[str, bytes, str, int, bool]]:
    """ChatEvent's typed members in field order as (key, the field's tag, the key's text
    with the colon, kind, written when absent)."""
    wire_types = {_STRING: 2, _BOOL: 0, _INTEGER: 0}
    numbers = chats_pb2.ChatEvent.DESCRIPTOR.fields_by_name
    return [
        (key, varint(numbers[name].number << 3 | wire_types[kind]), prefix, kind, always)
        for name, key, prefix, kind, always in _MEMBERS
    ]


_FRAME_MEMBERS = _frame_members()
_NOTICE_FIELDS = chats_pb2.AgentChatEventNotice.DESCRIPTOR.fields_by_name
_SESSION_ID_TAG = varint(_NOTICE_FIELDS["session_id"].number << 3 | 2)
_EVENT_TAG = varint(_NOTICE_FIELDS["event"].number << 3 | 2)
_EVENT_TEXT_TAG = varint(_NOTICE_FIELDS["event_text"].number << 3 | 2)
_FRAME_TAG = varint(
    session_pb2.ClientFrame.DESCRIPTOR.fields_by_name["agent_chat_event"].number << 3 | 2
)
_TRUE, _FALSE = b"\x01", b"\x00"


_Member = tuple[str, bytes, str, int, bool]
#: The members event_frame reads of params with these keys, in this order (a token's are
#: always the same few): those of the keys, and those written when absent. Only shapes of
#: the event's members and session_id are kept (a client's other keys, of any number and
#: size, are never held here), and at most _SHAPES_MAX of them: past it the plan is worked
#: out for each event.
_shapes: dict[tuple[str, ...], list[_Member]] = {}
_SHAPES_MAX = 256
_FRAME_KEYS = frozenset({key for key, *_ in _FRAME_MEMBERS} | {"session_id"})


def _plan(keys: tuple[str, ...]) -> list[_Member] | None:
    """The members to read of params with `keys`; None when a key is not the event's."""
    plan = _shapes.get(keys)
    if plan is None:
        if not _FRAME_KEYS.issuperset(keys):
            return None
        plan = [m for m in _FRAME_MEMBERS if m[0] in keys or m[4]]
        if len(_shapes) < _SHAPES_MAX:
            _shapes[keys] = plan
    return plan


def event_frame(params: Any) -> bytes | None:
    """The serialized ClientFrame of an agent.chat.event notification of `params`: the
    bytes of the frame that read_event and the codec give (`agent_chat_event` with its
    `event_text`, no id), written straight from the params, without a protobuf message (a
    frame a token: half the gateway's reading of it).

    None for params not written here: those with other keys than the event's members and
    session_id (the event's `extra`), and whatever read_event leaves to the codec; the
    caller then reads them as before (read_event, the codec, with its errors)."""
    if type(params) is not dict or (plan := _plan(tuple(params))) is None:
        return None
    try:
        session_id = params.get("session_id")
        if session_id is None:
            head = b""
        elif type(session_id) is str:
            data = session_id.encode()  # UnicodeEncodeError (a lone surrogate): the codec's
            head = _SESSION_ID_TAG + varint(len(data)) + data if data else b""
        else:
            return None
        texts: list[str] = []
        fields: list[bytes] = []
        for key, tag, prefix, kind, always in plan:
            value = params.get(key)
            if value is None:  # null reads as absent
                if always:
                    texts.append(prefix + '""')  # a member without presence is written, empty
                continue
            if (typed := _typed(kind, value)) is None:
                return None
            text, value = typed
            texts.append(prefix + text)
            if kind == _STRING:
                data = value.encode()
                if data or not always:  # a member without presence: "" is not written
                    fields += (tag, varint(len(data)), data)
            elif kind == _BOOL:
                fields += (tag, _TRUE if value else _FALSE)
            else:
                fields += (tag, varint(value))
    except UnicodeEncodeError:
        return None
    notice = [head]
    if len(params) > ("session_id" in params):  # as the codec: the event once any key is
        event = b"".join(fields)
        notice += (_EVENT_TAG, varint(len(event)), event)
    text = ",".join(texts)
    if 0 < len(text) <= TEXT_LIMIT:
        notice += (_EVENT_TEXT_TAG, varint(len(text)), text.encode())
    body = b"".join(notice)
    return _FRAME_TAG + varint(len(body)) + body


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
_PARAMS_TEXT_TAG = varint(_PARAMS_TEXT_FIELD << 3 | 2)


def notice_frame(head: bytes, members: str) -> bytes:
    """The serialized ServerFrame `agents_chat_event` of the event whose members are
    `members` (`head`: notice_head), for car-grpc's gateway (ChatEventNotice.params_text
    alone)."""
    # In one join, not three nested concatenations (a frame a token).
    body = members.encode()
    size = len(head) + len(body) + 1
    params_size = varint(size)
    notice_size = varint(len(_PARAMS_TEXT_TAG) + len(params_size) + size)
    return b"".join((_NOTICE_TAG, notice_size, _PARAMS_TEXT_TAG, params_size, head, body, b"}"))
