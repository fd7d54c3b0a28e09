"""Speech to text for one voice session with PocketSphinx (its wheel ships the en-US
model): audio in as it arrives, transcript events out. No I/O, not thread-safe: one
session's audio goes through one Recognizer, in order, from one thread at a time.

The audio is resampled to 16 kHz and cut into utterances by PocketSphinx's voice activity
endpointer. While an utterance is being spoken, every chunk that changes the best guess
yields a partial segment; when the speaker pauses (or the audio ends) the utterance's final
segment follows, with where it lies in the audio:

    {"type": "transcript", "final": false, "text": "open the"}
    {"type": "transcript", "final": true, "text": "open the pod bay doors",
     "start_ms": 120, "end_ms": 1830}

Without `phrases` the decoder uses the model's general English language model: real, but
fuzzy on a small model. With `phrases` (say, the commands an app understands) it uses a
grammar of exactly those phrases: the text is one of them, or, when the speech reaches the
end of none, the start of the nearest ("turn off the").
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from pocketsphinx import Decoder, Endpointer

from car_grpc.voice_engine import options as opt
from car_grpc.voice_engine.audio import Resampler

#: The rate the acoustic model was trained at.
MODEL_RATE = 16000
OPTIONS = ("sample_rate", "phrases")
#: Audio kept before an utterance's start is known (the endpointer decides within 0.3 s).
PREROLL = 0.5
#: Seconds after which an utterance without a pause is cut into segments (bounds the
#: audio a session holds).
MAX_UTTERANCE = 30
MAX_PHRASES = 1000
MAX_PHRASE_CHARS = 200
_WORD = re.compile(r"[a-z']+")

Event = dict[str, Any]


def _grammar(decoder: Decoder, phrases: Sequence[str]) -> str:
    """A JSGF grammar whose sentences are `phrases`; every word must be in the model's
    pronunciation dictionary."""
    alternatives = []
    for phrase in phrases:
        words = phrase.lower().split()
        for word in words:
            if not _WORD.fullmatch(word):
                raise opt.Refusal(
                    f"option phrases: {word!r} in {phrase!r} is not a word (letters and "
                    "apostrophes; spell numbers out)"
                )
            if decoder.lookup_word(word) is None:
                raise opt.Refusal(
                    f"option phrases: {word!r} is not in the model's pronunciation dictionary"
                )
        alternatives.append(" ".join(words))
    return "#JSGF V1.0;\ngrammar phrases;\npublic <phrase> = " + " | ".join(alternatives) + ";\n"


class Recognizer:
    """One session's speech recognition (module docstring). The constructor loads the
    model (about 0.1 s of CPU with phrases, 0.5 s without): run it off the event loop."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        opt.check_names(options, OPTIONS)
        rate = opt.sample_rate(options)
        phrases = opt.strings(options, "phrases", MAX_PHRASES, MAX_PHRASE_CHARS)
        if phrases is None:
            self._decoder = Decoder(samprate=MODEL_RATE, loglevel="FATAL")
        else:
            self._decoder = Decoder(samprate=MODEL_RATE, lm=None, loglevel="FATAL")
            self._decoder.add_jsgf_string("phrases", _grammar(self._decoder, phrases))
            self._decoder.activate_search("phrases")
        self._resampler = Resampler(rate, MODEL_RATE)
        self._endpointer = Endpointer(sample_rate=MODEL_RATE)
        self._frame = self._endpointer.frame_bytes
        self._frame_seconds = float(self._endpointer.frame_length)
        self._preroll: deque[bytes] = deque(maxlen=math.ceil(PREROLL / self._frame_seconds))
        self._pending = b""  # resampled audio short of a whole frame
        self._frames_seen = 0
        self._speaking = False  # an utterance is under way
        self._utterance = bytearray()  # its audio
        self._utterance_start = 0.0
        self._partial = ""  # the last partial text sent in this utterance

    def feed(self, pcm: bytes) -> list[Event]:
        """Takes a chunk of the session's PCM16LE audio; the events it leads to."""
        events: list[Event] = []
        self._frames(self._resampler.feed(pcm), events)
        if self._speaking:
            text = self._text()
            if text and text != self._partial:
                self._partial = text
                events.append({"type": "transcript", "final": False, "text": text})
        return events

    def finish(self) -> list[Event]:
        """The audio is over: the last utterance's final segment, if one was under way."""
        events: list[Event] = []
        self._frames(self._resampler.flush(), events)
        if self._speaking:
            self._utterance += self._pending
            self._end_utterance(self._now() + len(self._pending) / (2 * MODEL_RATE), events)
        self._pending = b""
        return events

    def _now(self) -> float:
        """Seconds of audio taken so far."""
        return self._frames_seen * self._frame_seconds

    def _frames(self, pcm: bytes, events: list[Event]) -> None:
        data = self._pending + pcm
        whole = len(data) - len(data) % self._frame
        for at in range(0, whole, self._frame):
            self._take(data[at : at + self._frame], events)
        self._pending = data[whole:]

    def _take(self, frame: bytes, events: list[Event]) -> None:
        # The endpointer only says where utterances begin and end: the decoder gets the
        # raw audio around them (the endpointer's own speech output trims soft word
        # endings, which costs words), from PREROLL before the start is known until the
        # end is known.
        was_speech = self._endpointer.in_speech
        self._endpointer.process(frame)
        self._frames_seen += 1
        if not self._speaking:
            self._preroll.append(frame)
            if not was_speech and self._endpointer.in_speech:
                self._begin_utterance(b"".join(self._preroll), self._endpointer.speech_start)
                self._preroll.clear()
            return
        self._utterance += frame
        self._decoder.process_raw(frame, False, False)
        if not self._endpointer.in_speech:
            self._end_utterance(self._endpointer.speech_end, events)
        elif len(self._utterance) >= MAX_UTTERANCE * 2 * MODEL_RATE:  # cut a long one
            self._end_utterance(self._now(), events)
            self._begin_utterance(b"", self._now())

    def _begin_utterance(self, audio: bytes, start: float) -> None:
        self._decoder.start_utt()
        if audio:
            self._decoder.process_raw(audio, False, False)
        self._speaking = True
        self._utterance = bytearray(audio)
        self._utterance_start = start
        self._partial = ""

    def _end_utterance(self, end: float, events: list[Event]) -> None:
        """Ends the live pass (its text was the partials) and decodes the utterance once
        more as a whole, with fresh feature state: normalized over its own audio rather
        than what came before, which on a fresh stream is the difference between "close
        the pod" and "close the pod bay doors". That text is the final segment."""
        self._decoder.end_utt()
        self._decoder.reinit_feat()
        self._decoder.start_utt()
        if self._utterance:
            self._decoder.process_raw(bytes(self._utterance), False, True)
        self._decoder.end_utt()
        self._speaking = False
        self._utterance = bytearray()
        text = self._text()
        if text:
            events.append(
                {
                    "type": "transcript",
                    "final": True,
                    "text": text,
                    "start_ms": round(self._utterance_start * 1000),
                    "end_ms": round(end * 1000),
                }
            )

    def _text(self) -> str:
        hypothesis = self._decoder.hyp()
        return "" if hypothesis is None else str(hypothesis.hypstr)
