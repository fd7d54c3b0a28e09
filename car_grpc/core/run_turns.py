"""The size rules of a run turn (docs/protocol.md §4), pure and without I/O.

`prompt`, a string `output` and every long string inside `parameters` keep their first
16 KiB (UTF-8) followed by `…[truncated]`. A turn whose JSON still exceeds 256 KiB has
prompt, parameters and output replaced by one marker; if even that is too big the turn
cannot be stored and `cap_turn` says so.
"""

from __future__ import annotations

import json

from google.protobuf import struct_pb2

from car_grpc.v1 import runs_pb2
from car_grpc.wire import codec

FIELD_CAP = 16 * 1024
TURN_CAP = 256 * 1024
TRUNCATED = "…[truncated]"
TURN_REPLACED = "…[truncated: turn exceeded 256 KiB]"
DEFAULT_VERDICT = "not_run"

#: A turn's JSON is at most this many times its protobuf encoding (an escaped control
#: character is 6 bytes for 1; numbers, nulls and booleans grow less), plus its keys.
_JSON_EXPANSION = 8
_JSON_KEYS = 512


def cap_text(text: str) -> str:
    """`text`, or its first FIELD_CAP bytes of UTF-8 (whole characters) and the marker."""
    if len(text) * 4 <= FIELD_CAP:  # cannot be over: at most 4 bytes per character
        return text
    data = text.encode()
    if len(data) <= FIELD_CAP:
        return text
    # A cut inside a character leaves an incomplete tail, which "ignore" drops.
    return data[:FIELD_CAP].decode(errors="ignore") + TRUNCATED


def _cap_strings(value: struct_pb2.Value) -> None:
    """Cap every string inside a free-form value, in place."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text = value.string_value
        capped = cap_text(text)
        if capped is not text:
            value.string_value = capped
    elif kind == "struct_value":
        for item in value.struct_value.fields.values():
            _cap_strings(item)
    elif kind == "list_value":
        for item in value.list_value.values:
            _cap_strings(item)


def json_size(turn: runs_pb2.RunTurn) -> int:
    """Bytes of the turn's compact UTF-8 JSON, as the JSON-RPC wire carries it."""
    text = json.dumps(codec.message_to_json(turn), ensure_ascii=False, separators=(",", ":"))
    return len(text.encode())


def _fits(turn: runs_pb2.RunTurn) -> bool:
    if turn.ByteSize() * _JSON_EXPANSION + _JSON_KEYS <= TURN_CAP:
        return True  # cheap: cannot be over, whatever the JSON
    return json_size(turn) <= TURN_CAP


def cap_turn(turn: runs_pb2.RunTurn) -> bool:
    """Apply the caps to `turn` in place; False when it is too large to store at all.

    The client's `index` is dropped (the server stamps it) and a missing verifier_verdict
    becomes "not_run".
    """
    return capped(turn)[0] != TOO_LARGE


#: What capped() did to a turn: kept it as the client sent it (but for `index` and the
#: default verdict), cut it to fit, or found it too large to store.
KEPT, CUT, TOO_LARGE = 0, 1, 2


def capped(turn: runs_pb2.RunTurn) -> tuple[int, bytes]:
    """cap_turn, saying what it did (KEPT, CUT or TOO_LARGE), and the turn it leaves
    serialized (b"" when TOO_LARGE): the usual turn's size is that of its bytes, which
    the store keeps (runs.turn_records), so it is serialized once."""
    turn.ClearField("index")
    if not turn.HasField("verifier_verdict"):
        turn.verifier_verdict = DEFAULT_VERDICT
    data = turn.SerializeToString()
    if len(data) <= FIELD_CAP:
        return KEPT, data  # the usual turn: no string in it can be over a cap, nor the whole
    return _cut(turn)


def _cut(turn: runs_pb2.RunTurn) -> tuple[int, bytes]:
    if turn.HasField("prompt"):
        turn.prompt = cap_text(turn.prompt)
    if turn.HasField("parameters"):
        _cap_strings(turn.parameters)
    if turn.output.WhichOneof("kind") == "string_value":
        turn.output.string_value = cap_text(turn.output.string_value)
    if _fits(turn):
        return CUT, turn.SerializeToString()
    turn.prompt = TURN_REPLACED
    turn.parameters.string_value = TURN_REPLACED
    turn.output.string_value = TURN_REPLACED
    return (CUT, turn.SerializeToString()) if _fits(turn) else (TOO_LARGE, b"")
