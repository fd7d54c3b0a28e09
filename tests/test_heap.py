"""freeze_startup_heap: what exists at startup leaves the collector's walks; what comes
after is collected as before."""

from __future__ import annotations

import gc

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
