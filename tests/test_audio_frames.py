"""The CAR binary audio frame codec (car_grpc/gateway/audio_frames.py), without sockets."""

from __future__ import annotations

import json
import struct
import uuid

import pytest

from car_grpc.gateway import audio_frames
from car_grpc.gateway.audio_frames import BinaryFrameError, decode, encode, is_audio_frame
from car_grpc.gateway.jsonrpc import Inbound
from car_grpc.v1 import session_pb2, voice_pb2
from car_grpc.wire.errors import INVALID_REQUEST

SESSION = uuid.UUID("0123456789abcdef0123456789abcdef")


def frame_bytes(kind: int, seq: int = 7, fmt: int = 0, payload: bytes = b"\x01\x02") -> bytes:
    return bytes([kind]) + SESSION.bytes + struct.pack("<Q", seq) + bytes([fmt]) + payload


def test_the_header_is_26_bytes_laid_out_as_the_protocol_says() -> None:
    audio = voice_pb2.VoiceAudio(
        session_id=SESSION.hex,
        seq=0x0102030405060708,
        type=voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK,
        format=voice_pb2.AUDIO_FORMAT_WAV,
        data=b"RIFF",
    )
    data = encode(audio)
    assert audio_frames.HEADER_SIZE == 26
    assert data[0] == 0x02
    assert data[1:17] == SESSION.bytes
    assert data[17:25] == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # u64 little-endian
    assert data[25] == 0x02  # WAV
    assert data[26:] == b"RIFF"


@pytest.mark.parametrize(
    ("kind", "fmt", "payload"),
    [
        (voice_pb2.AUDIO_FRAME_TYPE_PCM, voice_pb2.AUDIO_FORMAT_PCM16LE, b"\x00\x01" * 5),
        (voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK, voice_pb2.AUDIO_FORMAT_PCM16LE, b"\x10\x20"),
        (voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK, voice_pb2.AUDIO_FORMAT_MP3, b"\xff\xfb\x90"),
        (voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK, voice_pb2.AUDIO_FORMAT_WAV, b"RIFF...."),
        (voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL, voice_pb2.AUDIO_FORMAT_UNSPECIFIED, b""),
        (voice_pb2.AUDIO_FRAME_TYPE_TTS_ERROR, voice_pb2.AUDIO_FORMAT_UNSPECIFIED, b"boom"),
    ],
)
def test_every_type_round_trips(kind: int, fmt: int, payload: bytes) -> None:
    audio = voice_pb2.VoiceAudio(
        session_id=SESSION.hex,
        seq=2**64 - 1,
        type=kind,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        data=payload,
    )
    assert decode(encode(audio)) == audio


def test_format_byte_is_written_as_zero_for_other_types_and_ignored_on_read() -> None:
    final = voice_pb2.VoiceAudio(
        session_id=SESSION.hex,
        type=voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL,
        format=voice_pb2.AUDIO_FORMAT_MP3,
    )
    assert encode(final)[25] == 0
    pcm = decode(frame_bytes(0x01, fmt=0x7F))
    assert pcm.format == voice_pb2.AUDIO_FORMAT_PCM16LE


def test_an_unset_tts_format_is_pcm16le() -> None:
    chunk = voice_pb2.VoiceAudio(
        session_id=SESSION.hex, type=voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK, data=b"ab"
    )
    assert encode(chunk)[25] == 0x00


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01" + b"\x00" * 24, "25 bytes is shorter than the 26-byte audio frame header"),
        (frame_bytes(0x07), "unknown frame type 0x07"),
        (frame_bytes(0x02, fmt=0x03), "unknown audio format 0x03"),
    ],
)
def test_malformed_frames_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(BinaryFrameError) as e:
        decode(data)
    assert str(e.value) == reason


def test_encode_refuses_what_has_no_frame() -> None:
    with pytest.raises(BinaryFrameError, match="not 32 hex digits"):
        encode(voice_pb2.VoiceAudio(session_id="abc", type=voice_pb2.AUDIO_FRAME_TYPE_PCM))
    with pytest.raises(BinaryFrameError, match="unknown frame type"):
        encode(voice_pb2.VoiceAudio(session_id=SESSION.hex))


def test_audio_frames_are_told_apart_from_json_in_binary_frames() -> None:
    for kind in (0x01, 0x02, 0x03, 0x04, 0x07, 0x1F):
        assert is_audio_frame(bytes([kind]) + b"\x00" * 30)
    for text in (b'{"jsonrpc":"2.0"}', b"[]", b" {}", b"\t{}", b"\n[]", b"\r\n{}", b"", b"\xef"):
        assert not is_audio_frame(text)


def error_of(inbound: Inbound) -> dict[str, object]:
    assert not inbound.frames and len(inbound.replies) == 1
    reply: dict[str, object] = json.loads(inbound.replies[0])
    assert reply["id"] is None
    error = reply["error"]
    assert isinstance(error, dict) and error["code"] == INVALID_REQUEST
    return error


@pytest.mark.parametrize("seq", [0, 3, 2**64 - 1])
def test_a_client_pcm_frame_becomes_clientframe_voice_audio(seq: int) -> None:
    data = frame_bytes(0x01, seq=seq, payload=b"\x01\x00\x02\x00")
    inbound = audio_frames.from_client(data)
    assert not inbound.replies and not inbound.frames
    (raw,) = inbound.wire  # written directly: the bytes serializing the message gives
    assert raw == session_pb2.ClientFrame(voice_audio=decode(data)).SerializeToString()
    frame = session_pb2.ClientFrame.FromString(raw)
    assert frame.id == "" and frame.WhichOneof("body") == "voice_audio"
    assert frame.voice_audio.session_id == SESSION.hex
    assert frame.voice_audio.seq == seq
    assert frame.voice_audio.type == voice_pb2.AUDIO_FRAME_TYPE_PCM
    assert frame.voice_audio.format == voice_pb2.AUDIO_FORMAT_PCM16LE
    assert frame.voice_audio.data == b"\x01\x00\x02\x00"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00", "invalid binary frame: 2 bytes is shorter than the 26-byte"),
        (frame_bytes(0x05), "invalid binary frame: unknown frame type 0x05"),
        (frame_bytes(0x02), "invalid binary frame: type 0x02 (TTS chunk) goes from the server"),
        (frame_bytes(0x04), "invalid binary frame: type 0x04 (TTS error) goes from the server"),
        (frame_bytes(0x01, payload=b""), "invalid binary frame: empty PCM payload"),
        (frame_bytes(0x01, payload=b"\x01\x02\x03"), "invalid binary frame: PCM16LE payload of"),
    ],
)
def test_a_malformed_client_frame_gets_a_jsonrpc_error_with_null_id(
    data: bytes, message: str
) -> None:
    error = error_of(audio_frames.from_client(data))
    assert isinstance(error["message"], str) and error["message"].startswith(message)
