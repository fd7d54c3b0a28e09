"""Text to speech with eSpeak NG (Debian's `espeak-ng` program): the text of a session's
options spoken as PCM16LE at the session's sample rate.

Options: `text` (required, at most MAX_TEXT characters), `voice` (an eSpeak NG voice such
as "en-us", default "en"), `words_per_minute` (80..450, default 175) and `sample_rate`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from car_grpc.voice_engine import options as opt
from car_grpc.voice_engine.audio import resample

OPTIONS = ("text", "voice", "words_per_minute", "sample_rate")
#: Characters of text a session may ask for (a minute of speech or so: speak more in
#: several sessions).
MAX_TEXT = 1000
#: How long one synthesis may take (a few seconds of text takes tens of ms).
TIMEOUT = 30.0
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,39}")


def espeak_ng() -> str | None:
    """The espeak-ng program, if installed."""
    return shutil.which("espeak-ng")


class SpeechFailed(Exception):
    """eSpeak NG could not speak the text; str(self) says why."""


@dataclass(frozen=True)
class Utterance:
    """What to say, and how (read from a session's options)."""

    text: str
    voice: str
    words_per_minute: int
    sample_rate: int

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Utterance:
        opt.check_names(options, OPTIONS)
        voice = opt.text(options, "voice", 40, default="en")
        if not _VOICE.fullmatch(voice):
            raise opt.Refusal(f"option voice: not an eSpeak NG voice name: {voice!r}")
        speed = options.get("words_per_minute", 175)
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not 80 <= speed <= 450:
            raise opt.Refusal(f"option words_per_minute must be 80..450, got {speed!r}")
        return cls(
            text=opt.text(options, "text", MAX_TEXT),
            voice=voice,
            words_per_minute=int(speed),
            sample_rate=opt.sample_rate(options),
        )


async def synthesize(program: str, utterance: Utterance) -> bytes:
    """The utterance as PCM16LE mono at its sample rate. The text goes in on stdin (never
    as an argument, where it could read as a flag)."""
    proc = await asyncio.create_subprocess_exec(
        program,
        "--stdin",
        "--stdout",
        "-v",
        utterance.voice,
        "-s",
        str(utterance.words_per_minute),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await proc.communicate(utterance.text.encode())
    except TimeoutError:
        raise SpeechFailed(f"espeak-ng took over {TIMEOUT:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0 or not out:
        message = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise SpeechFailed(f"espeak-ng failed: {message}")
    try:
        with wave.open(io.BytesIO(out)) as wav:
            if (wav.getsampwidth(), wav.getnchannels()) != (2, 1):
                raise SpeechFailed("espeak-ng did not write 16-bit mono audio")
            rate = wav.getframerate()
            # Written to a pipe, the header's length is a placeholder: read to the end.
            pcm = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as e:
        raise SpeechFailed(f"espeak-ng wrote no WAV audio: {e}") from None
    return await asyncio.to_thread(resample, pcm, rate, utterance.sample_rate)
