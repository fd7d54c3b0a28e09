"""The frames of a batch from the core, read straight from its bytes where they are a
notification the core wrote as its JSON params (`params_text`, json_internal: a run's turn
event, a chat token), and parsed by protobuf otherwise.

Such a frame is a ServerFrame holding that notification's message, which holds params_text
and nothing else. Its text for the client is `{"jsonrpc":"2.0","method":M,"params":P}`,
what Bridge.from_core writes for it: here P comes out of the batch's bytes as they are, with
no ServerFrame, message or str built for it by protobuf (256 of them make a batch of
run events: bench/README.md, issue 16, `turns6`). A frame of any other shape (an id, another
member, a second field, text that is not ASCII, which protobuf checks as UTF-8) is parsed
and translated as before, in its place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from car_grpc.v1 import session_pb2
from car_grpc.wire import api
from car_grpc.wire.batch import varint


def _notifications() -> dict[bytes, tuple[int, str]]:
    """ServerFrame member tag (two bytes) -> (its message's params_text tag, one byte; the
    client's text up to the params) of each notification that may come as params_text."""
    out: dict[bytes, tuple[int, str]] = {}
    for name, member in api.SERVER_MEMBERS.items():
        fields = member.message.fields_by_name
        if member.kind != api.NOTIFICATION or "params_text" not in fields:
            continue
        tag = varint(session_pb2.ServerFrame.DESCRIPTOR.fields_by_name[name].number << 3 | 2)
        text_tag = varint(fields["params_text"].number << 3 | 2)
        assert len(tag) == 2 and len(text_tag) == 1, name  # as _text() reads them
        head = f'{{"jsonrpc":"2.0","method":{json.dumps(member.method)},"params":'
        out[tag] = (text_tag[0], head)
    return out


_NOTIFICATIONS = _notifications()
#: A frame's tag in a batch (field 1, length-delimited: wire/batch.py).
_FRAME_TAG = 0x0A

#: A frame of a batch: a text notification's text for the client, or the frame parsed.
Frame = str | session_pb2.ServerFrame


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and where it ends (IndexError past the end)."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def read(data: bytes, at: int) -> tuple[Frame | None, int]:
    """The frame of batch `data` (a serialized ConnectBatchedResponse) at `at`, and where
    the next one starts; (None, at) when the bytes there are not a frame as batch.encode
    writes it (then protobuf reads the rest: `rest`)."""
    if data[at] != _FRAME_TAG:
        return None, at
    try:
        size, start = _varint(data, at + 1)
    except IndexError:
        return None, at
    stop = start + size
    if stop > len(data):
        return None, at
    try:
        text = _text(data, start, stop)
    except IndexError:  # a varint past the end: protobuf says what is wrong
        text = None
    if text is not None:
        return text, stop
    return session_pb2.ServerFrame.FromString(data[start:stop]), stop


def frames(data: bytes) -> Iterator[Frame]:
    """Every frame of batch `data`, as read() reads them (protobuf reads what it cannot,
    with its DecodeError)."""
    at, end = 0, len(data)
    while at < end:
        frame, at = read(data, at)
        if frame is None:
            yield from session_pb2.ConnectBatchedResponse.FromString(data[at:]).frames
            return
        yield frame


def _text(data: bytes, start: int, stop: int) -> str | None:
    """The client's text of the frame between `start` and `stop` when it is a params_text
    notification alone (None: any other frame)."""
    found = _NOTIFICATIONS.get(data[start : start + 2])
    if found is None or stop - start < 5:
        return None
    text_tag, head = found
    size, at = _varint(data, start + 2)
    if at + size != stop or data[at] != text_tag:
        return None
    size, at = _varint(data, at + 1)
    if at + size != stop or size == 0:  # (an empty params_text: the event's fields)
        return None
    params = data[at:stop]
    if not params.isascii():
        return None  # protobuf checks that it is UTF-8 (the core writes ASCII)
    return head + params.decode() + "}"
