"""The reference speech engine's parts without a server: the streaming resampler, the
recognizer's utterances and its bounds, and the options it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from car_grpc.voice_engine import recognizer
from car_grpc.voice_engine.audio import Resampler, resample
from car_grpc.voice_engine.options import Refusal
from car_grpc.voice_engine.recognizer import Event, Recognizer
from car_grpc.voice_engine.speaker import Utterance
from tests.voice_helpers import chunks, say, silence

PHRASES = ["open the pod bay doors please", "stop the music"]


def tone(seconds: float, rate: int, hz: float = 440.0) -> bytes:
    samples = (
        round(8000 * math.sin(2 * math.pi * hz * n / rate)) for n in range(round(seconds * rate))
    )
    return b"".join(s.to_bytes(2, "little", signed=True) for s in samples)


def test_the_resampler_leaves_no_seams_between_chunks() -> None:
    audio = tone(1.0, 22050)
    whole = resample(audio, 22050, 16000)
    streamed = Resampler(22050, 16000)
    pieces = b"".join(streamed.feed(part) for part in chunks(audio, 22050, 0.037))
    # The same samples, but for rounding: the filter works in blocks of its own.
    a, b = np.frombuffer(pieces + streamed.flush(), "<i2"), np.frombuffer(whole, "<i2")
    assert len(a) == len(b)
    assert np.abs(a.astype(int) - b).max() <= 2
    assert abs(len(whole) // 2 - 16000) <= 2
    assert resample(audio, 16000, 16000) == audio  # the model's own rate passes through


def recognize(rec: Recognizer, pcm: bytes, rate: int) -> list[Event]:
    events: list[Event] = []
    for part in chunks(pcm, rate):
        events += rec.feed(part)
    return events + rec.finish()


def test_silence_is_no_speech() -> None:
    rec = Recognizer({"phrases": PHRASES})
    assert recognize(rec, silence(3, 16000), 16000) == []


def test_speech_without_a_pause_is_cut_into_bounded_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recognizer, "MAX_UTTERANCE", 1)  # seconds
    speech, rate = say("open the pod bay doors please")
    finals = [e for e in recognize(Recognizer({"sample_rate": rate}), speech, rate) if e["final"]]
    # About two seconds of speech: a segment cut after one second, then the rest, back to
    # back.
    assert len(finals) == 2, finals
    assert finals[0]["end_ms"] == finals[1]["start_ms"]
    assert finals[0]["end_ms"] - finals[0]["start_ms"] <= 1000 + 500  # + the pre-roll


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"phrases": ["call 4 people"]}, "option phrases: '4' in 'call 4 people' is not a word"),
        ({"phrases": []}, "option phrases must be a list of 1 to 1000 strings"),
        ({"phrases": "stop"}, "option phrases must be a list of 1 to 1000 strings"),
        ({"sample_rate": True}, "option sample_rate must be one of"),
    ],
)
def test_recognizer_options_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(Refusal, match=message.replace("(", r"\(")):
        Recognizer(options)


def test_speaker_options_are_checked() -> None:
    assert Utterance.from_options({"text": "hi", "sample_rate": 24000.0}) == Utterance(
        text="hi", voice="en", words_per_minute=175, sample_rate=24000
    )
    for options, message in (
        ({"text": "hi", "voice": "-x"}, "option voice: not an eSpeak NG voice name: '-x'"),
        ({"text": "hi", "words_per_minute": 9}, "option words_per_minute must be 80..450"),
        ({"text": "x" * 1001}, "option text is over 1000 characters"),
    ):
        with pytest.raises(Refusal) as refused:
            Utterance.from_options(options)
        assert str(refused.value).startswith(message)
