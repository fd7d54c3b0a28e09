"""A proposal's tool outputs and result as JSON text (wire/proposal_text.py): the gateway
sends a tool's output with its text, the core writes the proposal's result as text around
it, and the gateway sends that on as it is.

The answer's text is the codec's, byte for byte, except that a free-form object keeps the
client's key order (the codec writes protobuf's map order, a hash order); where the two
could differ otherwise no text is written and the result goes as protobuf, as before.
Only car-grpc's own gateway (a ConnectMultiplexed session) is trusted with such text."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.gateway.jsonrpc import MAX_PROTO_DEPTH, Bridge
from car_grpc.v1 import session_pb2, tools_pb2
from car_grpc.wire import codec, proposal_text
from tests import json_text_helpers as helpers
from tests import roles
from tests.runs_helpers import state_of

JSON = Any


def _tools_execute(cb: str) -> session_pb2.ServerFrame:
    frame = session_pb2.ServerFrame(id=cb)
    frame.tools_execute.action_id = "a"
    frame.tools_execute.tool = "t"
    frame.tools_execute.request_id = cb
    return frame


def _answer(result: JSON) -> session_pb2.ClientFrame:
    """The frame the gateway sends the core for the client's tools.execute answer."""
    bridge = Bridge()
    bridge.from_core(_tools_execute("cb-1"))
    inbound = bridge.from_client(json.dumps({"jsonrpc": "2.0", "id": "cb-1", "result": result}))
    [frame] = inbound.frames
    return frame


def _codec_output(result: JSON) -> tools_pb2.ExecuteToolResponse:
    read = tools_pb2.ExecuteToolResponse()
    codec.params_to_message(result, read, "output")
    return read


@pytest.mark.parametrize("plain", [True, False])
def test_the_gateway_sends_an_outputs_text_beside_its_value(plain: bool) -> None:
    rng = random.Random(4)
    written = exact = 0
    for _ in range(400):
        result = helpers.random_json(rng, plain=plain)
        body = _answer(result).tools_execute
        expected = _codec_output(result)
        assert body.output == expected.output  # the value as before
        if not body.output_text:
            continue
        written += 1
        text = codec.value_to_text(expected.output)
        assert body.output_text.isascii()
        assert json.loads(body.output_text) == json.loads(text)
        assert proposal_text.read_output(body.output_text) == codec.value_to_json(body.output)
        if helpers.one_key_objects(result):
            assert body.output_text == text, result
            exact += 1
    if plain:
        assert written == 400 and exact > 100
    else:
        assert 50 < written < 400  # none for an output holding a float or a large int


@pytest.mark.parametrize(
    "result",
    [
        1.5,  # a float: the codec writes its own digits
        60.0,  # the codec writes 60
        -0.0,
        {"n": 2**53 + 1},  # rounded to a double by the codec
        [-(2**60)],
        1e300,
        "x" * (proposal_text.OUTPUT_TEXT_LIMIT + 1),  # too long to carry twice
    ],
)
def test_no_output_text_where_it_could_differ(result: JSON) -> None:
    body = _answer(result).tools_execute
    assert body.output_text == ""
    assert body.output == _codec_output(result).output


def test_an_answer_refused_as_before_has_no_text() -> None:
    deep: JSON = 1
    for _ in range(MAX_PROTO_DEPTH):
        deep = [deep]
    for result, reason in ((deep, "nested more than"), ("\ud800", "not valid Unicode")):
        frame = _answer(result)
        assert frame.WhichOneof("body") == "error"
        assert reason in frame.error.message


def test_edge_case_outputs_are_the_codecs_text() -> None:
    edge: list[JSON] = [None, True, 0, 2**53, -(2**53), "", '\x7f\x00é€😀"\\/', {}, [], {"": [{}]}]
    for result in edge:
        body = _answer(result).tools_execute
        assert body.output_text == codec.value_to_text(body.output), result


# ---------------------------------------------------------------- the result's text


def _random_result(
    rng: random.Random, *, plain: bool
) -> tuple[tools_pb2.ProposalResult, dict[str, JSON]]:
    """A ProposalResult as the executor writes one, and its succeeded actions' outputs."""
    result = tools_pb2.ProposalResult(proposal_id=helpers.random_string(rng) + "p")
    outputs: dict[str, JSON] = {}
    for i in range(rng.randint(0, 4)):
        action_id = helpers.random_string(rng) + str(i)
        status = rng.choice(list(tools_pb2.ActionStatus.values()))
        r = result.results.add(action_id=action_id, status=status, timestamp=rng.randint(0, 2**45))
        r.duration_ms = rng.choice([0, 7, 2**40])
        output = (
            helpers.random_json(rng, plain=plain)
            if status == tools_pb2.ACTION_STATUS_SUCCEEDED
            else None
        )
        if status == tools_pb2.ACTION_STATUS_SUCCEEDED:
            outputs[action_id] = output
        codec.json_to_value(output, r.output)
        r.state_changes.SetInParent()
        if rng.random() < 0.3:
            codec.json_to_value(helpers.random_json(rng, plain=plain), r.state_changes.fields["k"])
        if rng.random() < 0.4:
            r.error = helpers.random_string(rng)
        if rng.random() < 0.3:
            r.rolled_back = rng.random() < 0.5
        if rng.random() < 0.3:
            r.terminal = rng.random() < 0.5
    if rng.random() < 0.9:
        cost = result.cost
        cost.SetInParent()
        cost.tool_calls, cost.retries = rng.randint(0, 9), rng.randint(0, 3)
        cost.total_duration_ms = rng.choice([0, 2**40])
    return result, outputs


def _one_key_objects(result: tools_pb2.ProposalResult) -> bool:
    """Whether no free-form object of `result` has two keys (their order cannot differ)."""
    values = [codec.value_to_json(r.output) for r in result.results]
    values += [codec.struct_to_json(r.state_changes) for r in result.results]
    return all(helpers.one_key_objects(v) for v in values)


def _codec_result(result: tools_pb2.ProposalResult) -> str:
    return codec.result_to_text(tools_pb2.SubmitProposalResponse(result=result), "")


@pytest.mark.parametrize("plain", [True, False])
def test_the_result_text_is_the_codecs(plain: bool) -> None:
    rng = random.Random(16)
    written = exact = 0
    for _ in range(500):  # with outputs the codec writes where not plain
        result, outputs = _random_result(rng, plain=plain)
        text = proposal_text.result_text(result, outputs, {})
        written += 1
        expected = _codec_result(result)
        assert text.isascii()
        assert json.loads(text) == json.loads(expected)
        if _one_key_objects(result):
            assert text == expected
            exact += 1
    assert exact > 100 and written == 500


def test_an_outputs_own_text_is_spliced_only_for_that_very_output() -> None:
    result = tools_pb2.ProposalResult(proposal_id="p")
    r = result.results.add(action_id="a", status=tools_pb2.ACTION_STATUS_SUCCEEDED)
    output = {"b": 1, "a": 2}
    codec.json_to_value(output, r.output)
    given = proposal_text.result_text(result, {"a": output}, {"a": (output, '{"b":1,"a":2}')})
    assert '"output":{"b":1,"a":2}' in given
    other = proposal_text.result_text(result, {"a": output}, {"a": ({"b": 1}, '"stale"')})
    assert "stale" not in other and json.loads(other) == json.loads(_codec_result(result))


def test_the_gateway_sends_the_results_text_as_the_codec_would() -> None:
    rng = random.Random(5)
    for _ in range(200):
        result, outputs = _random_result(rng, plain=True)
        response = tools_pb2.SubmitProposalResponse(result=result)
        bridged = tools_pb2.SubmitProposalResponse(result=result)
        bridged.result_text = proposal_text.result_text(result, outputs, {})
        texts = []
        for body in (response, bridged):
            bridge = Bridge()
            bridge.from_client('{"jsonrpc":"2.0","id":5,"method":"state.get","params":{}}')
            texts.append(bridge.from_core(session_pb2.ServerFrame(id="1", proposal_submit=body)))
        if _one_key_objects(result):
            assert texts[1] == texts[0]
        assert texts[0] is not None and texts[1] is not None
        assert json.loads(texts[1]) == json.loads(texts[0])


# ---------------------------------------------------------------- end to end


def _ordered(n: int) -> dict[str, int]:
    """An object whose keys come in an order protobuf's map does not keep."""
    return {chr(ord("z") - i): i for i in range(n)}


OUTPUTS: list[JSON] = [
    {"echo": {"n": 5}},
    _ordered(20),
    {"x": 1.5},  # no text: converted
    2**60,  # no text
    None,
    "\x7f\x00é😀",
    [[], {}, [{"a": None}]],
]


async def _call(ws: Any, request_id: int, method: str, params: JSON) -> None:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    await ws.send(json.dumps(message))


async def test_a_proposal_through_the_gateway_answers_as_the_codec_writes(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    state = state_of(core)
    ws = await helpers.ws_session(gateway.url, {"host_token": state.tokens.host})
    await _call(ws, 2, "tools.register", [{"name": "t"}])
    assert "result" in json.loads(await helpers.recv_text(ws))
    actions: list[dict[str, JSON]] = [
        {
            "id": f"a{i}",
            "type": "tool_call",
            "tool": "t",
            "dependencies": [f"a{i - 1}"] if i else [],
        }
        for i in range(len(OUTPUTS))
    ]
    last = len(OUTPUTS) - 1
    actions += [
        {"id": "w", "type": "state_write", "parameters": {"key": "k", "value": "$a0.output"}},
        {"id": "r", "type": "state_read", "parameters": {"key": "k"}, "dependencies": ["w"]},
        {"id": "f", "type": "tool_call", "tool": "t", "dependencies": ["r", f"a{last}"]},
    ]
    await _call(ws, 3, "proposal.submit", {"proposal": {"id": "p", "actions": actions}})
    answer = ""
    async with asyncio.timeout(10):
        while not answer:
            text = await helpers.recv_text(ws)
            message = json.loads(text)
            if message.get("id") == 3:
                answer = text
                continue
            i = message["params"]["action_id"]
            reply: JSON = {"jsonrpc": "2.0", "id": message["id"]}
            if i == "f":
                reply["error"] = {"code": 7, "message": "fails"}
            else:
                reply["result"] = OUTPUTS[int(i[1:])]
            await ws.send(json.dumps(reply))
    await ws.close()
    assert "result" in json.loads(answer), answer
    result = json.loads(answer)["result"]
    # What the generic path writes of this result (its protobuf, read back from the JSON).
    typed = tools_pb2.SubmitProposalResponse()
    codec.params_to_message(result, typed, "")
    expected = f'{{"jsonrpc":"2.0","id":3,"result":{_codec_result(typed.result)}}}'
    assert json.loads(answer) == json.loads(expected)
    assert '"output":{"z":0,"y":1,"x":2,' in answer  # the client's order: the text's
    assert list(result["results"][1]["output"]) == list(_ordered(20))
    assert [r["output"] for r in result["results"]][: len(OUTPUTS)] == OUTPUTS
    # Byte for byte the codec's, that one object aside (its keys in protobuf's map order).
    assert _blank_a1(answer) == _blank_a1(expected)


def _blank_a1(text: str) -> str:
    """`text` with the output of action a1 (keys in some order) as {}."""
    head, rest = text.split('"action_id":"a1","status":"succeeded","output":{', 1)
    return head + "{}" + rest[rest.index("}") :]


async def test_text_from_a_session_not_of_the_gateway_is_ignored(core: Core) -> None:
    """A typed client's output_text is never read, and it gets no result_text."""
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        client = await roles.ordinary(core, channel)
        register = tools_pb2.RegisterToolsRequest(tools=[tools_pb2.ToolDefinition(name="t")])
        await client.request("tools_register", register)
        request = tools_pb2.SubmitProposalRequest()
        codec.params_to_message(
            {"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}}, request, ""
        )
        pending = asyncio.create_task(client.request("proposal_submit", request))
        call = await client.next_server_request()
        forged = tools_pb2.ExecuteToolResponse(output_text='"forged"')
        forged.output.string_value = "real"
        await client.answer(call.id, "tools_execute", forged)
        reply = await pending
        await client.close()
    assert codec.value_to_json(reply.result.results[0].output) == "real"
    assert reply.result_text == ""
