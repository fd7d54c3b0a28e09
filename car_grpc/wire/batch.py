"""Many frames per gRPC message: the wire of SessionService.ConnectBatched.

Each side of the bridge keeps its frames serialized (ClientFrame or ServerFrame bytes)
while they wait, so a batch is built without touching them again: a ConnectBatchedRequest
or ConnectBatchedResponse is nothing but its frames, each as field 1 (a length-delimited
member), one after another. A batch is bounded in frames and in bytes; a frame larger
than the byte bound travels alone.

Batches form by themselves, with no timer: a sender writes what is ready when it gets
to write, and what becomes ready while that write is under way goes in the next one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence, Sized
from typing import TypeVar

_Frame = TypeVar("_Frame", bound=Sized)

#: Most frames in one message.
MAX_FRAMES = 256
#: Most bytes of frames in one message (a single larger frame goes alone).
MAX_BYTES = 1024 * 1024

#: Field 1, wire type 2 (length-delimited): the tag of each frame in a batch.
_FRAME_TAG = b"\x0a"
_SMALL = [bytes((n,)) for n in range(0x80)]
#: A frame's tag and length, for frames under 128 bytes.
_SHORT_HEADS = [_FRAME_TAG + length for length in _SMALL]


def varint(value: int) -> bytes:
    """A protobuf varint."""
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:  # two bytes: most lengths of frames and audio chunks
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:  # three: a batch's length, a seq past 16,383
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, data: bytes) -> bytes:
    """Field `field_number` of a message holding `data` (a serialized message, string or
    bytes), as it appears in the serialized outer message: appended to other fields of
    that message, it reads as set (field order is free in the protobuf encoding)."""
    return member_frame(varint(field_number << 3 | 2), data)


def encode(frames: Sequence[bytes]) -> bytes:
    """The ConnectBatchedRequest / ConnectBatchedResponse of serialized frames."""
    parts: list[bytes] = []
    append = parts.append
    for frame in frames:
        # Each frame's tag and length as one part, inline for the usual sizes (256 run
        # events or chat tokens a batch: a fifth less than a varint() call each).
        size = len(frame)
        if size < 0x80:
            append(_SHORT_HEADS[size])
        elif size < 0x4000:
            append(bytes((0x0A, size & 0x7F | 0x80, size >> 7)))
        else:
            append(_FRAME_TAG + varint(size))
        append(frame)
    return b"".join(parts)


def take(
    frames: deque[_Frame], max_frames: int, max_bytes: int, held: int = 0
) -> tuple[list[_Frame], int]:
    """The frames at the front of `frames` that one batch holds, taken out, and their
    size: at most `max_frames`, within `max_bytes` with the `held` bytes of the frame the
    batch has already, if any, unless it is empty and the first alone is larger (a
    larger frame goes alone, never with another: two of the largest frames would make a
    message past gRPC's bound)."""
    size = held
    taken: list[_Frame] = []
    while frames and len(taken) < max_frames:
        if (taken or held) and size + len(frames[0]) > max_bytes:
            break
        frame = frames.popleft()
        size += len(frame)
        taken.append(frame)
    return taken, size - held


def member_frame(tag: bytes, message: bytes) -> bytes:
    """A frame with one member set, serialized: the member's tag (field number, wire type
    2), then the serialized member, length-delimited: what serializing the frame gives."""
    return tag + varint(len(message)) + message


def serialize(batch: bytes) -> bytes:
    """The serializer of a batched stream: messages are encoded before they are written."""
    return batch
