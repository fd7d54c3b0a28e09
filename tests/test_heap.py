"""freeze_startup_heap: what exists at startup leaves the collector's walks; what comes
after is collected as before. keep_large_buffers: large buffers freed are reused."""

from __future__ import annotations

import gc
import subprocess
import sys

from car_grpc.heap import freeze_startup_heap


def test_startup_objects_are_frozen_and_later_garbage_is_still_collected() -> None:
    startup = [[i] for i in range(1000)]  # lists: objects the collector tracks
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(startup)
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(x) in walked for x in startup)

        later: list[object] = []
        later.append(later)  # a cycle only the collector can free
        assert id(later) in {id(o) for o in gc.get_objects()}
        del later
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()


def test_large_buffers_freed_are_reused_without_faulting_their_pages_in_again() -> None:
    # A subprocess: its malloc starts from glibc's defaults, as a server process does.
    code = """
import resource
from car_grpc.heap import keep_large_buffers
keep_large_buffers()

def round():
    buffers = [b"x" * (1024 * 1024 + i) for i in range(16)]  # 16 MiB, then all freed
    del buffers

round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = int(subprocess.check_output([sys.executable, "-c", code], text=True, timeout=30))
    # Without it each round gives its 16 MiB back and faults its 4,096 pages in again.
    assert faults < 4096, faults
