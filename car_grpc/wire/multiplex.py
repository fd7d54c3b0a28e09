"""Many sessions over one stream: the wire of SessionService.ConnectMultiplexed.

A message is a list of per-session records (MultiplexedClientSession up,
MultiplexedServerSession down), each carrying one ConnectBatched batch of that session,
already serialized, and/or the session's end and its credits. Records are encoded here by
hand, as batch.py encodes batches, so a batch is never parsed or copied on its way through
the multiplexer; they are decoded with protobuf.

Credits stand in for the HTTP/2 flow control each session had on a stream of its own: per
session and direction at most WINDOW_BATCHES batches and WINDOW_BYTES of them (a larger
batch alone) are unacknowledged; the receiver acknowledges a batch when the session has
taken it (the core's session read it; the gateway's connection took it to its client).
So the receiver's buffer per session is bounded, and a session whose client is slow
stops only its own sender.
"""

from __future__ import annotations

from car_grpc.wire.batch import _varint

#: Batches of one session that may be unacknowledged, each way.
WINDOW_BATCHES = 16
#: Their bytes (a larger batch goes alone, when nothing else is unacknowledged).
WINDOW_BYTES = 256 * 1024
#: Most bytes of records in one gRPC message (a larger record goes alone).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Sessions one stream may carry at once; a session past it ends at once (RESOURCE_EXHAUSTED).
MAX_SESSIONS = 65536


def fits(unacked_batches: int, unacked_bytes: int, size: int) -> bool:
    """Whether a batch of `size` bytes may be sent with so much unacknowledged."""
    if unacked_batches == 0:
        return True
    return unacked_batches < WINDOW_BATCHES and unacked_bytes + size <= WINDOW_BYTES


def record(
    session: int,
    batch: bytes = b"",
    *,
    end: bool = False,
    flag4: int = 0,
    ack: tuple[int, int] = (0, 0),
    message: str = "",
) -> bytes:
    """One session's record, as field 1 of its ConnectMultiplexedRequest/Response.
    `flag4`: `cancel` up (1), the status `code` down."""
    parts = [b"\x08", _varint(session)]
    if batch:
        parts += (b"\x12", _varint(len(batch)), batch)
    if end:
        parts.append(b"\x18\x01")
    if flag4:
        parts += (b"\x20", _varint(flag4))
    if ack[0]:
        parts += (b"\x28", _varint(ack[0]), b"\x30", _varint(ack[1]))
    if message:
        raw = message.encode()
        parts += (b"\x3a", _varint(len(raw)), raw)
    body = b"".join(parts)
    return b"\x0a" + _varint(len(body)) + body
