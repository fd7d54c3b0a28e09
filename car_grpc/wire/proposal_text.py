"""A proposal's tool outputs and result as JSON text, written once, for car-grpc's own
gateway (ExecuteToolResponse.output_text, SubmitProposalResponse.result_text).

Through the gateway a tool's output went JSON -> protobuf (the gateway reading the
client's `tools.execute` answer) -> JSON (the core's executor) -> protobuf (the proposal's
result) -> JSON text (the gateway writing the response): a fifth of the gateway's CPU under
proposals alone (bench/README.md, issue 16). Now the gateway sends the output as the text
the wire writes (`output_text`), the core reads it with orjson and writes the result's
text around it (`result_text`), which the gateway sends on as it is.

The text is the one the codec writes of the ProposalResult, member for member: members in
field order, the enum's JSON name, strings, booleans, nulls and integers as the codec
writes them (json's ASCII encoder). As for a run turn (turn_text.py), one freedom is taken:
a free-form object's keys come in the order the client sent them, where the codec writes
protobuf's map order (a hash order; JSON objects are unordered). Where the two could
differ otherwise (an output that is not turn_text.plain: a float, an integer past 53
bits), the gateway writes no output text and the core writes that output with the codec,
from its Value. The gateway still sends the output's Value and the core the result's
protobuf beside the texts: the frames between them read as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

import orjson

from car_grpc.v1 import tools_pb2
from car_grpc.wire import codec
from car_grpc.wire.turn_text import plain

JSON = Any

#: An output whose text is longer goes as protobuf (the text would double a large frame's
#: work on its way; the usual output is a few dozen bytes).
OUTPUT_TEXT_LIMIT = 16 * 1024
#: A result whose text is longer goes as protobuf.
RESULT_TEXT_LIMIT = 1024 * 1024

#: json's strict ASCII encoder: the codec's text of strings, integers, booleans and null.
_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_string = encode_basestring_ascii


def free_text(value: JSON) -> str:
    """A free-form value as the codec writes the Value read from it (its objects' keys in
    the given order); "" when it is not plain or nests past orjson's limit."""
    if not plain(value):
        return ""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested too deeply, a lone surrogate: the codec's
        return ""
    # orjson writes other than ASCII as UTF-8, and DEL as itself: json escapes both.
    return data.decode() if data.isascii() and b"\x7f" not in data else _ascii.encode(value)


def output_text(output: JSON) -> str:
    """A tool's output (the client's `tools.execute` result) as its text, for the core;
    "" where it goes as protobuf (see the module's doc, and OUTPUT_TEXT_LIMIT)."""
    text = free_text(output)
    return text if len(text) <= OUTPUT_TEXT_LIMIT else ""


def read_output(text: str) -> JSON:
    """The output an output_text holds (what codec.value_to_json gives of its Value)."""
    return orjson.loads(text)


# ---------------------------------------------------------------- the result


def _check_fields() -> None:
    """The writer below knows these messages' fields; a change to them must change it."""
    known: dict[Any, list[str]] = {
        tools_pb2.ActionResult.DESCRIPTOR: [
            "action_id",
            "status",
            "output",
            "error",
            "state_changes",
            "duration_ms",
            "timestamp",
            "rolled_back",
            "terminal",
        ],
        tools_pb2.ProposalResult.DESCRIPTOR: ["proposal_id", "results", "cost"],
        tools_pb2.ProposalCost.DESCRIPTOR: [
            "tool_calls",
            "actions_executed",
            "actions_rejected",
            "actions_skipped",
            "total_duration_ms",
            "retries",
        ],
    }
    for desc, names in known.items():
        if [fd.name for fd in desc.fields] != names:
            raise TypeError(f"{desc.full_name}: not written by proposal_text")


_check_fields()

_STATUS_TEXT = {
    number: ',"status":' + _string(name)
    for number, name in codec.enum_names(tools_pb2.ActionStatus.DESCRIPTOR)[0].items()
}
_SUCCEEDED = tools_pb2.ACTION_STATUS_SUCCEEDED


def result_text(
    result: tools_pb2.ProposalResult,
    outputs: Mapping[str, JSON],
    texts: Mapping[str, tuple[JSON, str]],
) -> str:
    """The JSON text of `result` as codec.result_to_text writes its SubmitProposalResponse;
    "" past RESULT_TEXT_LIMIT. `outputs`: each succeeded action's output, as the executor
    holds it (its result's `output` is that value's Value); `texts`: action id -> (an
    output, its text as the gateway sent it), used when that very output is the action's.
    An output with no such text is written from its JSON where that is plain, else by the
    codec from its Value, as are state changes (few: a state_write's)."""
    items = []
    for r in result.results:
        action_id = r.action_id
        if r.status == _SUCCEEDED:
            output = outputs.get(action_id)
            given = texts.get(action_id)
            if given is not None and given[0] is output:
                out = given[1]
            else:  # the codec's text of the output's Value where its own could differ
                out = free_text(output) or codec.value_to_text(r.output)
        else:
            out = codec.value_to_text(r.output)  # null: the executor's
        status = _STATUS_TEXT.get(r.status, "")
        parts = ['{"action_id":', _string(action_id), status, ',"output":', out]
        if r.HasField("error"):
            parts += (',"error":', _string(r.error))
        if r.HasField("state_changes"):
            changes = r.state_changes
            if changes.fields:
                parts += (',"state_changes":', codec.struct_to_text(changes))
            else:
                parts.append(',"state_changes":{}')
        parts.append(f',"duration_ms":{r.duration_ms},"timestamp":{r.timestamp}')
        if r.HasField("rolled_back"):
            parts.append(',"rolled_back":true' if r.rolled_back else ',"rolled_back":false')
        if r.HasField("terminal"):
            parts.append(',"terminal":true' if r.terminal else ',"terminal":false')
        parts.append("}")
        items.append("".join(parts))
    head = f'{{"proposal_id":{_string(result.proposal_id)},"results":[{",".join(items)}]'
    if result.HasField("cost"):
        c = result.cost
        text = (
            f'{head},"cost":{{"tool_calls":{c.tool_calls},"actions_executed":{c.actions_executed},'
            f'"actions_rejected":{c.actions_rejected},"actions_skipped":{c.actions_skipped},'
            f'"total_duration_ms":{c.total_duration_ms},"retries":{c.retries}}}}}'
        )
    else:
        text = head + "}"
    return text if len(text) <= RESULT_TEXT_LIMIT else ""
