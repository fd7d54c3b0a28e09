"""The heap a long-running process starts with, kept out of the garbage collector's way."""

from __future__ import annotations

import ctypes
import gc

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap, not from mmap (which zero-fills their
#: pages on first touch each time): a gRPC message of batches is at most a few MiB.
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse up to this much, not given back.
TRIM_THRESHOLD = 64 * 1024 * 1024


def freeze_startup_heap() -> None:
    """Move everything startup built (modules, descriptors, the a2a-sdk's classes: ~130k
    objects in `car-grpc serve`) into the permanent generation, after one collection of
    startup's garbage. A full collection then walks only what serving created since: it
    took 25-72 ms on a started server (a pause of the event loop every session shares,
    straight into the p99 of every figure), and under 1 ms after this."""
    gc.collect()
    gc.freeze()


def keep_large_buffers() -> None:
    """Have glibc's malloc reuse the memory of large buffers rather than return it to the
    system after each. The batches that carry audio and chat (hundreds of KB, copied from
    hop to hop) were allocated afresh each time: the heap's top trimmed after each free
    (brk) or the buffer mmapped, and every page faulted in and zeroed again on its next
    use, about 5% of each server process's CPU in a voice flood (perf: page faults under
    memmove; bench/README.md, `voice5`). No-op without glibc's mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
