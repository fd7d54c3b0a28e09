"""Large client frames are decoded off the event loop, in worker processes.

Parsing JSON and converting it to protobuf is CPU work that holds the GIL: a 33 MB frame
of small objects took the event loop for 0.9 s, a 20 MB one to convert for 3.4 s, during
which no other client was served. A thread would not help (json.loads and the protobuf
serializer never let go of the GIL), so a frame that is large, or has many values, goes
to a worker process instead: `jsonrpc.decode` runs there and its frames come back
serialized, ready to be written to the core. The event loop only moves bytes, a chunk
at a time. Small frames (almost all of them) are decoded inline, where that costs less
than the trip.

Workers start when first needed (`python -m car_grpc.gateway.decoder`), each decodes one
frame at a time, and each is bounded: in memory (RLIMIT_AS; a worker that has grown
large retires after its frame) and in time (DECODE_TIMEOUT for the wait and the work,
then the worker is killed). A frame that cannot be decoded so gets -32603 with id null.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import resource
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from car_grpc.gateway.jsonrpc import Decoded, decode, error_object, error_response
from car_grpc.wire.errors import INTERNAL

log = logging.getLogger(__name__)

#: Frames up to this size with few values are decoded inline (worst case about 3 ms).
INLINE_BYTES = 1024 * 1024
#: ... "few": at most this many commas (a cheap count of JSON values: each costs about a
#: microsecond to convert, and a comma inside a string only errs on the safe side).
INLINE_COMMAS = 2000
#: Longest a frame may wait for a worker and be decoded by it.
DECODE_TIMEOUT = 60.0
#: Address space of a worker: a 64 MiB frame of tiny values needs about 4 GiB as Python
#: objects and protobuf; past the limit the frame fails, not the machine.
WORKER_MEMORY_LIMIT = 6 * 1024**3
#: A worker whose resident memory is above this after a frame retires (a fresh one starts
#: when needed), so the memory of one huge frame is not held for good.
WORKER_RETIRE_RSS = 512 * 1024**2
#: Bytes moved to or from a worker per step of the event loop.
CHUNK = 1024 * 1024

#: The directory this car_grpc package is in.
_ROOT = str(Path(__file__).resolve().parents[2])

#: flags (1: text frame), length of the JSON of [callbacks, first id]
_JOB = struct.Struct("<BI")
_PART = struct.Struct("<I")  # a chunk of the frame follows (0: the frame is complete)
#: 1: the worker retires after this; the length of the pickled Decoded (its frames left
#: out: they follow it, raw, in order, their lengths in the pickle).
_RESULT = struct.Struct("<BQ")


def inline(message: str | bytes) -> bool:
    """Whether a frame is cheap enough to decode on the event loop."""
    if len(message) > INLINE_BYTES:
        return False
    commas = message.count(",") if isinstance(message, str) else message.count(b",")
    return commas <= INLINE_COMMAS


class DecodeFailed(Exception):
    """A worker could not decode the frame (timed out, ran out of memory, died)."""


def failed(reason: str) -> Decoded:
    """The answer to a frame that could not be decoded."""
    return Decoded(error=error_response(None, error_object(INTERNAL, f"internal error: {reason}")))


# ------------------------------------------------------------------ the worker process


def _split(decoded: Decoded) -> tuple[Decoded, list[int], list[bytes]]:
    """The decoded frame without its ClientFrames, their lengths (-1: none) and their bytes."""
    lengths, frames = [], []
    for message in decoded.messages:
        if message.frame is None:
            lengths.append(-1)
            continue
        data = (
            message.frame if isinstance(message.frame, bytes) else message.frame.SerializeToString()
        )
        message.frame = None
        lengths.append(len(data))
        frames.append(data)
    return decoded, lengths, frames


def _decode_job(
    data: bytes, text: bool, callbacks: dict[str, str], first_id: int
) -> tuple[Decoded, list[int], list[bytes]]:
    try:
        return _split(decode(data.decode() if text else data, callbacks, first_id))
    except MemoryError:
        return failed("the frame is too large to decode"), [], []


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(stdin: BinaryIO, stdout: BinaryIO, retire_rss: int = WORKER_RETIRE_RSS) -> None:
    """Decode frames from `stdin` until it closes, answering each on `stdout`; return
    after a frame that left the process larger than `retire_rss` bytes."""
    while True:
        try:
            flags, meta_len = _JOB.unpack(_read_exactly(stdin, _JOB.size))
        except EOFError:
            return
        callbacks, first_id = json.loads(_read_exactly(stdin, meta_len))
        parts = []
        while size := _PART.unpack(_read_exactly(stdin, _PART.size))[0]:
            parts.append(_read_exactly(stdin, size))
        result, lengths, frames = _decode_job(b"".join(parts), bool(flags & 1), callbacks, first_id)
        del parts
        try:
            retire = _rss() > retire_rss
        except OSError:
            retire = False
        head = pickle.dumps((result, lengths), protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_RESULT.pack(retire, len(head)))
        stdout.write(head)
        for data in frames:
            stdout.write(data)
        stdout.flush()
        del result, frames
        if retire:
            return


def main(retire_rss: int = WORKER_RETIRE_RSS) -> None:
    """The worker process."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, WORKER_MEMORY_LIMIT))
    serve(sys.stdin.buffer, sys.stdout.buffer, retire_rss)


# ------------------------------------------------------------------ the gateway's side


class _Worker:
    """One worker process, decoding one frame at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin, self.stdout = proc.stdin, proc.stdout
        self.retired = False

    @classmethod
    async def start(cls, retire_rss: int) -> _Worker:
        # This very car_grpc, whatever the working directory holds (-P: not that).
        path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        script = f"from car_grpc.gateway.decoder import main; main({int(retire_rss)})"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-c", script,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path}, limit=CHUNK,
        )  # fmt: skip
        return cls(proc)

    async def decode(
        self, message: str | bytes, callbacks: Mapping[str, str], first_id: int
    ) -> Decoded:
        meta = json.dumps([dict(callbacks), first_id]).encode()
        self.stdin.write(_JOB.pack(isinstance(message, str), len(meta)) + meta)
        for start in range(0, len(message), CHUNK):
            part = message[start : start + CHUNK]
            data = part.encode() if isinstance(part, str) else part
            self.stdin.write(_PART.pack(len(data)) + data)
            await self.stdin.drain()
        self.stdin.write(_PART.pack(0))
        await self.stdin.drain()
        retire, size = _RESULT.unpack(await self.stdout.readexactly(_RESULT.size))
        result, lengths = pickle.loads(await self._read(size))
        assert isinstance(result, Decoded) and len(lengths) == len(result.messages)
        for translated, length in zip(result.messages, lengths, strict=True):
            if length >= 0:
                translated.frame = await self._read(length)
        self.retired = bool(retire)
        return result

    async def _read(self, size: int) -> bytes:
        """`size` bytes from the worker, a chunk at a time."""
        if size <= CHUNK:
            return await self.stdout.readexactly(size)
        parts = []
        while size:
            part = await self.stdout.readexactly(min(size, CHUNK))
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 2)
            except TimeoutError:
                self.kill()
                await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class DecoderPool:
    """Up to `size` worker processes of one gateway, started when first needed; a frame
    may take `timeout` seconds (waiting for a worker included), a worker that is larger
    than `retire_rss` bytes after a frame retires."""

    def __init__(
        self,
        size: int,
        *,
        timeout: float = DECODE_TIMEOUT,
        retire_rss: int = WORKER_RETIRE_RSS,
    ) -> None:
        self.timeout = timeout
        self.retire_rss = retire_rss
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._slots = asyncio.Semaphore(max(1, size))
        self._closed = False
        self._reaping: set[asyncio.Task[None]] = set()

    @property
    def workers(self) -> int:
        """Worker processes running now."""
        return len(self._all)

    async def decode(
        self, message: str | bytes, callbacks: Mapping[str, str], first_id: int
    ) -> Decoded:
        """jsonrpc.decode(message, callbacks, first_id) in a worker (its frames come back
        serialized). Raises DecodeFailed, with the reason."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    return await self._decode(message, callbacks, first_id)
        except TimeoutError:
            raise DecodeFailed(f"decoding the frame took more than {self.timeout:g}s") from None

    async def _decode(
        self, message: str | bytes, callbacks: Mapping[str, str], first_id: int
    ) -> Decoded:
        if self._closed:
            raise DecodeFailed("the gateway is stopping")
        worker = self._idle.pop() if self._idle else None
        if worker is None:
            starting = asyncio.ensure_future(_Worker.start(self.retire_rss))
            try:
                worker = await asyncio.shield(starting)
            except asyncio.CancelledError:
                starting.add_done_callback(self._discard)  # no process left behind
                raise
            except OSError as e:
                raise DecodeFailed(f"no decoder: {e}") from e
            self._all.add(worker)
        done = False
        try:
            result = await worker.decode(message, callbacks, first_id)
            done = True
            return result
        except (OSError, EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError) as e:
            log.warning("gateway: a decoder process failed: %r", e)
            raise DecodeFailed("the decoder failed on the frame") from e
        finally:
            if done and not worker.retired and not self._closed:
                self._idle.append(worker)
            else:  # retired, or interrupted midway (its pipes are out of step): gone
                self._all.discard(worker)
                if not done:
                    worker.kill()
                self._reap(worker)

    def _reap(self, worker: _Worker) -> None:
        reap = asyncio.get_running_loop().create_task(worker.stop())
        self._reaping.add(reap)
        reap.add_done_callback(self._reaping.discard)

    def _discard(self, starting: asyncio.Future[_Worker]) -> None:
        """A worker whose start was abandoned: killed as soon as it exists."""
        if starting.cancelled() or starting.exception() is not None:
            return
        worker = starting.result()
        worker.kill()
        self._reap(worker)

    async def stop(self) -> None:
        self._closed = True
        workers, self._all, self._idle = list(self._all), set(), []
        await asyncio.gather(*(w.stop() for w in workers), *self._reaping, return_exceptions=True)
