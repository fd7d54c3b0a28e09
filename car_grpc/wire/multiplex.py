"""Many sessions over one stream: the wire of SessionService.ConnectMultiplexed.

A message is a list of per-session records (MultiplexedClientSession up,
MultiplexedServerSession down), each carrying one ConnectBatched batch of that session,
already serialized, and/or the session's end and its credits. Records are encoded here by
hand, as batch.py encodes batches, so a batch is never parsed or copied on its way through
the multiplexer; they are decoded with protobuf.

Credits stand in for the HTTP/2 flow control each session had on a stream of its own: per
session and direction a batch may be sent while fewer than WINDOW_BATCHES batches and
less than WINDOW_BYTES of them are unacknowledged; the receiver acknowledges batches once
the session has taken them (the core's session read them; the gateway's connection took
them for its client). So the receiver holds per session at most WINDOW_BATCHES batches
and WINDOW_BYTES plus one batch, and a session whose client is slow stops only its own
sender. An acknowledgement rides in the record of the session's next batch (a request
and its answer are one record each way, and a round trip two gRPC messages, not three);
only once some session is owed half a window (`ack_due`) do all that are owed go at
once, on their own if need be. A sender stops only with a full window, and once the
receiver has taken all of it, half a window is owed: a blocked sender is always
acknowledged.

Credits of the whole stream bound what the gateway may make the core hold across all its
sessions (a session's credits times MAX_SESSIONS would be 16 GiB): a batch goes up only
while less than the core's stream bound (CoreConfig.multiplex_stream_bytes, announced in
the stream's initial metadata under STREAM_BYTES_KEY) is unacknowledged across the
stream's sessions; the core ends a stream past it with INVALID_ARGUMENT. What a session
had unacknowledged stops counting at the core when the session ends or its cancel record
comes, and at the gateway only when the session's end record comes back: the gateway
never counts less than the core.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from car_grpc.wire.batch import varint

#: A session's batch may be sent while fewer than this many are unacknowledged, each way,
WINDOW_BATCHES = 16
#: and less than this many bytes of them.
WINDOW_BYTES = 256 * 1024
#: Most bytes of records in one gRPC message (a larger record goes alone).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Sessions one stream may carry at once; a session past it ends at once (RESOURCE_EXHAUSTED).
#: Not a memory bound (the stream's bytes bound is, and the daemon token may open more
#: streams): a sanity bound on one stream's session table.
MAX_SESSIONS = 65536
#: Initial metadata of a ConnectMultiplexed stream: the bytes the core lets be
#: unacknowledged across the stream's sessions (decimal).
STREAM_BYTES_KEY = "car-multiplex-stream-bytes"


def fits(unacked_batches: int, unacked_bytes: int) -> bool:
    """Whether one more batch may be sent with so much unacknowledged."""
    return unacked_batches < WINDOW_BATCHES and unacked_bytes < WINDOW_BYTES


def ack_due(owed_batches: int, owed_bytes: int) -> bool:
    """Whether acknowledgements owed must go now, on their own, rather than with the next
    message: half a window (so a sender whose window is full is never left waiting)."""
    return owed_batches >= WINDOW_BATCHES // 2 or owed_bytes >= WINDOW_BYTES // 2


class Owed:
    """The acknowledgements one side owes the other, by session (batches, bytes): each
    rides in its session's next record, and all go on their own once some session is
    owed half a window (`due`)."""

    def __init__(self) -> None:
        self._by_session: dict[int, list[int]] = {}
        self.due = False
        #: The bytes owed, over every session.
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self._by_session)

    def add(self, session: int, size: int) -> bool:
        """Session `session` took a batch of `size` bytes; True when that makes them due."""
        ack = self._by_session.setdefault(session, [0, 0])
        ack[0] += 1
        ack[1] += size
        self.bytes += size
        if ack_due(*ack):
            self.due = True
            return True
        return False

    def of(self, session: int) -> tuple[int, int]:
        """What `session` has taken and not yet acknowledged."""
        ack = self._by_session.get(session)
        return (ack[0], ack[1]) if ack else (0, 0)

    def take(self, session: int) -> tuple[int, int]:
        """What is owed to `session`, for its next record (or dropped: it ended)."""
        ack = self._by_session.pop(session, None)
        if ack is None:
            return (0, 0)
        self.bytes -= ack[1]
        return (ack[0], ack[1])

    def records(self) -> list[bytes]:
        """Every acknowledgement owed, each as a record of its own; none is owed after."""
        out = [record(key, ack=(n, size)) for key, (n, size) in self._by_session.items()]
        self._by_session.clear()
        self.due = False
        self.bytes = 0
        return out


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
    parts = [b"\x08", varint(session)]
    if batch:
        parts += (b"\x12", varint(len(batch)), batch)
    if end:
        parts.append(b"\x18\x01")
    if flag4:
        parts += (b"\x20", varint(flag4))
    if ack[0]:
        parts += (b"\x28", varint(ack[0]), b"\x30", varint(ack[1]))
    if message:
        raw = message.encode()
        parts += (b"\x3a", varint(len(raw)), raw)
    # One join, the record's length from its parts': the batch (often hundreds of KB) is
    # copied once, not into a body and then again behind the body's length.
    return b"".join([b"\x0a", varint(sum(map(len, parts))), *parts])


class Pull(Protocol):
    """A session whose next record is made when the message is (its frames taken then)."""

    def pulled(self) -> bytes | None:
        """The record (b"": none after all), or None while the session's credits hold it."""
        ...


def next_records(queue: deque[bytes | Pull]) -> tuple[list[bytes], bool]:
    """Records from the front of `queue` for one message, up to MAX_MESSAGE_BYTES (a larger
    record goes alone), and whether more are ready. A pull the credits hold back keeps its
    place (its session's acknowledgement wakes the writer)."""
    out: list[bytes] = []
    size = 0
    held: list[Pull] = []
    while queue:
        item = queue[0]
        if not isinstance(item, bytes):
            record = item.pulled()
            if record is None:
                queue.popleft()
                held.append(item)
                continue
            if not record:
                queue.popleft()
                continue
            queue[0] = item = record  # taken: from here on an ordinary record
        if out and size + len(item) > MAX_MESSAGE_BYTES:
            break
        queue.popleft()
        out.append(item)
        size += len(item)
    more = bool(queue)
    queue.extendleft(reversed(held))
    return out, more
