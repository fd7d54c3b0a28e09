"""A differential fuzz of every hand-written fast path beside the generic codec.

Each fast path (wire/chat_text.py, wire/turn_text.py, wire/proposal_text.py, wire/batch.py,
the gateway's parse with orjson, event_frame, audio_frames._client_pcm, the core's
notification_bytes / answer_bytes, the runs fan-out's texts and voice's byte paths) picks
itself by a cheap check and leaves the rest to the codec. Here each is fed what a client
holding a valid token could send, written as JSON text so that the parser is fed too:
nesting at and past the depth limits, integers past every range (2^53 +/- 1, 2^64), -0.0,
floats in exponent form, 1e400, NaN/Infinity texts, lone and escaped surrogates, NUL, DEL
and other control characters, duplicate and escaped keys, keys out of order, members of
the wrong type, non-object params, strings at and past every cap; invalid UTF-8 and
malformed headers in binary frames. Each is checked against the generic path on the same
input: the same frame for the core (the same bytes where the path writes bytes), the
same reply (error code, message and data), the same JSON text, and no exception.

The freedoms the fast paths document are the only ones allowed: a free-form object's
keys (and a chat event's other keys) in the client's order (wire/turn_text.py,
wire/chat_text.py, wire/proposal_text.py), no text at all where one could differ, and a
field appended after the others in a serialized message (wire/batch.length_delimited).

Derandomized and bounded: a few seconds in all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from car_grpc.core import runs, session, voice
from car_grpc.core.run_turns import FIELD_CAP, KEPT, TOO_LARGE, capped
from car_grpc.gateway import audio_frames, jsonrpc
from car_grpc.gateway.jsonrpc import Bridge
from car_grpc.v1 import runs_pb2, session_pb2, tools_pb2, voice_pb2
from car_grpc.wire import api, batch, chat_text, codec, multiplex, proposal_text, turn_text
from car_grpc.wire.twins import fill_out
from tests.fuzz_strategies import messages, proto_values

JSON = Any

#: Derandomized, no example database, no deadline; shrinking kept (a failure is cheap).
DIFF = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: The gateway's readings of chat events and run turns: the most shapes to reach.
DIFF_MORE = settings(DIFF, max_examples=300)

# ------------------------------------------------------------------ hostile JSON texts

_NUMBERS = [
    "0", "-0", "1", "-1", "3", "3.0", "-0.0", "0.0", "0e0", "-0e0", "1e2", "1E2", "1e+2",
    "2e-1", "1.5", "60.0", "6E1", "1e400", "-1e400", "1e-400", "4294967295", "4294967296",
    "-4294967296", "4294967295.0", "4.294967295e9", "-1.0", "9007199254740991",
    "9007199254740992", "9007199254740993", "-9007199254740992", "-9007199254740993",
    "9007199254740993.0", "9.007199254740993e15", "18446744073709551615",
    "18446744073709551616", "-9223372036854775809", "10000000000000000000",
    "1" + "0" * 40, "5e-324", "1.7976931348623157e308", "0.1", "1e16", "123456789012345678",
]  # fmt: skip
_STRINGS = [
    '""', '"x"', '"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '"\\ude00\\ud83d"', '"\\u0000"',
    '"\x7f"', '"\\u007f"', '"\\u001f"', '"\\b\\f\\n\\r\\t"', '"é"', '"\\u00e9"', '"😀"',
    '"\\/"', '"a\\"b"', '"\\\\"', '"\\uFFFF"', '"\\ufeff"', '"\u2028"',
]  # fmt: skip
_LITERALS = ["true", "false", "null"]
_NOT_JSON = [
    '"\x01"',
    '"\\x"',
    '"\\ud83"',
    "NaN",
    "Infinity",
    "-Infinity",
    "nan",
    "+1",
    "01",
    ".5",
    "1.",
    "'x'",
    "undefined",
]
#: Every cap a text passes here: 16 KiB of text (chat, turn, output), a turn string's
#: FIELD_CAP in UTF-8 bytes (1, 2, 3 and 4 bytes a character), a text that grows when
#: escaped (NUL: 6 characters, DEL: 6).
_CAPS = sorted(
    {chat_text.TEXT_LIMIT, turn_text.TEXT_LIMIT, proposal_text.OUTPUT_TEXT_LIMIT, FIELD_CAP}
)


def _long(n: int, char: str) -> str:
    return json.dumps(char * n)


def _near_caps() -> st.SearchStrategy[str]:
    caps = st.sampled_from(_CAPS)
    chars = st.sampled_from(["x", "é", "€", "😀", "\x00", "\x7f"])

    def at(cap: int, char: str, delta: int) -> str:
        width = len(char.encode()) if char not in "\x00\x7f" else 6
        return _long(max(cap // width + delta, 0), char)

    return st.builds(at, caps, chars, st.integers(-40, 8))


def _text_of(raw: str, ensure_ascii: bool) -> str:
    return json.dumps(raw, ensure_ascii=ensure_ascii)


_any_chars = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
_SIMPLE_STRINGS = ['"x"', '"token"', '"\u00e9\u20ac"', '"a b"', '""', '"\ud83d\ude00"']
string_texts = st.one_of(
    st.sampled_from(_SIMPLE_STRINGS),
    st.sampled_from(_STRINGS),
    st.builds(_text_of, st.text(_any_chars, max_size=8), st.booleans()),
    _near_caps(),
)
number_texts = st.one_of(
    st.sampled_from(["0", "1", "3", "4294967295"]),
    st.sampled_from(_NUMBERS),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(
        lambda whole, frac, exp: f"{whole}.{frac}e{exp}",
        st.integers(-(10**9), 10**9),
        st.integers(0, 10**9),
        st.integers(-330, 310),
    ),
)
#: Leaves: now and then (one in 40) not JSON at all, which refuses the whole frame.
leaf_texts = st.integers(0, 39).flatmap(
    lambda n: (
        st.sampled_from(_NOT_JSON)
        if n == 39
        else (string_texts, number_texts, st.sampled_from(_LITERALS))[n % 3]
    )
)
_COMMON_KEYS = ['"kind"', '"\\u006bind"', '"prompt"', '"output"', '"a"', '"b"', '""', '"\\ud800"']
key_texts = st.one_of(st.sampled_from(_COMMON_KEYS), string_texts)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in members) + "}"


def _deep(depth: int, shape: str, leaf: str) -> str:
    if shape == "[":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


#: Nesting at and past each limit: FLAT_NESTING, SHALLOW_BRACKETS, MAX_PROTO_DEPTH, json's
#: recursion (about 1,000) and orjson's (1,024).
deep_texts = st.builds(
    _deep,
    st.sampled_from([14, 15, 16, 17, 18, 19, 20, 24, 25, 33, 34, 50, 98, 101, 1023, 1025, 2000]),
    st.sampled_from(["[", "{"]),
    st.sampled_from(["1", '"x"', "[]", "{}", "1.5", "null"]),
)


def _values(leaves: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.recursive(
        leaves,
        lambda kids: (
            st.lists(kids, max_size=4).map(_array)
            | st.lists(st.tuples(key_texts, kids), max_size=4).map(_object)
        ),
        max_leaves=10,
    )


#: Any JSON value as text, mostly valid; now and then not JSON, or nested deeply.
value_texts = st.one_of(_values(leaf_texts), _values(leaf_texts), deep_texts)
#: Values a text is written for where they are valid (no floats, no big integers), so that
#: the fast paths are reached; with the odd hostile leaf.
plain_texts = _values(
    st.one_of(
        st.sampled_from(['"x"', '"é"', '"\\u0000"', '"\x7f"', "0", "-1", "9007199254740992"]),
        st.sampled_from(_LITERALS),
        string_texts,
        st.sampled_from(["-0", "3.0", "9007199254740993", "1e2", "-0.0"]),
    )
)
some_value = st.one_of(plain_texts, plain_texts, value_texts)
_ID_TEXTS = ["1", '"a"', "null", "1.5", "-0", "true", "{}", "[]", "1e400", "18446744073709551616"]


def _frame(method: str, params: str | None, id_text: str | None, extra: str = "") -> str:
    parts = ['"jsonrpc":"2.0"', f'"method":{json.dumps(method)}']
    if id_text is not None:
        parts.append(f'"id":{id_text}')
    if params is not None:
        parts.append(f'"params":{params}')
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


#: Whitespace JSON allows, and characters that look like it and are not.
_SPACES = [" ", "\t", "\n", "\r", "\x0c", "\x0b", "\u00a0", "\u2028", "\ufeff", "\x00"]


def _sent(text: str, how: int, at: int) -> str | bytes:
    """A frame's text as the client sends it: as text (most often), as bytes in one of
    the encodings json detects (a binary frame), as bytes that are not UTF-8 (a lone
    surrogate, a 0xFF byte, a cut sequence), with whitespace or a BOM added."""
    if how < 16:
        return text
    if how == 16:
        return text.encode("utf-8", "surrogatepass")
    if how == 17:
        return text.encode("utf-16-le" if at % 2 else "utf-16-be", "surrogatepass")
    if how == 18:
        data = text.encode("utf-8", "surrogatepass")
        at %= len(data) + 1
        return data[:at] + (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf")[at % 4] + data[at:]
    at %= len(text) + 1
    return text[:at] + _SPACES[at % len(_SPACES)] + text[at:]


@st.composite
def envelopes(draw: st.DrawFn, method: str, params: st.SearchStrategy[str]) -> str | bytes:
    """A frame of `method` with drawn params: a notification or a request, alone or in a
    batch, with the odd extra member or duplicate key, sent as text or bytes (_sent)."""
    id_text = draw(st.none() | st.none() | st.sampled_from(_ID_TEXTS))
    text = draw(params)
    extra = draw(st.sampled_from(["", "", "", '"x":' + draw(value_texts), f'"params":{text}']))
    frame = _frame(method, None if draw(st.integers(0, 9)) == 9 else text, id_text, extra)
    shape = draw(st.integers(0, 19))
    if shape == 19:
        frame = f"[{frame}]"
    elif shape == 18:
        frame = f"[{frame},{frame}]"
    elif shape == 17:
        frame = f" \n{frame}\t"
    elif shape == 16:
        frame = "\ufeff" + frame
    return _sent(frame, draw(st.integers(0, 19)), draw(st.integers(0, 2**16)))


def _members(keys: list[str], typed: Callable[[str], st.SearchStrategy[str]]) -> Any:
    """An object's text with members drawn from `keys` (as given, or escaped), in any order,
    some twice, each of its own type mostly."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys) + 2))
        members = []
        for key in chosen:
            if draw(st.integers(0, 19)) == 19:
                key_text = "".join(f"\\u{ord(c):04x}" for c in key).join('""')
            else:
                key_text = json.dumps(key)
            value = draw(value_texts if draw(st.integers(0, 9)) == 9 else typed(key))
            members.append((key_text, value))
        return _object(members)

    return build()


_NOT_OBJECTS = ["[]", "null", "1", '"x"', "[{}]", "true", "{}"]


def _params(obj: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(obj, obj, obj, obj, st.sampled_from(_NOT_OBJECTS))


# ------------------------------------------------------------------ canonical comparison


def _canon(value: JSON) -> list[Any]:
    """A JSON value as a flat list of tokens, where 1, 1.0 and true differ and objects
    compare without order (iterative: values may nest past Python's recursion)."""
    out: list[Any] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.append(("o", len(item)))
            for k in sorted(item, reverse=True):
                stack += (item[k], ("k", k))
        elif isinstance(item, list):
            out.append(("a", len(item)))
            stack.extend(reversed(item))
        elif isinstance(item, tuple):
            out.append(item)  # a key
        elif isinstance(item, bool):
            out.append(("b", item))
        elif isinstance(item, int):
            out.append(("i", item))
        elif isinstance(item, float):
            out.append(("f", repr(item)))
        else:
            out.append(("s", item) if isinstance(item, str) else None)
    return out


def _same_text(fast: str, generic: str, ordered: Callable[[list[str]], bool]) -> None:
    """`fast` is strict ASCII JSON with the value of `generic`; the keys of each object at
    a typed level (`ordered(path)`) in the same order (free-form objects: any order)."""
    assert fast.isascii(), fast
    try:
        json.loads(fast, parse_constant=lambda name: pytest.fail(f"{name} in {fast}"))
    except ValueError as e:
        pytest.fail(f"not JSON: {e}: {fast[:300]!r} (the codec's: {generic[:300]!r})")
    assert _canon(json.loads(fast)) == _canon(json.loads(generic)), (fast, generic)

    def orders(text: str) -> list[tuple[list[str], list[str]]]:
        out = []

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            return dict(pairs)

        def walk(value: JSON, path: list[str]) -> None:
            if isinstance(value, dict):
                if ordered(path):
                    out.append((path, list(value)))
                for k, v in value.items():
                    walk(v, [*path, k])
            elif isinstance(value, list):
                for v in value:
                    walk(v, [*path, "[]"])

        walk(json.loads(text, object_pairs_hook=hook), [])
        return out

    assert orders(fast) == orders(generic), (fast, generic)


# ------------------------------------------------------------------ the gateway's two paths


@contextmanager
def _generic_paths() -> Iterator[None]:
    """The gateway with every fast path of its reading off: json's parser alone, the codec
    reading every params, no text written beside what it reads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jsonrpc, "_loads", jsonrpc._decoder.decode)
        mp.setattr(chat_text, "event_frame", lambda params: None)
        mp.setattr(chat_text, "read_event", lambda params, notice: False)
        mp.setattr(turn_text, "read_turns", lambda params, request: turn_text.NOT_READ)
        mp.setattr(turn_text, "turn_texts", lambda turns: [])
        mp.setattr(proposal_text, "output_text", lambda output: "")
        yield


_TEXT_FIELDS = {
    "agent_chat_event": "event_text",
    "runs_record_turns": "turn_texts",
    "tools_execute": "output_text",
}


def _through(
    text: str | bytes, prepare: Callable[[Bridge], None] | None = None
) -> tuple[list[session_pb2.ClientFrame], list[bytes], list[str]]:
    """What Bridge.from_client gives for `text`: its frames for the core (parsed), the
    bytes of those written as bytes, its replies."""
    bridge = Bridge()
    if prepare is not None:
        prepare(bridge)
    inbound = bridge.from_client(text)
    frames = list(inbound.frames) + [session_pb2.ClientFrame.FromString(w) for w in inbound.wire]
    return frames, list(inbound.wire), inbound.replies


_NESTED_TOO_DEEPLY = (
    '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error: nested too deeply"}}'
)


def _nesting(value: JSON) -> int:
    """How deep `value`'s objects and arrays nest (iterative: it may nest past Python's
    recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack += ((child, depth + 1) for child in children)
    return deepest


def _only_json_refuses(text: str | bytes, generic_replies: list[str]) -> bool:
    """The one difference jsonrpc._loads documents: json alone refuses nesting past
    Python's recursion limit (less the caller's stack) that orjson reads (up to 1,024)."""
    if generic_replies != [_NESTED_TOO_DEEPLY]:
        return False
    try:
        return _nesting(jsonrpc.parse(text)) > 800
    except ValueError:
        return False


def _differential(
    text: str | bytes, prepare: Callable[[Bridge], None] | None = None
) -> list[tuple[session_pb2.ClientFrame, Any]]:
    """Bridge.from_client of `text` with its fast paths and without: the same replies, the
    same frames once the texts written beside them are set aside. Returns each frame with
    its text(s), for the caller to check against the codec's."""
    fast, _, fast_replies = _through(text, prepare)
    with _generic_paths():
        generic, _, generic_replies = _through(text, prepare)
    if fast_replies != generic_replies and _only_json_refuses(text, generic_replies):
        return []
    assert fast_replies == generic_replies, text
    assert len(fast) == len(generic), (text, fast_replies)
    out = []
    for frame, expected in zip(fast, generic, strict=True):
        member = frame.WhichOneof("body")
        texts: Any = None
        if member in _TEXT_FIELDS:
            body = getattr(frame, member)
            name = _TEXT_FIELDS[member]
            texts = (
                list(getattr(body, name)) if member == "runs_record_turns" else getattr(body, name)
            )
            body.ClearField(name)
            getattr(expected, member).ClearField(name)
        assert frame == expected, text
        out.append((frame, texts))
    return out


# ------------------------------------------------------------------ parse (orjson beside json)


def _parsed_or_error(read: Callable[[str | bytes], JSON], text: str | bytes) -> JSON:
    try:
        return ("ok", _canon(read(text)))
    except jsonrpc.BatchTooLarge as e:
        return ("too large", str(e))
    except ValueError as e:
        return ("error", type(e).__name__, str(e))


@DIFF
@given(
    st.one_of(value_texts, envelopes("state.set", value_texts)),
    st.sampled_from(["utf-8", "utf-16", "none"]),
)
def test_parse_reads_every_text_as_json_alone(text: str | bytes, encoding: str) -> None:
    """jsonrpc.parse reads with orjson where it reads as json: the same value (1 is not
    1.0, -0.0 is not 0), or the same error, for any text and its bytes."""
    data: str | bytes = text
    if encoding != "none" and isinstance(text, str):
        try:
            data = text.encode(encoding)
        except UnicodeEncodeError:
            data = text.encode(encoding, "surrogatepass")  # invalid UTF-8 (CESU) in bytes
    fast = _parsed_or_error(jsonrpc.parse, data)
    with _generic_paths():
        generic = _parsed_or_error(jsonrpc.parse, data)
    if fast != generic and generic == ("error", "ValueError", "nested too deeply"):
        assert _nesting(jsonrpc.parse(data)) > 800  # the one difference _loads documents
        return
    assert fast == generic, data


@DIFF
@given(st.binary(max_size=40).map(lambda b: b"{" + b + b"}"))
def test_parse_reads_binary_frames_as_json_alone(data: bytes) -> None:
    """Binary frames that are not audio: JSON in any encoding json detects, or invalid
    UTF-8, read (or refused) as json alone reads them."""
    fast = _parsed_or_error(jsonrpc.parse, data)
    with _generic_paths():
        generic = _parsed_or_error(jsonrpc.parse, data)
    assert fast == generic, data


# ------------------------------------------------------------------ agent.chat.event

_CHAT_TYPED = {
    "session_id": string_texts,
    "kind": st.sampled_from(['"token"', '"done"', '"tool_call"', '""', '"x"']) | string_texts,
    "delta": string_texts,
    "approval_id": string_texts,
    "iteration": number_texts,
    "met": st.sampled_from(["true", "false", "null", "0", "1"]),
    "grounded": st.sampled_from(["true", "false", "null"]),
    "reason": string_texts,
    "message": string_texts,
}
_CHAT_OTHERS = ["tool", "args", "agent_id", "event_text", "chat_id", "kind_enum", "params_text"]
chat_params = _params(
    _members(
        [*_CHAT_TYPED, *_CHAT_OTHERS],
        lambda key: _CHAT_TYPED.get(key, some_value),
    )
)
_HOST_AGENT = "bot"
_TYPED_CHAT_KEYS = {"session_id", "agent_id", *(m[1] for m in chat_text._MEMBERS)}


def _host_notice_text(frame: session_pb2.ClientFrame, members: str) -> None:
    """The host's notice the core splices from `members` (ChatEventNotice.params_text, as
    the gateway sends it on) is the codec's of the host's notice built from the event."""
    notice = frame.agent_chat_event
    head = chat_text.notice_head(notice.session_id, _HOST_AGENT)
    spliced = session_pb2.ServerFrame.FromString(chat_text.notice_frame(head, members))
    fast = Bridge().from_core(spliced)
    host = session_pb2.ServerFrame()
    out = host.agents_chat_event
    out.session_id, out.agent_id = notice.session_id, _HOST_AGENT
    out.event.CopyFrom(notice.event)  # as the core relays it (set, even when empty)
    generic = Bridge().from_core(host)
    assert fast is not None and generic is not None
    # The event's other keys come in the agent's order (chat_text.py): only the typed
    # members' order is the codec's.
    fast_keys = [k for k in json.loads(fast)["params"] if k in _TYPED_CHAT_KEYS]
    generic_keys = [k for k in json.loads(generic)["params"] if k in _TYPED_CHAT_KEYS]
    assert fast_keys == generic_keys, (fast, generic)
    _same_text(fast, generic, lambda path: path == [])


@DIFF_MORE
@given(envelopes("agent.chat.event", chat_params))
def test_chat_events_read_at_once_are_the_codecs(text: str | bytes) -> None:
    """event_frame and read_event against the codec: the same frame for the core, the same
    error for a request, and a text the host gets as the codec would write it."""
    for frame, event_text in _differential(text):
        if event_text:
            assert len(event_text) <= chat_text.TEXT_LIMIT
            _host_notice_text(frame, event_text)


@DIFF
@given(chat_params)
def test_a_tokens_frame_written_at_once_is_read_events_bytes(params_text: str) -> None:
    """event_frame's bytes are those of the frame read_event builds, serialized."""
    try:
        params = jsonrpc.parse(params_text)
    except ValueError:
        return
    written = chat_text.event_frame(params)
    if written is None:
        return
    frame = session_pb2.ClientFrame()
    notice = frame.agent_chat_event
    notice.SetInParent()
    assert chat_text.read_event(params, notice)
    assert written == frame.SerializeToString(), params


# ------------------------------------------------------------------ runs.record_turns

_TURN_TYPED = {
    "index": number_texts,
    "prompt": string_texts,
    "tool": string_texts,
    "parameters": some_value,
    "output": some_value,
    "cli_outcome": some_value,
    "verifier_verdict": string_texts,
    "policy_rejected": st.sampled_from(["true", "false", "null", "0"]),
}
turn_objects = _params(
    _members([*_TURN_TYPED, "extra", "turn_texts"], lambda k: _TURN_TYPED.get(k, some_value))
)
_TURNS_TYPED = {
    "run_id": string_texts,
    "turns": st.lists(turn_objects, min_size=1, max_size=4).map(_array),
}


@st.composite
def _turns_shell(draw: st.DrawFn) -> str:
    """A record_turns' params of a run_id and turns (most often), in either order, with
    the odd other member."""
    members = [("run_id", draw(string_texts)), ("turns", draw(_TURNS_TYPED["turns"]))]
    if draw(st.integers(0, 4)) == 4:
        members.append((draw(st.sampled_from(["turn_texts", "x", "turns"])), draw(value_texts)))
    order = draw(st.permutations(members))
    return _object([(json.dumps(k), v) for k, v in order])


turns_params = st.one_of(
    _turns_shell(),
    _turns_shell(),
    _turns_shell(),
    _params(
        _members(["run_id", "turns", "turn_texts"], lambda key: _TURNS_TYPED.get(key, value_texts))
    ),
)


def _turn_json(turn: runs_pb2.RunTurn) -> str:
    copy = runs_pb2.RunTurn()
    copy.CopyFrom(turn)
    copy.ClearField("index")
    return codec.message_to_text(copy)


@DIFF_MORE
@given(
    envelopes("runs.record_turns", turns_params),
    st.integers(0, 2**63 - 1),
    st.sampled_from(list(runs_pb2.RunStatus.values())),
)
def test_turns_read_at_once_are_the_codecs_and_so_are_their_events(
    text: str | bytes, timestamp: int, status: runs_pb2.RunStatus.ValueType
) -> None:
    """read_turns against the codec (the same request, the same error), each turn's text
    as the codec writes the turn, and each runs.trace.event the core puts together from
    that text as the codec writes the stored record's event."""
    for frame, texts in _differential(text):
        request = frame.runs_record_turns
        assert len(texts) in (0, len(request.turns))
        for turn, turn_text_ in zip(request.turns, texts, strict=False):
            if turn_text_:
                assert len(turn_text_) <= turn_text.TEXT_LIMIT
                _same_text(turn_text_, _turn_json(turn), lambda path: path == [])
        if texts:
            _trace_events(request, texts, timestamp, status)


def _trace_events(
    request: runs_pb2.RecordTurnsRequest,
    texts: list[str],
    timestamp: int,
    status: runs_pb2.RunStatus.ValueType,
) -> None:
    """runs.record_turns and LiveRun._fan_out's two writers of one turn's event: from the
    gateway's text (subscribers behind car-grpc's gateway) and from the stored record."""
    stored: list[bytes] = []
    members: list[str | None] = []
    for i, original in enumerate(request.turns):
        turn = runs_pb2.RunTurn()
        turn.CopyFrom(original)
        defaulted = not turn.HasField("verifier_verdict")
        outcome, data = capped(turn)
        if outcome == TOO_LARGE:
            return
        stored.append(data)
        members.append(runs._turn_members(texts[i], defaulted, turn) if outcome == KEPT else None)
    run_id, agent_id = request.run_id, "agent\x7f\u00e9"
    records = runs.turn_records(stored, 7, timestamp)
    head = runs_pb2.RunTraceEvent(run_id=run_id, agent_id=agent_id, status=status)
    text_head = turn_text.event_head(run_id, agent_id)
    text_tail = turn_text.event_tail(codec.enum_to_json(runs._STATUS_ENUM, status))
    for i, member_text in enumerate(members):
        cursor = 100 + i
        # The stored record and its event, written from serialized parts, are the
        # serializer's (the event's record and cursor appended after its head: field order
        # is free, batch.length_delimited).
        turn = runs_pb2.RunTurn.FromString(stored[i])
        turn.index = 7 + i
        record = runs_pb2.RunRecord(record=runs.TURN, timestamp=timestamp, turn=turn)
        read = runs_pb2.RunRecord.FromString(records.records[i])
        assert read == record
        # (deterministic: a Struct's entries in key order, as no serializer promises more)
        assert read.SerializeToString(deterministic=True) == record.SerializeToString(
            deterministic=True
        )
        event = runs._turn_event(head.SerializeToString(), records.records[i], cursor)
        whole = runs_pb2.RunTraceEvent(
            run_id=run_id, agent_id=agent_id, status=status, record=record, cursor=cursor
        )
        expected = fill_out(session_pb2.ServerFrame(runs_trace_event=whole))
        assert session_pb2.ServerFrame.FromString(event) == expected
        if member_text is None:
            continue
        params = turn_text.event_text(text_head, timestamp, 7 + i, member_text, cursor, text_tail)
        fast = Bridge().from_core(session_pb2.ServerFrame.FromString(runs._text_event(params)))
        generic = Bridge().from_core(expected)
        assert fast is not None and generic is not None
        _same_text(fast, generic, lambda path: path in ([], ["params"], ["params", "record"]))


# ------------------------------------------------------------------ tools.execute answers


def _call_tools(bridge: Bridge) -> None:
    frame = session_pb2.ServerFrame(id="cb-1")
    frame.tools_execute.action_id = "a"
    frame.tools_execute.tool = "t"
    bridge.from_core(frame)


@st.composite
def tool_answers(draw: st.DrawFn) -> str:
    result = draw(some_value)
    kind = draw(st.integers(0, 9))
    if kind == 9:
        return f'{{"jsonrpc":"2.0","id":"cb-1","error":{draw(some_value)}}}'
    if kind == 8:
        return f'{{"jsonrpc":"2.0","id":"cb-1","result":{result},"error":null}}'
    return f'{{"jsonrpc":"2.0","id":"cb-1","result":{result}}}'


@DIFF
@given(tool_answers())
def test_tool_outputs_read_with_their_text_are_the_codecs(text: str) -> None:
    """A client's tools.execute answer: the same frame for the core with its output text
    set aside, and that text the codec's of the output's Value."""
    for frame, output in _differential(text, _call_tools):
        if output:
            assert len(output) <= proposal_text.OUTPUT_TEXT_LIMIT
            assert frame.tools_execute.HasField("output")
            _same_text(output, codec.value_to_text(frame.tools_execute.output), lambda p: False)


_STATUSES = list(tools_pb2.ActionStatus.values())


@st.composite
def proposal_results(
    draw: st.DrawFn,
) -> tuple[tools_pb2.ProposalResult, dict[str, JSON], dict[str, tuple[JSON, str]]]:
    """A proposal's result as the core's executor makes it from what clients sent: outputs
    parsed from hostile texts (what the codec takes of them), errors and state changes."""
    result = tools_pb2.ProposalResult(proposal_id=draw(st.text(max_size=4)))
    outputs: dict[str, JSON] = {}
    texts: dict[str, tuple[JSON, str]] = {}
    for i in range(draw(st.integers(0, 3))):
        action_id = draw(st.sampled_from(["a", "b", "\x00", "é"])) + str(i)
        status = draw(st.sampled_from(_STATUSES))
        r = result.results.add(action_id=action_id, status=status)
        try:
            output = json.loads(draw(_values(leaf_texts)))
            codec.json_to_value(output, r.output)
        except (ValueError, RecursionError):
            output = None
            r.output.null_value = struct_pb2.NULL_VALUE
        if status == tools_pb2.ACTION_STATUS_SUCCEEDED:
            outputs[action_id] = output
            # The core keeps an output's text only when the gateway wrote one (tools.py).
            if draw(st.booleans()) and (text := proposal_text.output_text(output)):
                texts[action_id] = (output, text)
        else:
            r.output.null_value = struct_pb2.NULL_VALUE
        if draw(st.booleans()):
            r.error = draw(st.text(max_size=4))
        if draw(st.booleans()):
            r.state_changes.SetInParent()
            if draw(st.booleans()):
                r.state_changes.fields["k"].CopyFrom(draw(proto_values))
        r.duration_ms = draw(st.sampled_from([0, 1, 2**53 + 1, 2**64 - 1]))
        r.timestamp = draw(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
        for name in ("rolled_back", "terminal"):
            if draw(st.booleans()):
                setattr(r, name, draw(st.booleans()))
    if draw(st.booleans()):
        cost = result.cost
        cost.SetInParent()
        cost.tool_calls = draw(st.sampled_from([0, 2**32 - 1]))
        cost.total_duration_ms = draw(st.sampled_from([0, 2**64 - 1]))
    return result, outputs, texts


@settings(DIFF, max_examples=60)
@given(proposal_results())
def test_a_results_text_is_the_codecs(drawn: Any) -> None:
    result, outputs, texts = drawn
    text = proposal_text.result_text(result, outputs, texts)
    if not text:
        return
    generic = codec.result_to_text(tools_pb2.SubmitProposalResponse(result=result), "")
    typed = [[], ["cost"], ["results", "[]"]]
    _same_text(text, generic, lambda path: path in typed)


# ------------------------------------------------------------------ binary frames


@DIFF
@given(
    st.one_of(
        st.binary(max_size=40),
        st.builds(
            lambda kind, raw_id, seq, fmt, pcm: (
                audio_frames.HEADER.pack(kind, raw_id, seq, fmt) + pcm
            ),
            st.sampled_from([0, 1, 2, 3, 4, 5, 0x1F]),
            st.binary(min_size=16, max_size=16),
            st.sampled_from([0, 1, 127, 128, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
            st.integers(0, 255),
            st.binary(max_size=9) | st.integers(0x3FFE, 0x4001).map(lambda n: b"\x01" * n),
        ),
    )
)
def test_a_client_pcm_frame_written_at_once_is_the_codecs(data: bytes) -> None:
    """audio_frames.from_client against decode() and the protobuf serializer: the same
    bytes for a PCM frame, a -32600 with id null for any other."""
    if not audio_frames.is_audio_frame(data):
        return
    inbound = audio_frames.from_client(data)
    try:
        frame = audio_frames.decode(data)
        ok = frame.type == audio_frames.PCM and len(frame.data) % 2 == 0 and frame.data
    except audio_frames.BinaryFrameError as e:
        ok = False
        if len(data) < audio_frames.HEADER_SIZE or data[0] not in (1, 2, 3, 4):
            [reply] = inbound.replies
            assert json.loads(reply)["error"]["message"] == f"invalid binary frame: {e}"
    if ok:
        assert not inbound.replies and not inbound.frames
        assert inbound.wire == [session_pb2.ClientFrame(voice_audio=frame).SerializeToString()]
    else:
        [reply] = inbound.replies
        assert not inbound.wire and not inbound.frames
        error = json.loads(reply)
        assert error["id"] is None and error["error"]["code"] == -32600


# ------------------------------------------------------------------ bytes written by hand

_SIZES = [0, 1, 126, 127, 128, 129, 0x3FFE, 0x3FFF, 0x4000, 0x4001]


@DIFF
@given(st.lists(st.sampled_from(_SIZES) | st.integers(0, 300), max_size=6))
def test_a_batch_is_the_serializers(sizes: list[int]) -> None:
    """batch.encode: the ConnectBatchedRequest the serializer writes of the same frames."""
    frames = [session_pb2.ClientFrame(id="x" * n).SerializeToString() for n in sizes]
    expected = session_pb2.ConnectBatchedRequest(
        frames=[session_pb2.ClientFrame.FromString(f) for f in frames]
    ).SerializeToString()
    assert batch.encode(frames) == expected


@pytest.mark.parametrize("size", [0x1FFFFF - 3, 0x1FFFFF - 2, 0x200000])
def test_a_batch_of_a_frame_past_three_byte_lengths_is_the_serializers(size: int) -> None:
    frames = [session_pb2.ClientFrame(id="x" * size).SerializeToString(), b""]
    expected = session_pb2.ConnectBatchedRequest(
        frames=[session_pb2.ClientFrame.FromString(f) for f in frames]
    ).SerializeToString()
    assert batch.encode(frames) == expected


@DIFF
@given(
    st.sampled_from([0, 1, 127, 128, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 2**63, 2**64 - 1])
    | st.integers(0, 2**64 - 1)
)
def test_a_varint_is_the_serializers(value: int) -> None:
    data = voice_pb2.VoiceAudio(seq=value).SerializeToString()
    assert batch.varint(value) == (data[1:] if value else b"\x00")


_SERVER_MEMBERS = sorted(api.SERVER_MEMBERS)


@st.composite
def server_members(draw: st.DrawFn) -> tuple[str, Any]:
    member = draw(st.sampled_from(_SERVER_MEMBERS))
    return member, draw(messages(api.SERVER_MEMBERS[member].message))


@DIFF
@given(server_members(), st.sampled_from(["", "1", "cb-9", "é" * 70, "x" * 200]), st.booleans())
def test_frames_written_from_their_member_are_the_serializers(
    drawn: tuple[str, Any], request_id: str, twins: bool
) -> None:
    """session.notification_bytes / answer_bytes (batch.member_frame): the bytes of the
    ServerFrame built and serialized."""
    member, message = drawn
    copy = type(message)()
    copy.CopyFrom(message)
    written = session.answer_bytes(request_id, member, copy, twins=twins)
    frame = session_pb2.ServerFrame(id=request_id)
    getattr(frame, member).CopyFrom(fill_out(message) if twins else message)
    assert written == frame.SerializeToString()
    copy = type(message)()
    copy.CopyFrom(message)
    frame = session_pb2.ServerFrame()
    getattr(frame, member).CopyFrom(fill_out(message))
    assert session.notification_bytes(member, copy) == frame.SerializeToString()


@DIFF
@given(
    st.uuids().map(lambda u: u.hex),
    st.sampled_from([0, 1, 127, 128, 2**64 - 1]) | st.integers(0, 2**64 - 1),
    st.binary(max_size=8) | st.integers(0x3FFF, 0x4001).map(lambda n: b"\x00" * n),
    proto_values,
)
def test_voices_bytes_are_the_serializers(
    session_id: str, seq: int, data: bytes, event: struct_pb2.Value
) -> None:
    """voice._audio_message and _event_bytes: the message the serializer writes (seq and
    data appended after the head: field order is free, batch.length_delimited), and the
    same bytes once read and written again."""
    written = voice._audio_message(voice._audio_head(session_id), seq, data)
    audio = voice_pb2.VoiceAudio(
        session_id=session_id, seq=seq, type=audio_frames.PCM, format=voice.PCM16LE, data=data
    )
    expected = voice.ServeVoiceResponse(audio=fill_out(audio))
    read = voice.ServeVoiceResponse.FromString(written)
    assert read == expected
    assert read.SerializeToString() == expected.SerializeToString()
    written = voice._event_bytes(voice._notice_head(session_id), event)
    notice = voice_pb2.VoiceEventNotice(session_id=session_id, event=event)
    frame = session_pb2.ServerFrame(voice_event=fill_out(notice))
    read_frame = session_pb2.ServerFrame.FromString(written)
    assert read_frame == frame
    # (deterministic: a Struct's map entries in key order)
    assert read_frame.SerializeToString(deterministic=True) == frame.SerializeToString(
        deterministic=True
    )


@DIFF
@given(
    st.integers(1, 2**64 - 1),
    st.binary(max_size=4) | st.integers(0x7F, 0x81).map(lambda n: b"\x0a" * n),
    st.booleans(),
    st.integers(0, 16),
    st.tuples(st.integers(1, 2**32 - 1), st.integers(1, 2**64 - 1)) | st.just((0, 0)),
    st.text(_any_chars.filter(lambda c: not 0xD800 <= ord(c) <= 0xDFFF), max_size=6),
)
def test_a_multiplexed_record_is_the_serializers(
    session_id: int, data: bytes, end: bool, code: int, ack: tuple[int, int], message: str
) -> None:
    """wire/multiplex.record, written by hand: the bytes of the MultiplexedServerSession
    (and, `code` as `cancel`, MultiplexedClientSession) the serializer writes."""
    written = multiplex.record(session_id, data, end=end, flag4=code, ack=ack, message=message)
    down = session_pb2.MultiplexedServerSession(
        session=session_id, batch=data, end=end, code=code, message=message
    )
    down.ack_batches, down.ack_bytes = ack
    assert written == session_pb2.ConnectMultiplexedResponse(sessions=[down]).SerializeToString()
    written = multiplex.record(session_id, data, end=end, flag4=code & 1, ack=ack)
    up = session_pb2.MultiplexedClientSession(
        session=session_id, batch=data, end=end, cancel=bool(code & 1)
    )
    up.ack_batches, up.ack_bytes = ack
    assert written == session_pb2.ConnectMultiplexedRequest(sessions=[up]).SerializeToString()


@pytest.mark.parametrize("depth", [254, 255, 400, 900])
def test_turns_nested_past_orjson_and_python_are_refused_as_by_the_codec(depth: int) -> None:
    """A turn nested deeper than orjson writes (255) or Python recurses in `plain` (about
    400): the codec's refusal (nested more than MAX_PROTO_DEPTH), not a RecursionError from
    the turn's text turned into the usage error; and no text for it."""
    nested: JSON = 1
    for _ in range(depth):
        nested = [nested]
    assert turn_text.plain(nested) == (depth < 255)  # orjson writes 254 levels, no more
    assert turn_text.turn_text({"parameters": nested}) == ""  # (the turn's object: one more)
    text = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "runs.record_turns",
         "params": {"run_id": "x", "turns": [{"parameters": nested}]}}
    )  # fmt: skip
    [reply] = _through(text)[2]
    error = json.loads(reply)["error"]
    assert error["message"] == "invalid params: nested more than 100 levels deep"
    _differential(text)


def test_turns_nested_past_what_python_converts_get_the_nesting_error_not_the_usage() -> None:
    """Nesting the parser takes and the codec cannot convert (it recurses past Python's
    limit): the same error as nesting the codec converts and upb refuses, whichever of the
    two checks a path meets first, never the usage error."""
    seen = set()
    for depth in range(880, 1030, 3):
        params = '{"run_id":"x","turns":[{"parameters":' + "[" * depth + "1" + "]" * depth + "}]}"
        text = _frame("runs.record_turns", params, "1")
        [reply] = _through(text)[2]
        seen.add(message := json.loads(reply)["error"]["message"])
        assert message in (NESTED, "parse error: nested too deeply"), depth
        with _generic_paths():
            [generic] = _through(text)[2]
        if generic != reply:  # the one difference jsonrpc._loads documents
            assert _only_json_refuses(text, [generic]) and message == NESTED
    assert seen == {NESTED, "parse error: nested too deeply"}


NESTED = "invalid params: nested more than 100 levels deep"


@DIFF
@given(
    st.none()
    | st.integers()
    | st.sampled_from([0, -1, 2**53 + 1, 2**64, -(2**70)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_any_chars, max_size=6),
    st.sampled_from(['{"a":1}', "null", '"\\u00e9"', "[1,2.5]"]),
)
def test_a_result_written_as_text_answers_the_clients_id_as_the_encoder(
    client_id: JSON, result: str
) -> None:
    """Bridge.from_core's answer from a result already written (_response_text, an integer
    id written as itself): the encoder's text of the whole response, for any id a client
    may send (a valid_id)."""
    assert jsonrpc.valid_id(client_id)
    fast = jsonrpc._response_text(client_id, result)
    assert fast == jsonrpc.response(client_id, json.loads(result))
