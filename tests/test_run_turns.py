"""The size rules of run turns (car_grpc/core/run_turns.py), without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from car_grpc.core.run_turns import (
    DEFAULT_VERDICT,
    FIELD_CAP,
    TRUNCATED,
    TURN_CAP,
    TURN_REPLACED,
    cap_text,
    cap_turn,
    capped,
    json_size,
)
from car_grpc.v1 import runs_pb2
from car_grpc.wire.codec import to_value, value_to_json


def test_short_text_is_kept_as_is() -> None:
    text = "x" * FIELD_CAP
    assert cap_text(text) is text


def test_long_text_keeps_16_kib_and_the_marker() -> None:
    assert cap_text("y" * (FIELD_CAP + 1)) == "y" * FIELD_CAP + TRUNCATED


def test_cut_never_splits_a_character() -> None:
    text = "a" + "é" * FIELD_CAP  # 2 bytes each: byte FIELD_CAP falls inside one
    capped = cap_text(text)
    kept = capped.removesuffix(TRUNCATED)
    assert capped.endswith(TRUNCATED)
    assert kept == "a" + "é" * ((FIELD_CAP - 1) // 2)
    assert len(kept.encode()) <= FIELD_CAP


@given(st.text(min_size=0, max_size=FIELD_CAP // 2 + 50))
def test_capped_text_is_a_prefix_within_the_cap(text: str) -> None:
    capped = cap_text(text)
    if len(text.encode()) <= FIELD_CAP:
        assert capped == text
    else:
        kept = capped.removesuffix(TRUNCATED)
        assert text.startswith(kept)
        assert FIELD_CAP - 4 < len(kept.encode()) <= FIELD_CAP


def test_cap_turn_caps_prompt_output_and_parameter_strings() -> None:
    long = "z" * (FIELD_CAP + 10)
    turn = runs_pb2.RunTurn(index=41, prompt=long, tool="shell")
    turn.parameters.CopyFrom(to_value({"cmd": long, "n": 1, "nested": [{"s": long}, "short"]}))
    turn.output.string_value = long
    turn.cli_outcome.string_value = long  # not a capped field

    assert cap_turn(turn)

    capped = "z" * FIELD_CAP + TRUNCATED
    assert not turn.HasField("index")  # the server stamps it
    assert turn.prompt == capped
    assert turn.output.string_value == capped
    assert value_to_json(turn.parameters) == {
        "cmd": capped,
        "n": 1,
        "nested": [{"s": capped}, "short"],
    }
    assert turn.cli_outcome.string_value == long
    assert turn.verifier_verdict == DEFAULT_VERDICT


def test_structured_output_is_not_capped() -> None:
    turn = runs_pb2.RunTurn()
    turn.output.CopyFrom(to_value({"text": "w" * (FIELD_CAP + 1)}))
    assert cap_turn(turn)
    assert value_to_json(turn.output) == {"text": "w" * (FIELD_CAP + 1)}


def test_verdict_given_is_kept() -> None:
    turn = runs_pb2.RunTurn(verifier_verdict="passed")
    assert cap_turn(turn)
    assert turn.verifier_verdict == "passed"


def test_turn_over_256_kib_has_its_large_fields_replaced() -> None:
    turn = runs_pb2.RunTurn(prompt="p", tool="t")
    # Many short strings: each under the field cap, together over the turn cap.
    turn.parameters.CopyFrom(to_value({f"k{i}": "v" * 8000 for i in range(40)}))
    assert json_size(turn) > TURN_CAP

    assert cap_turn(turn)

    assert turn.prompt == TURN_REPLACED
    assert turn.parameters.string_value == TURN_REPLACED
    assert turn.output.string_value == TURN_REPLACED
    assert turn.tool == "t"
    assert json_size(turn) <= TURN_CAP


def test_turn_still_too_large_is_refused() -> None:
    turn = runs_pb2.RunTurn()
    turn.cli_outcome.string_value = "c" * (TURN_CAP + 1)  # not a replaceable field
    assert not cap_turn(turn)


def test_escapes_count_towards_the_turn_size() -> None:
    # 50 000 control characters: 50 kB of protobuf, 300 kB of JSON (\\u0001 each).
    turn = runs_pb2.RunTurn()
    turn.cli_outcome.string_value = "\x01" * 50_000
    assert turn.ByteSize() < TURN_CAP
    assert json_size(turn) > TURN_CAP
    assert not cap_turn(turn)


def test_capped_gives_the_turn_it_leaves_serialized() -> None:
    """capped's bytes (what the store keeps) are the turn it leaves: kept, cut, or
    replaced by the marker; none when the turn cannot be stored."""
    kept = runs_pb2.RunTurn(index=4, prompt="p")
    cut = runs_pb2.RunTurn(prompt="x" * (FIELD_CAP + 10))
    replaced = runs_pb2.RunTurn(
        prompt="p" * (2 * FIELD_CAP), cli_outcome=to_value("c" * (TURN_CAP - 6000))
    )
    for turn, outcome in ((kept, 0), (cut, 1), (replaced, 1)):
        got, data = capped(turn)
        assert got == outcome and runs_pb2.RunTurn.FromString(data) == turn
        assert not turn.HasField("index") and turn.verifier_verdict == DEFAULT_VERDICT
    assert replaced.prompt == TURN_REPLACED
    too_large = runs_pb2.RunTurn(cli_outcome=to_value("z" * TURN_CAP))
    assert capped(too_large) == (2, b"")
