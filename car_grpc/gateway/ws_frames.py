"""The common case of RFC 6455 framing for the gateway's connections, beside websockets.

websockets parses every frame with a generator per frame (and per read of its header,
mask and payload) and serializes every frame through a Frame object: per chat token
about a sixth of the gateway process's CPU (bench/README.md, issue 16, `edge`). Here,
for a connection that negotiated no extension, only:

- whole data frames from the client (FIN set, no reserved bit, masked, within the size
  limit websockets applies, no fragmented message under way) are read straight from the
  bytes received (`header`, `unmask`), and given to the connection as the same events
  websockets would give; every other frame (control frames, fragments, a frame websockets
  refuses) is left to websockets, fed exactly one frame at a time (so its parser is back
  at a frame boundary after it, `at_boundary`), or everything from the first frame it
  refuses on, after which websockets alone reads the connection;
- data frames to the client are written as `frame_header` + payload (a server masks
  nothing), as websockets' serializer writes them.

websockets keeps the handshake, the closing handshake, pings, fragmentation, the errors
and their close codes: TrackedConnection (connection.py) uses this only while the
connection is open and websockets' parser waits at a frame boundary.
"""

from __future__ import annotations

from websockets.protocol import Protocol
from websockets.streams import StreamReader

try:  # websockets' own unmasking, in C where it was built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

#: Opcodes of data frames (RFC 6455 §5.2): text, binary.
TEXT, BINARY = 1, 2
#: First header byte of a whole text / binary frame: FIN, no reserved bit, the opcode.
TEXT_HEAD, BINARY_HEAD = 0x80 | TEXT, 0x80 | BINARY
#: Opcodes RFC 6455 defines: continuation, text, binary, close, ping, pong.
_KNOWN_OPCODES = frozenset({0, 1, 2, 8, 9, 10})
_MASKED = 0x80
#: The generator websockets' parser waits in between frames.
_AT_EOF = StreamReader.at_eof.__code__


def header(data: bytes, at: int) -> tuple[int, int] | None:
    """(the header's size, mask included when the frame is masked; the payload's size) of
    the frame starting at `at`; None while its header is not all there."""
    left = len(data) - at
    if left < 2:
        return None
    second = data[at + 1]
    length, size = second & 0x7F, 2
    if length == 126:
        size = 4
        if left < size:
            return None
        length = int.from_bytes(data[at + 2 : at + 4], "big")
    elif length == 127:
        size = 10
        if left < size:
            return None
        length = int.from_bytes(data[at + 2 : at + 10], "big")
    if second & _MASKED:
        size += 4
    return (size, length) if left >= size else None


def needed(data: bytes, at: int) -> int:
    """How many bytes from `at` the frame starting there needs before `header` reads it
    (used while its header is not all there)."""
    if len(data) - at < 2:
        return 2
    second = data[at + 1]
    length = second & 0x7F
    return 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if second & _MASKED else 0)


def readable(first: int, second: int, length: int, limit: int | None) -> bool:
    """Whether websockets reads past the header of a frame from a client (else it fails
    the connection there): masked, a known opcode, within `limit` (frame_limit)."""
    return (
        bool(second & _MASKED)
        and first & 0x0F in _KNOWN_OPCODES
        and (limit is None or length <= limit)
    )


def unmask(data: bytes, start: int, end: int) -> bytes:
    """The payload between `start` and `end` of a masked frame (its mask the four bytes
    before `start`)."""
    return apply_mask(memoryview(data)[start:end], data[start - 4 : start])


def frame_limit(protocol: Protocol) -> int | None:
    """The largest frame websockets' parser accepts next (None: any), as it computes it."""
    limit = protocol.max_message_size
    if limit is not None and protocol.current_size is not None:
        limit -= protocol.current_size
    fragment = protocol.max_fragment_size
    if fragment is not None:
        limit = fragment if limit is None else min(limit, fragment)
    return limit


def at_boundary(protocol: Protocol) -> bool:
    """Whether websockets' parser waits for the first byte of a frame, holding nothing."""
    if protocol.reader.buffer:
        return False
    parser = protocol.parser
    while (inner := getattr(parser, "gi_yieldfrom", None)) is not None:
        parser = inner
    return getattr(parser, "gi_code", None) is _AT_EOF


def frame_header(first: int, length: int) -> bytes:
    """The header of an unmasked frame (a server's) with first byte `first` and a payload
    of `length` bytes."""
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


#: The largest frame TrackedConnection holds the start of until the rest arrives; a
#: larger one is left to websockets (which reads it into a buffer of its own).
PARTIAL_BYTES = 64 * 1024
