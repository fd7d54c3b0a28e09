"""Pure parts of voice sessions and meetings: ids, PCM checks, the events the server makes,
and what a meeting takes from an event."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from car_grpc.core.meetings import MAX_SEGMENT_TEXT, TRUNCATED, transcript_segment
from car_grpc.core.voice import (
    _audio_head,
    _audio_message,
    _event_bytes,
    _notice_head,
    canonical_session_id,
    decode_pcm,
    ended_event,
    error_event,
)
from car_grpc.v1 import session_pb2, voice_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import INVALID_PARAMS, CarError
from car_grpc.wire.twins import fill_out


def test_any_uuid_spelling_becomes_32_lowercase_hex_digits() -> None:
    u = uuid.uuid4()
    for spelling in (str(u), str(u).upper(), u.hex, f"{{{u}}}", f"urn:uuid:{u}"):
        assert canonical_session_id(spelling) == u.hex


def test_a_session_id_that_is_not_a_uuid_is_refused_naming_the_field() -> None:
    with pytest.raises(CarError) as e:
        canonical_session_id("session-1")
    assert e.value.code == INVALID_PARAMS
    assert e.value.message == "invalid params: not a UUID: session_id"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_pushed_pcm_is_decoded() -> None:
    assert decode_pcm(b64(b"\x01\x00\xff\x7f"), 1024) == b"\x01\x00\xff\x7f"


@pytest.mark.parametrize(
    ("pcm_b64", "message"),
    [
        ("", "invalid params: missing field: pcm_b64"),
        ("not base64!", "invalid params: not base64: pcm_b64"),
        (b64(b"\x01\x02\x03"), "invalid params: PCM16LE needs an even number of bytes, got 3"),
        (b64(b"\x00" * 6), "invalid params: audio chunk of 6 bytes is over 4: pcm_b64"),
    ],
)
def test_bad_pcm_is_refused_naming_pcm_b64(pcm_b64: str, message: str) -> None:
    with pytest.raises(CarError) as e:
        decode_pcm(pcm_b64, 4)
    assert e.value.code == INVALID_PARAMS
    assert e.value.message.startswith(message)
    assert "pcm_b64" in e.value.message


def test_the_server_events_are_terminal() -> None:
    assert codec.value_to_json(ended_event("stopped")) == {
        "type": "ended",
        "reason": "stopped",
        "terminal": True,
    }
    assert codec.value_to_json(error_event("engine gone")) == {
        "type": "error",
        "message": "engine gone",
        "terminal": True,
    }
    assert codec.value_to_json(error_event("bad frame", terminal=False)) == {
        "type": "error",
        "message": "bad frame",
    }


def segment_of(event: Any) -> Any:
    segment = transcript_segment(codec.to_value(event))
    return None if segment is None else codec.message_to_json(segment)


def test_a_final_transcript_event_is_a_segment() -> None:
    event = {
        "type": "transcript",
        "final": True,
        "text": "hello there",
        "speaker": "ana",
        "start_ms": 1200,
        "end_ms": 2400.0,
        "confidence": 0.9,
    }
    assert segment_of(event) == {
        "index": 0,
        "text": "hello there",
        "speaker": "ana",
        "start_ms": 1200,
        "end_ms": 2400,
        "received_at": 0,
        "session_id": "",
    }


@pytest.mark.parametrize(
    "event",
    [
        {"type": "transcript", "final": False, "text": "hel"},
        {"type": "transcript", "text": "no final flag"},
        {"type": "transcript", "final": "true", "text": "final is not a bool"},
        {"type": "transcript", "final": True},
        {"type": "transcript", "final": True, "text": 42},
        {"type": "tts", "final": True, "text": "x"},
        "transcript",
        None,
    ],
)
def test_anything_else_is_not_a_segment(event: Any) -> None:
    assert segment_of(event) is None


def test_wrong_typed_optional_fields_are_left_out() -> None:
    event = {"type": "transcript", "final": True, "text": "x", "speaker": 3, "start_ms": True}
    assert segment_of(event) == {
        "index": 0,
        "text": "x",
        "received_at": 0,
        "session_id": "",
    }


def test_a_long_segment_is_cut_at_16_kib_with_a_marker() -> None:
    segment = transcript_segment(
        codec.to_value({"type": "transcript", "final": True, "text": "é" * MAX_SEGMENT_TEXT})
    )
    assert segment is not None
    assert segment.text.endswith(TRUNCATED)
    assert len(segment.text.encode()) <= MAX_SEGMENT_TEXT


@pytest.mark.parametrize("seq", [0, 1, 300, 2**63])
def test_a_chunk_for_the_engine_is_the_message_it_stands_for(seq: int) -> None:
    """The core writes a session's audio as bytes (a cached head, seq and data appended):
    they read as the message built and serialized the usual way, twins derived."""
    session_id, data = uuid.uuid4().hex, b"\x01\x00" * 1600
    raw = _audio_message(_audio_head(session_id), seq, data)
    audio = voice_pb2.VoiceAudio(
        session_id=session_id,
        seq=seq,
        type=voice_pb2.AUDIO_FRAME_TYPE_PCM,
        format=voice_pb2.AUDIO_FORMAT_PCM16LE,
        data=data,
    )
    expected = fill_out(voice_pb2.ServeVoiceResponse(audio=audio))
    assert voice_pb2.ServeVoiceResponse.FromString(raw) == expected
    assert expected.audio.voice_session_id == session_id


def test_an_event_frame_for_the_owner_is_the_frame_it_stands_for() -> None:
    session_id = uuid.uuid4().hex
    event = codec.to_value({"type": "transcript", "final": False, "text": "...", "n": [1, 2]})
    raw = _event_bytes(_notice_head(session_id), event)
    notice = voice_pb2.VoiceEventNotice(session_id=session_id, event=event)
    expected = fill_out(session_pb2.ServerFrame(voice_event=notice))
    assert session_pb2.ServerFrame.FromString(raw) == expected
    assert expected.voice_event.voice_session_id == session_id
