"""Reading a session's options (`voice.transcribe_stream.start {options}`, passed to the
engine verbatim): anything wrong refuses the session with a message naming the option,
which the client gets as its start's error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from car_grpc.voice_engine.audio import DEFAULT_SAMPLE_RATE, SAMPLE_RATES


class Refusal(Exception):
    """The engine will not serve this session; str(self) says why."""


def check_names(options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuses an option the provider does not know (a typo would otherwise be ignored)."""
    allowed = set(known)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise Refusal(
            f"unknown option '{unknown[0]}' (this provider takes: {', '.join(sorted(allowed))})"
        )


def sample_rate(options: Mapping[str, Any]) -> int:
    """`options.sample_rate` in Hz (default 16000), one of SAMPLE_RATES."""
    rate = options.get("sample_rate", DEFAULT_SAMPLE_RATE)
    # JSON numbers arrive as floats: 16000.0 is 16000.
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate not in SAMPLE_RATES:
        rates = ", ".join(map(str, SAMPLE_RATES))
        raise Refusal(f"option sample_rate must be one of {rates} (Hz), got {rate!r}")
    return int(rate)


def text(options: Mapping[str, Any], name: str, limit: int, default: str | None = None) -> str:
    """A non-empty string option of at most `limit` characters."""
    value = options.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise Refusal(f"option {name} must be a non-empty string")
    if len(value) > limit:
        raise Refusal(f"option {name} is over {limit} characters")
    return value


def strings(options: Mapping[str, Any], name: str, count: int, limit: int) -> list[str] | None:
    """An optional list of 1..`count` non-empty strings of at most `limit` characters."""
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= count:
        raise Refusal(f"option {name} must be a list of 1 to {count} strings")
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > limit:
            raise Refusal(
                f"option {name}: each item must be a non-empty string of at most {limit} "
                f"characters, got {item!r}"
            )
    return value
