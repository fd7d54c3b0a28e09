"""A session's key-value state under its budget (docs/protocol.md §1, §3): pure, no I/O.

Sizes are in bytes of the wire form: a value's size is the serialized size of its
`google.protobuf.Value` (what state.set carries; for a value written by a proposal, the
same of the value it converts to). An entry counts its key (UTF-8) plus its value toward
the session's total. Over a budget a write raises -32602 naming the limit and nothing is
stored; replacing a key counts its new size minus the old.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from car_grpc.wire.codec import to_value
from car_grpc.wire.errors import invalid_params

JSON = Any


@dataclass(frozen=True)
class StateBudget:
    #: Largest value, in bytes.
    value_max_bytes: int
    #: Keys and values of one session together, in bytes.
    max_bytes: int
    #: Keys one session may hold.
    max_keys: int


def value_size(value: JSON) -> int:
    """The size of a JSON value: its google.protobuf.Value serialized, in bytes."""
    return to_value(value).ByteSize()


class KeyValueState(MutableMapping[str, JSON]):
    """The state of one session: a mapping whose writes are checked against a budget."""

    def __init__(self, budget: StateBudget) -> None:
        self.budget = budget
        self._values: dict[str, JSON] = {}
        #: key -> bytes it counts for (key + value).
        self._sizes: dict[str, int] = {}
        #: Bytes held now (sum of _sizes).
        self.bytes = 0

    def __getitem__(self, key: str) -> JSON:
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setitem__(self, key: str, value: JSON) -> None:
        self.set(key, value, value_size(value))

    def __delitem__(self, key: str) -> None:
        del self._values[key]
        self.bytes -= self._sizes.pop(key)

    def check(self, key: str, size: int) -> None:
        """Raise -32602 naming the limit when storing a value of `size` bytes under `key`
        would go over the budget."""
        budget = self.budget
        if size > budget.value_max_bytes:
            raise invalid_params(
                f"invalid params: state value too large: {size} bytes > "
                f"state_value_max_bytes ({budget.value_max_bytes})"
            )
        old = self._sizes.get(key)
        if old is None and len(self._values) >= budget.max_keys:
            raise invalid_params(
                f"invalid params: state over budget: {len(self._values) + 1} keys > "
                f"state_max_keys ({budget.max_keys})"
            )
        total = self.bytes - (old or 0) + _entry_size(key, size)
        # A write that does not grow the total always fits (after a rollback the total
        # may be over the budget for a while: see restore).
        if total > budget.max_bytes and total > self.bytes:
            raise invalid_params(
                f"invalid params: state over budget: {total} bytes > "
                f"state_max_bytes ({budget.max_bytes})"
            )

    def set(self, key: str, value: JSON, size: int) -> None:
        """Store `value` (of `size` bytes, see value_size) under `key`, or raise -32602."""
        self.check(key, size)
        self._store(key, value, size)

    def restore(self, key: str, existed: bool, value: JSON) -> None:
        """Put back what `key` held before (a rolled-back proposal): never refused. What
        it restores was within the budget when written; if state.set calls that ran
        meanwhile took the room, the total stays over the budget until keys shrink or go
        (writes that would grow it are refused)."""
        if existed:
            self._store(key, value, value_size(value))
        else:
            self.pop(key, None)

    def clear(self) -> None:
        self._values.clear()
        self._sizes.clear()
        self.bytes = 0

    def _store(self, key: str, value: JSON, size: int) -> None:
        entry = _entry_size(key, size)
        self.bytes += entry - self._sizes.get(key, 0)
        self._sizes[key] = entry
        self._values[key] = value


def _entry_size(key: str, size: int) -> int:
    return len(key.encode()) + size
