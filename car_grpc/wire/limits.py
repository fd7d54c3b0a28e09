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
