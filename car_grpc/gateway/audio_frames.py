"""The CAR binary frame protocol for audio on the WebSocket, free of I/O (voice.proto).

    byte 0       type: 0x01 PCM in, 0x02 TTS chunk, 0x03 TTS final, 0x04 TTS error
    bytes 1-16   the voice session id, 16 raw UUID bytes (its lowercase hex is the id)
    bytes 17-24  seq, u64 little-endian
    byte 25      format (0x02 only): 0x00 PCM16LE, 0x01 MP3, 0x02 WAV
    bytes 26-    payload

A frame is a car.v1.VoiceAudio on both sides of the codec (the header's type byte is the
AudioFrameType value, the format byte the AudioFormat value - 1), so the gateway turns a
client's binary frame into `ClientFrame.voice_audio` and `ServerFrame.voice_audio` into a
binary frame without any other model of audio.
"""

from __future__ import annotations

import struct

from car_grpc.gateway.jsonrpc import Inbound, error_object, error_response
from car_grpc.v1 import session_pb2, voice_pb2
from car_grpc.wire import batch
from car_grpc.wire.errors import INVALID_REQUEST

VoiceAudio = voice_pb2.VoiceAudio

HEADER = struct.Struct("<B16sQB")
HEADER_SIZE = HEADER.size  # 26

PCM = voice_pb2.AUDIO_FRAME_TYPE_PCM
TTS_CHUNK = voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK
TTS_FINAL = voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL
TTS_ERROR = voice_pb2.AUDIO_FRAME_TYPE_TTS_ERROR

_TYPE_NAMES = {
    PCM: "PCM in",
    TTS_CHUNK: "TTS chunk",
    TTS_FINAL: "TTS final",
    TTS_ERROR: "TTS error",
}
#: Format byte <-> AudioFormat (the enum reserves 0 for UNSPECIFIED).
_FORMATS = {
    0x00: voice_pb2.AUDIO_FORMAT_PCM16LE,
    0x01: voice_pb2.AUDIO_FORMAT_MP3,
    0x02: voice_pb2.AUDIO_FORMAT_WAV,
}
_FORMAT_BYTES = {fmt: byte for byte, fmt in _FORMATS.items()}
#: JSON text may start with these control bytes (whitespace); no audio frame type does.
_JSON_WHITESPACE = frozenset(b"\t\n\r")


class BinaryFrameError(ValueError):
    """The bytes are not a valid audio frame; the message says why."""


def is_audio_frame(data: bytes) -> bool:
    """Whether a binary WebSocket message is an audio frame rather than JSON text.

    Audio frames start with a control byte (a type in 0x01-0x1f); JSON text never does,
    except for whitespace.
    """
    return bool(data) and 0x01 <= data[0] <= 0x1F and data[0] not in _JSON_WHITESPACE


def decode(data: bytes) -> VoiceAudio:
    """Parse one audio frame (any type). Raises BinaryFrameError."""
    if len(data) < HEADER_SIZE:
        raise BinaryFrameError(
            f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte audio frame header"
        )
    kind, raw_id, seq, fmt = HEADER.unpack_from(data)
    if kind not in _TYPE_NAMES:
        raise BinaryFrameError(f"unknown frame type 0x{kind:02x}")
    frame = VoiceAudio(session_id=raw_id.hex(), seq=seq, type=kind, data=data[HEADER_SIZE:])
    if kind == TTS_CHUNK:
        if fmt not in _FORMATS:
            raise BinaryFrameError(f"unknown audio format 0x{fmt:02x}")
        frame.format = _FORMATS[fmt]
    elif kind == PCM:
        frame.format = voice_pb2.AUDIO_FORMAT_PCM16LE
    return frame


def encode(frame: VoiceAudio) -> bytes:
    """The binary frame of `frame`. Raises BinaryFrameError when it cannot be one."""
    if frame.type not in _TYPE_NAMES:
        raise BinaryFrameError(f"unknown frame type {frame.type}")
    try:
        raw_id = bytes.fromhex(frame.session_id)
    except ValueError:
        raw_id = b""
    if len(raw_id) != 16:
        raise BinaryFrameError(f"session id {frame.session_id!r} is not 32 hex digits")
    fmt = 0x00
    if frame.type == TTS_CHUNK:
        fmt = _FORMAT_BYTES.get(frame.format or voice_pb2.AUDIO_FORMAT_PCM16LE, -1)
        if fmt < 0:
            raise BinaryFrameError(f"unknown audio format {frame.format}")
    return HEADER.pack(frame.type, raw_id, frame.seq, fmt) + frame.data


def check_pcm(data: bytes | memoryview) -> None:
    """PCM16LE audio is whole 16-bit samples, and at least one. Raises BinaryFrameError."""
    if not data:
        raise BinaryFrameError("empty PCM payload")
    if len(data) % 2:
        raise BinaryFrameError(f"PCM16LE payload of odd length ({len(data)} bytes)")


# ------------------------------------------------------------------ the gateway's side


def from_client(data: bytes) -> Inbound:
    """A client's audio frame as `ClientFrame.voice_audio` for the core (serialized), or
    the JSON-RPC error (-32600, id null) that answers a malformed one."""
    inbound = Inbound()
    try:
        if len(data) < HEADER_SIZE:
            decode(data)  # raises, saying why
        kind, raw_id, seq, _ = HEADER.unpack_from(data)
        if kind != PCM:
            if kind not in _TYPE_NAMES:
                raise BinaryFrameError(f"unknown frame type 0x{kind:02x}")
            raise BinaryFrameError(
                f"type 0x{kind:02x} ({_TYPE_NAMES[kind]}) goes from the server "
                "to the client; clients send 0x01 (PCM in)"
            )
        pcm = memoryview(data)[HEADER_SIZE:]
        check_pcm(pcm)
    except BinaryFrameError as e:
        error = error_object(INVALID_REQUEST, f"invalid binary frame: {e}")
        inbound.replies.append(error_response(None, error))
        return inbound
    inbound.add(_client_pcm(raw_id, seq, pcm))
    return inbound


_CLIENT_VOICE_AUDIO = batch.varint(session_pb2.ClientFrame.VOICE_AUDIO_FIELD_NUMBER << 3 | 2)
#: VoiceAudio.session_id's tag and length (32 hex digits), .seq's and .data's tags.
_SESSION_ID = batch.varint(VoiceAudio.SESSION_ID_FIELD_NUMBER << 3 | 2) + batch.varint(32)
_SEQ = batch.varint(VoiceAudio.SEQ_FIELD_NUMBER << 3)
_DATA = batch.varint(VoiceAudio.DATA_FIELD_NUMBER << 3 | 2)
#: VoiceAudio.type = PCM and .format = PCM16LE, serialized (varint fields).
_PCM16LE = (
    batch.varint(VoiceAudio.TYPE_FIELD_NUMBER << 3)
    + batch.varint(PCM)
    + batch.varint(VoiceAudio.FORMAT_FIELD_NUMBER << 3)
    + batch.varint(voice_pb2.AUDIO_FORMAT_PCM16LE)
)


def _client_pcm(raw_id: bytes, seq: int, pcm: memoryview) -> bytes:
    """The serialized ClientFrame of a PCM frame: the bytes that serializing
    ClientFrame(voice_audio=decode(frame)) gives, written directly (the audio is copied
    once, and no message is built)."""
    seq_field = _SEQ + batch.varint(seq) if seq else b""
    size = batch.varint(len(pcm))
    fields = (_SESSION_ID, raw_id.hex().encode(), seq_field, _PCM16LE, _DATA, size, pcm)
    return b"".join((_CLIENT_VOICE_AUDIO, batch.varint(sum(map(len, fields))), *fields))
