"""Message limits every side of the gRPC bridge agrees on."""

from __future__ import annotations

#: Largest gRPC message accepted or sent, by the core and by its clients (the gateway,
#: the dashboard): a 256-turn batch of 256 KiB turns fits.
MAX_MESSAGE_BYTES = 80 * 1024 * 1024

#: gRPC channel/server options that apply MAX_MESSAGE_BYTES both ways.
MESSAGE_SIZE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

#: Most bytes of one serialized frame (a ClientFrame or ServerFrame) on a session stream:
#: a gRPC message less room for what wraps the frame there (its tag and length in a
#: ConnectBatched batch, then a ConnectMultiplexed record's session, end, code and
#: acknowledgement: under 100 bytes) and for the ids and envelope the core adds to a frame
#: it forwards (a tool's call, a chat event). A larger frame would fail the whole stream,
#: which on a multiplexed stream carries every session of a gateway: it is refused alone.
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


def frame_too_large(size: int) -> str:
    """What refuses a frame of `size` bytes (over MAX_FRAME_BYTES)."""
    return (
        f"frame too large: {size} bytes as protobuf, over the {MAX_FRAME_BYTES} bytes"
        f" a frame may carry (MAX_FRAME_BYTES)"
    )
