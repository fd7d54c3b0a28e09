"""PCM16LE mono audio as the engine takes and gives it: the sample rates it accepts, and a
streaming resampler (libsoxr through `soxr`, never the deprecated `audioop`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr

#: The sample rates a session may declare (`options.sample_rate`), in Hz. The protocol
#: carries bare PCM16LE, so the rate is the one thing a client must say about its audio.
SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
#: What a session assumes when it does not say.
DEFAULT_SAMPLE_RATE = 16000


class Resampler:
    """PCM16LE mono from `source` Hz to `target` Hz, chunk by chunk: the filter keeps its
    state between chunks, so chunk boundaries leave no seams. A few ms of audio stay in
    the filter until `flush`."""

    def __init__(self, source: int, target: int) -> None:
        self.source = source
        self.target = target
        self._stream = (
            None
            if source == target
            else soxr.ResampleStream(source, target, 1, dtype="int16", quality="HQ")
        )

    def feed(self, pcm: bytes) -> bytes:
        """`pcm` (whole samples: an even number of bytes) at the target rate."""
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        out: np.ndarray[Any, np.dtype[np.int16]] = self._stream.resample_chunk(samples)
        return out.astype("<i2").tobytes()

    def flush(self) -> bytes:
        """The audio still in the filter (call once, at the end)."""
        if self._stream is None:
            return b""
        empty = np.zeros(0, dtype="<i2")
        out: np.ndarray[Any, np.dtype[np.int16]] = self._stream.resample_chunk(empty, last=True)
        return out.astype("<i2").tobytes()


def resample(pcm: bytes, source: int, target: int) -> bytes:
    """All of `pcm` at once."""
    resampler = Resampler(source, target)
    return resampler.feed(pcm) + resampler.flush()
