"""A chat event's JSON written once (wire/chat_text.py): the gateway writes the members of
each agent.chat.event as the codec would write them into the host's agents.chat.event,
and the core puts a host's notification together from that text when the host is behind
car-grpc's gateway, without converting the event to JSON again.

The text is the codec's, member for member, except that the event's other keys, and a
free-form object's, keep the agent's key order (the codec writes protobuf's map order);
where the two could differ otherwise no text is written and the event is converted as
before. Only car-grpc's own gateway (a ConnectMultiplexed session) is trusted with such
text, both ways: a typed host gets the protobuf event (its twins derived), and a typed
agent's text is ignored."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import ClientConnection

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.gateway.jsonrpc import Bridge, decode
from car_grpc.v1 import chats_pb2, session_pb2
from car_grpc.wire import chat_text, codec
from tests import json_text_helpers as helpers
from tests import roles
from tests.chat_helpers import accept_chat, chat_stub
from tests.runs_helpers import state_of

JSON = Any
AGENT = "bot"


_WRONG: list[JSON] = [5, "x", True, -1, 2**32, 1.5, [], {}]


def _params(rng: random.Random, *, plain: bool = True) -> dict[str, JSON]:
    """The params of a random agent.chat.event (every member the codec reads); unless
    `plain`, now and then a member of a type the codec refuses."""
    params: dict[str, JSON] = {
        "session_id": helpers.random_string(rng) if rng.random() < 0.95 else None
    }
    kinds = ["token", "done", "goal_evaluated", "tool_call", "", "é"]
    for key, make in (
        ("kind", lambda: rng.choice(kinds)),
        ("delta", lambda: helpers.random_string(rng)),
        ("approval_id", lambda: helpers.random_string(rng)),
        ("iteration", lambda: rng.choice([0, 3, 3.0, 2**32 - 1])),
        ("met", lambda: rng.choice([True, False])),
        ("grounded", lambda: rng.choice([True, False])),
        ("reason", lambda: helpers.random_string(rng)),
        ("message", lambda: helpers.random_string(rng)),
    ):
        if rng.random() < 0.4:
            params[key] = make() if rng.random() < 0.9 else None
            if not plain and rng.random() < 0.03:
                params[key] = rng.choice(_WRONG)
    for key in ("tool", "agent_id", "args", "event_text"):  # the event's other keys
        if rng.random() < 0.2:
            params[key] = helpers.random_json(rng, plain=plain)
    keys = list(params)
    rng.shuffle(keys)  # the agent's member order is its own
    return {k: params[k] for k in keys}


def _decoded(params: JSON) -> chats_pb2.AgentChatEventNotice:
    """The notice the gateway sends the core for an agent.chat.event of `params`."""
    text = json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
    [message] = decode(text, {}).messages
    assert isinstance(message.frame, session_pb2.ClientFrame), message.reply
    return message.frame.agent_chat_event


def _host_text(notice: chats_pb2.AgentChatEventNotice) -> str:
    """The host's agents.chat.event as the gateway writes it from the core's protobuf
    (the relay's copy of the event)."""
    frame = session_pb2.ServerFrame()
    out = frame.agents_chat_event
    out.session_id, out.agent_id = notice.session_id, AGENT
    out.event.CopyFrom(notice.event)
    text = Bridge().from_core(frame)
    assert text is not None
    return text


def _spliced(notice: chats_pb2.AgentChatEventNotice) -> str:
    """The host's agents.chat.event as the gateway writes it from the core's frame put
    together from the agent's text."""
    head = chat_text.notice_head(notice.session_id, AGENT)
    frame = session_pb2.ServerFrame.FromString(chat_text.notice_frame(head, notice.event_text))
    assert frame.agents_chat_event.params_text  # nothing else in the frame
    assert not frame.agents_chat_event.HasField("event")
    text = Bridge().from_core(frame)
    assert text is not None
    return text


def _refused(params: JSON) -> bool:
    """Whether the gateway drops this agent.chat.event (nothing for the core)."""
    text = json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
    [message] = decode(text, {}).messages
    return message.frame is None


@pytest.mark.parametrize("plain", [True, False])
def test_the_gateway_reads_events_as_the_codec_and_writes_their_text(plain: bool) -> None:
    rng = random.Random(16)
    written = exact = refused = 0
    for _ in range(1500):
        params = _params(rng, plain=plain)
        read = chats_pb2.AgentChatEventNotice()
        try:
            codec.params_to_message(params, read, "")
        except codec.CodecError:
            assert _refused(params), params  # refused as the codec refuses it
            refused += 1
            continue
        notice = _decoded(params)
        without = chats_pb2.AgentChatEventNotice()
        without.CopyFrom(notice)
        without.ClearField("event_text")
        assert without == read  # the protobuf is the codec's, the text beside it
        if not notice.event_text:
            continue
        written += 1
        assert notice.event_text.isascii()
        spliced, expected = _spliced(notice), _host_text(notice)
        assert json.loads(spliced) == json.loads(expected)
        others = [k for k in params if k in ("tool", "args", "event_text")]
        if len(others) <= 1 and all(helpers.one_key_objects(params[k]) for k in others):
            assert spliced == expected, params
            exact += 1
    if plain:
        assert written == 1500 and exact > 500
    else:  # none for an event holding a float or a large int
        assert 500 < written < 1500 - refused and refused > 20


@pytest.mark.parametrize(
    "params",
    [
        {"session_id": "s", "kind": "tool_call", "args": 1.5},  # the codec's own digits
        {"session_id": "s", "kind": "tool_call", "args": {"n": 60.0}},  # the codec writes 60
        {"session_id": "s", "kind": "tool_call", "args": [2**53 + 1]},  # rounded to a double
        {"session_id": "s", "kind": "token", "delta": "x" * chat_text.TEXT_LIMIT},
    ],
)
def test_no_text_where_it_could_differ(params: JSON) -> None:
    notice = _decoded(params)
    assert notice.event_text == ""
    read = chats_pb2.AgentChatEventNotice()
    codec.params_to_message(params, read, "")
    assert notice.event == read.event


def test_a_token_text_and_keys_in_the_agents_order() -> None:
    token = {"delta": "hi é", "kind": "token", "session_id": "c"}
    assert _decoded(token).event_text == '"kind":"token","delta":"hi \\u00e9"'
    other = {"session_id": "c", "kind": "tool_call", "tool": {"b": 1, "a": 2}, "agent_id": "x"}
    assert _decoded(other).event_text == '"kind":"tool_call","tool":{"b":1,"a":2}'
    assert _decoded({"session_id": "c"}).event_text == '"kind":""'


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"session_id": 7}, "session_id"),
        ({"session_id": "s", "delta": 5}, "delta"),
        ({"session_id": "s", "kind": "token", "met": "yes"}, "met"),
        ({"session_id": "s", "iteration": True}, "iteration"),
        ({"session_id": "s", "iteration": 2**32}, "iteration"),
        ({"session_id": "s", "iteration": 1.5}, "iteration"),
    ],
)
def test_an_event_sent_as_a_request_gets_the_codecs_error(params: JSON, field: str) -> None:
    """A member not of its type is left to the codec, whose precise error the client gets
    (a notification method called with an id is answered)."""
    text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "agent.chat.event", "params": params})
    [message] = decode(text, {}).messages
    assert message.frame is None and message.reply is not None
    error = json.loads(message.reply)["error"]
    assert error["code"] == -32602 and error["data"] == {"field": field}
    with pytest.raises(codec.CodecError) as refused:
        codec.params_to_message(params, chats_pb2.AgentChatEventNotice(), "")
    assert refused.value.path == field


def test_a_malformed_event_is_dropped_as_before() -> None:
    """A notification is never answered: the gateway drops what the codec refuses."""
    malformed: list[JSON] = [{"session_id": 5}, {"session_id": "s", "iteration": -1}, []]
    for params in malformed:
        text = json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
        [message] = decode(text, {}).messages
        assert message.frame is None and message.reply is None


def test_a_client_cannot_send_the_text_itself() -> None:
    """event_text and params_text are the bridge's own (json_internal): never read from
    the client's JSON (a key of that name is one of the event's other keys), never written."""
    notice = _decoded({"session_id": "s", "kind": "token", "event_text": "forged"})
    assert notice.event_text == '"kind":"token","event_text":"forged"'
    assert notice.event.extra.fields["event_text"].string_value == "forged"
    out = chats_pb2.ChatEventNotice(session_id="s", params_text="x")
    assert "params_text" not in codec.message_to_json(out)
    forged = chats_pb2.AgentChatEventNotice(session_id="s", event_text='"kind":"x"')
    assert codec.message_to_json(forged) == {"session_id": "s"}


# ---------------------------------------------------------------- end to end


async def _open_ws_chat(host: ClientConnection, agent: ClientConnection, chat_id: str) -> None:
    """The WebSocket host opens chat `chat_id` with the WebSocket agent, which accepts it."""
    params = {"agent_id": AGENT, "prompt": "p", "session_id": chat_id}
    await host.send(
        json.dumps({"jsonrpc": "2.0", "id": 7, "method": "agents.chat", "params": params})
    )
    request = json.loads(await helpers.recv_text(agent))
    assert request["method"] == "agent.chat", request
    answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"accepted": True}}
    await agent.send(json.dumps(answer))
    assert json.loads(await helpers.recv_text(host))["result"]["accepted"]


EVENTS: list[JSON] = [
    {"kind": "token", "delta": "hé\x7f😀"},
    {"kind": "tool_call", "tool": "t", "args": {"b": 1, "a": [2, None]}},  # keys as sent
    {"kind": "tool_result", "output": 2.5},  # no text: converted
    {"kind": "goal_evaluated", "iteration": 2, "met": False, "agent_id": "spoof"},
    {"kind": "done"},
]


def _event_frame(chat_id: str, event: JSON) -> str:
    params = {"session_id": chat_id, **event}
    return json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})


async def test_a_host_behind_the_gateway_gets_the_agents_text_and_a_typed_host_protobuf(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    state = state_of(core)
    token = await state.agent_tokens.add(AGENT)
    agent = await helpers.ws_session(gateway.url, {"agent_id": AGENT, "token": token})
    host = await helpers.ws_session(gateway.url, {"host_token": state.tokens.host})
    # Through the gateway, both ways: spliced from the agent's text where it wrote one.
    await _open_ws_chat(host, agent, "c1")
    for event in EVENTS:
        await agent.send(_event_frame("c1", event))
    received = [await helpers.recv_text(host) for _ in EVENTS]
    for event, text in zip(EVENTS, received, strict=True):
        expected = _host_text(_decoded({"session_id": "c1", **event}))
        if "args" in event:
            assert '"args":{"b":1,"a":[2,null]}' in text
            assert json.loads(text) == json.loads(expected)
        else:
            assert text == expected
    # A typed host gets the same events as protobuf, the typed twins derived.
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        metadata = (("authorization", f"Bearer {state.tokens.host}"),)
        call = chat_stub(channel).Chat(
            chats_pb2.ChatRequest(agent_id=AGENT, prompt="p", session_id="c2"), metadata=metadata
        )
        request = json.loads(await helpers.recv_text(agent))
        answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"accepted": True}}
        await agent.send(json.dumps(answer))
        first = await call.read()
        assert isinstance(first, chats_pb2.ChatResponse) and first.accepted.accepted
        for event in EVENTS:
            await agent.send(_event_frame("c2", event))
        for event in EVENTS:
            response = await asyncio.wait_for(call.read(), 10)
            assert isinstance(response, chats_pb2.ChatResponse)
            typed = chats_pb2.ChatEventNotice(session_id="c2", agent_id=AGENT, chat_id="c2")
            typed.event.CopyFrom(_decoded({"session_id": "c2", **event}).event)
            typed.event.kind_enum = chats_pb2.ChatEventKind.Value(
                "CHAT_EVENT_KIND_" + event["kind"].upper()
            )
            assert response.event == typed
            assert not response.event.HasField("params_text")
    for ws in (agent, host):
        await ws.close()


async def test_text_from_an_agent_not_of_the_gateway_is_ignored(
    served: tuple[Core, Gateway],
) -> None:
    """A typed agent's AgentChatEventNotice.event_text never reaches a host."""
    core, gateway = served
    state = state_of(core)
    host = await helpers.ws_session(gateway.url, {"host_token": state.tokens.host})
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        agent = await roles.agent(core, channel, AGENT)
        params = {"agent_id": AGENT, "prompt": "p", "session_id": "c"}
        await host.send(
            json.dumps({"jsonrpc": "2.0", "id": 7, "method": "agents.chat", "params": params})
        )
        await accept_chat(agent)
        assert json.loads(await helpers.recv_text(host))["result"]["accepted"]
        frame = session_pb2.ClientFrame()
        frame.agent_chat_event.session_id = "c"
        frame.agent_chat_event.event.kind = "token"
        frame.agent_chat_event.event.delta = "real"
        frame.agent_chat_event.event_text = '"kind":"token","delta":"forged"'
        await agent.send(frame)
        event = json.loads(await helpers.recv_text(host))
        assert event["method"] == "agents.chat.event"
        assert event["params"] == {
            "session_id": "c",
            "agent_id": AGENT,
            "kind": "token",
            "delta": "real",
        }
        await agent.close()
    await host.close()


def _frame_of(text: str) -> bytes | None:
    """The one frame the bridge sends the core for a client's text frame (None for none),
    serialized."""
    inbound = Bridge().from_client(text)
    assert not inbound.replies
    frames = [*inbound.wire, *(f.SerializeToString() for f in inbound.frames)]
    assert len(frames) <= 1
    return frames[0] if frames else None


def _decoded_frame(text: str) -> bytes | None:
    """The frame decode() builds for a client's text frame, serialized (None for none)."""
    [message] = decode(text, {}).messages
    assert not isinstance(message.frame, bytes)
    return message.frame.SerializeToString() if message.frame is not None else None


@pytest.mark.parametrize("plain", [True, False])
def test_a_tokens_frame_written_at_once_is_the_codecs(plain: bool) -> None:
    """Bridge.from_client writes an agent's event frame for the core straight from its
    params (chat_text.event_frame): byte for byte the frame decode() builds (read_event,
    else the codec), for random events and members of the wrong type; an event with other
    keys, or a member of the wrong type, is left to decode()."""
    rng = random.Random(5)
    at_once = 0
    for _ in range(1500):
        params = _params(rng, plain=plain)
        if rng.random() < 0.5:  # most tokens: members only
            params = {k: v for k, v in params.items() if k not in ("tool", "args", "agent_id")}
            params.pop("event_text", None)
        text = json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
        expected = _decoded_frame(text)
        assert _frame_of(text) == expected, params
        written = chat_text.event_frame(params)
        assert written is None or written == expected, params
        at_once += written is not None
    assert 400 < at_once < 1500


@pytest.mark.parametrize(
    "params",
    [
        {"session_id": "s", "kind": "token", "delta": "\ud800"},  # protobuf refuses it
        {"session_id": "\udfff", "kind": "token"},
        {"session_id": 7, "kind": "token"},
        {"session_id": "s", "kind": 1},
        {"session_id": "s", "kind": "goal_evaluated", "iteration": 2**32},
        {"session_id": "s", "kind": "goal_evaluated", "met": 1},
        {"session_id": "s", "kind": "token", "tool": "x"},  # the event's other keys
        {"session_id": "s", "kind": "token", "delta": "x" * chat_text.TEXT_LIMIT},
        {"session_id": "", "kind": "", "delta": ""},
        {"session_id": "s", "kind": None, "delta": None, "met": False, "iteration": 0},
        {"session_id": "s"},
        {},
        [],
        None,
    ],
)
def test_a_token_at_once_or_as_before(params: JSON) -> None:
    """Unusual and bad events: the same frame as decode(), or nothing as before (a bad
    member: the codec's error, a notification is not answered)."""
    text = json.dumps({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})
    expected = _decoded_frame(text)
    assert _frame_of(text) == expected
    if params is not None and not isinstance(params, list) and params.get("session_id") == 7:
        assert expected is None


def test_a_token_with_an_id_is_answered_as_before() -> None:
    """A token sent as a request goes the codec's way: its (empty) answer, or its error
    with the member's path."""
    bridge = Bridge()
    params: JSON = {"session_id": "s", "kind": "token", "delta": "hi"}
    request = {"jsonrpc": "2.0", "id": 3, "method": "agent.chat.event", "params": params}
    inbound = bridge.from_client(json.dumps(request))
    assert [json.loads(r) for r in inbound.replies] == [{"jsonrpc": "2.0", "id": 3, "result": None}]
    [frame] = inbound.frames
    assert frame.agent_chat_event.event.delta == "hi"
    request["params"] = {"session_id": "s", "kind": "token", "delta": 5}
    [reply] = bridge.from_client(json.dumps(request)).replies
    error = json.loads(reply)["error"]
    assert error["code"] == -32602 and error["data"] == {"field": "delta"}


def test_only_the_events_own_shapes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Params with keys of the client's own choosing (any number, any size) are read as
    before and never kept by event_frame; an event's own shape is."""
    monkeypatch.setattr(chat_text, "_shapes", {})
    for n in range(2 * chat_text._SHAPES_MAX):
        junk = {"kind": "token", "delta": "x", f"k{n}" + "y" * 1000: n}
        assert chat_text.event_frame(junk) is None
    assert all(chat_text._FRAME_KEYS.issuperset(keys) for keys in chat_text._shapes)
    assert chat_text.event_frame({"delta": "x", "kind": "token"}) is not None
    assert ("delta", "kind") in chat_text._shapes
