"""JSON-RPC 2.0 over the session stream, free of I/O (docs/protocol.md §1).

`Bridge` holds the JSON-RPC state of one WebSocket connection. A text frame from the
client goes in two steps: `decode` parses it and translates each message into a
ClientFrame (or the error the gateway answers itself) without any connection state, so it
may run anywhere, e.g. in another process for a large frame; `Bridge.admit` then gives the
requests their gateway ids and remembers what to answer (`from_client` does both).
`from_core` turns a ServerFrame into the text frame for the client. The method table and
the JSON<->proto mapping come from the descriptors (car_grpc.wire.api, car_grpc.wire.codec): nothing
here names a method.

Framing rules (PROTOCOL.md §1): a batch holds at most MAX_BATCH entries (a longer one is
refused whole, -32600 with id null, without reading past its first entry too many); ids
are strings, finite numbers or null (any other id: -32600 with id null); every frame the
gateway sends is strict JSON (the core's non-finite numbers are already null, see
codec.value_to_json; the encoder refuses NaN and Infinity outright).

Correlation: every request the client sends goes to the core under a gateway-side id, so
client ids of any JSON type (car-runtime uses integers) and duplicate ids are harmless;
the answer carries the client's original id back. Server-initiated requests keep their
`cb-N` id, and the bridge remembers which ClientFrame member answers each one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from car_grpc.v1 import errors_pb2, options_pb2, session_pb2
from car_grpc.wire import api, chat_text, codec, proposal_text, turn_text
from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)

log = logging.getLogger(__name__)

JSON = Any

#: Most entries in one batch (PROTOCOL.md §1); a longer batch is refused whole.
MAX_BATCH = 1000
#: Nesting depth the core's protobuf parser accepts (upb's default); a deeper frame would
#: end the whole session there, so the gateway refuses it with -32602 instead.
MAX_PROTO_DEPTH = 100
#: Server-initiated requests remembered per connection while awaiting the client's
#: answer; beyond it the oldest is forgotten (the core has timed it out long before).
MAX_OPEN_CALLBACKS = 4096

_FREE_FORM = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)


def _has_free_form(desc: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message can nest arbitrarily deep (it holds free-form JSON somewhere)."""
    if desc.full_name in _FREE_FORM or desc.full_name in seen:
        return True
    inner = seen | {desc.full_name}
    return any(
        fd.type == FieldDescriptor.TYPE_MESSAGE
        and fd.message_type is not None
        and _has_free_form(fd.message_type, inner)
        for fd in desc.fields
    )


def _inline_chain(desc: Descriptor, seen: frozenset[str] = frozenset()) -> int:
    """The longest chain of inline message members inside `desc` (inline Structs aside):
    protobuf levels that add no JSON level. A cycle counts as MAX_PROTO_DEPTH (no bound)."""
    longest, inner = 0, seen | {desc.full_name}
    for fd in desc.fields:
        child = fd.message_type
        if child is None or child.full_name in _FREE_FORM:
            continue
        if child.full_name in inner:
            if fd.GetOptions().Extensions[options_pb2.json_inline]:
                return MAX_PROTO_DEPTH
            continue
        below = _inline_chain(child, inner)
        if fd.GetOptions().Extensions[options_pb2.json_inline]:
            below += 1
        longest = max(longest, below)
    return longest


#: The most protobuf levels that one JSON object or array of a client frame opens: a typed
#: object, its chain of inline members, then an inline Struct with a map entry and a Value
#: (a free-form object opens three: Struct, entry, Value; an array two: ListValue, Value).
_LEVELS_PER_BRACKET = 4 + _inline_chain(session_pb2.ClientFrame.DESCRIPTOR)
#: A frame with no more `{` and `[` than this (counted in its strings too) cannot nest
#: deeper than the core reads (ClientFrame and the body add two levels): no need to check.
SHALLOW_BRACKETS = (MAX_PROTO_DEPTH - 3) // _LEVELS_PER_BRACKET


def _shallow(text: str | bytes) -> bool:
    """Whether a frame's text is too flat to nest past MAX_PROTO_DEPTH (a `{` or `[` in
    any encoding json reads holds its byte, so bytes count too)."""
    if isinstance(text, str):
        return text.count("{") + text.count("[") <= SHALLOW_BRACKETS
    return text.count(b"{") + text.count(b"[") <= SHALLOW_BRACKETS


@dataclass(frozen=True)
class _Binding:
    """What the bridge needs of one frame member, computed once at import."""

    field: str
    method: str
    bare_field: str
    deep: bool  # may nest arbitrarily: check the depth before sending


def _bindings(members: dict[str, api.Member]) -> dict[str, _Binding]:
    return {
        key: _Binding(m.field, m.method, m.bare_field, _has_free_form(m.message))
        for key, m in members.items()
    }


_REQUESTS = _bindings(api.CLIENT_REQUESTS)  # by method
_NOTIFICATIONS = _bindings(api.CLIENT_NOTIFICATIONS)  # by method
_ANSWERS = _bindings(api.CLIENT_RESPONSES)  # by method of the server request
_JSON_KINDS = frozenset({api.REQUEST, api.RESPONSE, api.NOTIFICATION})
_FROM_CORE = {  # by ServerFrame member
    name: (m.kind, _Binding(m.field, m.method, m.bare_field, False))
    for name, m in api.SERVER_MEMBERS.items()
}


# ------------------------------------------------------------------ text frames


def _reject_constant(name: str) -> JSON:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads / json.dumps with options build a new decoder / encoder per call.
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# ensure_ascii: every text frame is ASCII, so its length is its size in bytes.
# allow_nan=False: what the gateway sends is strict JSON, or nothing (ValueError).
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: Every digit as "0", every other byte as itself: a run of 19 digits becomes _LONG_DIGITS
#: (bytes.translate and `in` run at memory speed; a regex search took 5 us per turn of a
#: runs.record_turns frame).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


class BatchTooLarge(ValueError):
    """A JSON array of more than MAX_BATCH entries."""


def parse(text: str | bytes) -> JSON:
    """Strict JSON (no NaN/Infinity). Raises ValueError when the frame is not JSON, and
    BatchTooLarge for an array of more than MAX_BATCH entries: that one is read entry by
    entry and given up at the first entry too many, so its size costs nothing."""
    try:
        if not isinstance(text, str):
            text = text.decode(json.detect_encoding(text))  # as json.loads does
        start = 0 if text.startswith("{") else _skip(text, 0)
        if text.startswith("[", start):
            return _parse_array(text, start + 1)
        return _loads(text)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def _loads(text: str) -> JSON:
    """One JSON text, exactly as _decoder reads it, with orjson (about 6x faster) wherever it
    reads the same. It refuses what json reads differently or with its own error (lone
    surrogates, NaN/Infinity, numbers past the float range, nesting past 1,024 levels):
    json then decides, and says why. Integers past 64 bits orjson would read as floats:
    a text with 19 digits in a row (any such integer) goes to json from the start. One
    difference is left: json refuses nesting past Python's recursion limit less the
    caller's stack (about 990 levels) where orjson reads up to 1,024; telling them apart
    would cost every large frame a scan, and such a frame is refused all the same unless
    its deep part is in a member nothing reads (-32602 nested too deeply, not -32700)."""
    try:
        data = text.encode()
    except UnicodeEncodeError:
        return _decoder.decode(text)  # a lone surrogate, which orjson refuses anyway
    if _LONG_DIGITS not in data.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return _decoder.decode(text)


def _skip(text: str, at: int) -> int:
    """The position of the first character at or after `at` that is not whitespace."""
    space = _WHITESPACE.match(text, at)
    assert space is not None  # it matches the empty string
    return space.end()


def _parse_array(text: str, at: int) -> list[JSON]:
    """The top-level array whose `[` ends at `at`, as json.loads reads it, entry by entry."""
    entries: list[JSON] = []
    at = _skip(text, at)
    if not text.startswith("]", at):
        while True:
            if len(entries) == MAX_BATCH:
                raise BatchTooLarge(f"more than {MAX_BATCH} entries")
            entry, at = _decoder.raw_decode(text, at)
            entries.append(entry)
            at = _skip(text, at)
            if text.startswith(",", at):
                at = _skip(text, at + 1)
            elif text.startswith("]", at):
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
    end = _skip(text, at + 1)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return entries


def dumps(obj: JSON) -> str:
    """Strict JSON text, ASCII only; ValueError for NaN or Infinity."""
    return _encoder.encode(obj)


#: The core's notifications that may come as their params' JSON text already
#: (`params_text`, a json_internal field: runs.proto, chats.proto).
_PARAMS_TEXT = frozenset(
    name
    for name, m in api.SERVER_MEMBERS.items()
    if m.kind == api.NOTIFICATION and "params_text" in m.message.fields_by_name
)

#: The core's responses that may come as their result's JSON text already (`result_text`,
#: a json_internal field: tools.proto).
_RESULT_TEXT = frozenset(
    name
    for name, m in api.SERVER_MEMBERS.items()
    if m.kind == api.RESPONSE and "result_text" in m.message.fields_by_name
)

#: Each method name of the core's frames as JSON text.
_METHOD_TEXT = {binding.method: dumps(binding.method) for _, binding in _FROM_CORE.values()}
#: Each of _PARAMS_TEXT's notifications: its text up to the params (a run's 256 turn events
#: a batch take this way: Bridge.from_core).
_TEXT_NOTIFICATION_HEAD = {
    name: f'{{"jsonrpc":"2.0","method":{_METHOD_TEXT[_FROM_CORE[name][1].method]},"params":'
    for name in _PARAMS_TEXT
}


def _describe(value: JSON) -> str:
    """Any parsed JSON as text for a message field (lenient: this never fails)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):
        return "(nested too deeply)"


def valid_id(value: JSON) -> bool:
    """Whether a request id is a string, a finite number or null (PROTOCOL.md §1)."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def error_object(code: int, message: str, data: JSON = None, *, has_data: bool = False) -> JSON:
    """A JSON-RPC error object; `data` only when there is some."""
    error: dict[str, JSON] = {"code": code, "message": message}
    if has_data or data is not None:
        error["data"] = data
    return error


def response(id_: JSON, result: JSON) -> str:
    return dumps({"jsonrpc": "2.0", "id": id_, "result": result})


def _response_text(id_: JSON, result: str) -> str:
    """response(id_, result) for a result already written as JSON text."""
    # An integer id (car-runtime's) is its own JSON text: no trip through the encoder.
    id_text = str(id_) if type(id_) is int else dumps(id_)
    return f'{{"jsonrpc":"2.0","id":{id_text},"result":{result}}}'


def error_response(id_: JSON, error: JSON) -> str:
    return dumps({"jsonrpc": "2.0", "id": id_, "error": error})


def _proto_error_to_json(error: errors_pb2.Error) -> JSON:
    if error.HasField("data"):
        return error_object(
            error.code, error.message, codec.value_to_json(error.data), has_data=True
        )
    return error_object(error.code, error.message)


def _json_error_to_proto(error: JSON) -> errors_pb2.Error:
    """A client's error answer as car.v1.Error, tolerating loose shapes."""
    out = errors_pb2.Error(code=INTERNAL)
    if not isinstance(error, dict):
        out.message = _unicode(_describe(error))
        return out
    code, message = error.get("code"), error.get("message")
    if isinstance(code, int) and not isinstance(code, bool) and -(2**31) <= code < 2**31:
        out.code = code
    out.message = _unicode(message if isinstance(message, str) else _describe(message))
    if "data" in error:
        try:
            codec.json_to_value(error["data"], out.data)
        except (ValueError, RecursionError):
            out.ClearField("data")
    return out


def _unicode(text: str) -> str:
    """`text` as a protobuf string can hold it: a lone surrogate (JSON may escape one, no
    UTF-8 holds it) written as its escape, `\\ud800`."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


def _params_error(e: Exception) -> tuple[str, JSON]:
    """(-32602 message, data) for a failed JSON -> proto conversion."""
    if isinstance(e, RecursionError):  # deeper than Python recurses: far deeper than upb
        return f"invalid params: nested more than {MAX_PROTO_DEPTH} levels deep", None
    if isinstance(e, codec.CodecError):
        if e.path:
            return f"invalid params: {e.reason}: {e.path}", {"field": e.path}
        return f"invalid params: {e.reason}", None
    if isinstance(e, UnicodeError):
        return "invalid params: a string is not valid Unicode", None
    return f"invalid params: {e}", None


def _too_deep(frame: session_pb2.ClientFrame) -> bool:
    """Whether the core could not parse the frame (upb: Exceeded MaxDepth)."""
    try:
        session_pb2.ClientFrame.FromString(frame.SerializeToString())
    except DecodeError:
        return True
    return False


# ------------------------------------------------------------------ decoding a frame


@dataclass
class Message:
    """One JSON-RPC message of a client frame, translated without connection state."""

    #: Answered by the gateway at once (an error), unless `frame` is set.
    reply: str | None = None
    #: For the core; serialized (bytes) when decoded in another process.
    frame: session_pb2.ClientFrame | bytes | None = None
    #: The client's id of a request or notification.
    client_id: JSON = None
    #: The client sent an id: the core's answer (or, for a notification, null) goes back.
    answered: bool = False
    #: A notification: forwarded without a gateway id.
    notice: bool = False
    #: The cb-N of the server request this frame answers.
    answer_to: str = ""
    #: The gateway id of a request, when decode was given ids to use (else admit picks).
    gid: str = ""


@dataclass
class Decoded:
    """A client frame, decoded: its messages, or one error for the whole frame."""

    messages: list[Message] = field(default_factory=list)
    #: The frame was a JSON array: answered as one array.
    batch: bool = False
    #: The answer to a frame refused whole (not JSON, an empty or too long batch).
    error: str | None = None


def decode(text: str | bytes, callbacks: Mapping[str, str], first_id: int | None = None) -> Decoded:
    """Parse one text frame and translate every message in it. `callbacks` maps the ids of
    the server's open requests to their methods (to read the client's answers). With
    `first_id`, requests get their gateway ids here, from it upwards (Bridge.reserve_ids),
    so that a frame decoded elsewhere comes back complete. Pure: it reads and changes
    nothing else, so it can run off the event loop."""
    try:
        message = parse(text)
    except ValueError as e:
        return _unparsed(e)
    return _decode_parsed(message, text, callbacks, first_id)


def _unparsed(e: ValueError) -> Decoded:
    """The answer to a frame that is not JSON (parse's error `e`)."""
    if isinstance(e, BatchTooLarge):
        return Decoded(error=_invalid(f"batch of more than {MAX_BATCH} entries"))
    return Decoded(error=error_response(None, error_object(PARSE_ERROR, f"parse error: {e}")))


def _decode_parsed(
    message: JSON, text: str | bytes, callbacks: Mapping[str, str], first_id: int | None
) -> Decoded:
    """decode() of the frame `text`, parsed into `message`."""
    if not isinstance(message, list):
        # A runs.record_turns is checked for depth unless its turns are read flat
        # (turn_text.read_turns): no need to count its brackets (two passes over the frame).
        turns = type(message) is dict and message.get("method") == _RECORD_TURNS_METHOD
        decoded = Decoded([_message(message, callbacks, not turns and _shallow(text))])
    elif not message:
        return Decoded(error=_invalid("empty batch"))
    else:
        shallow = _shallow(text)
        decoded = Decoded([_message(m, callbacks, shallow) for m in message], batch=True)
    if first_id is not None:
        gids = (str(n) for n in itertools.count(first_id))
        for m in decoded.messages:
            if isinstance(m.frame, session_pb2.ClientFrame) and not (m.notice or m.answer_to):
                m.gid = m.frame.id = next(gids)
    return decoded


def _message(message: JSON, callbacks: Mapping[str, str], shallow: bool) -> Message:
    """Translate one request, notification or answer (`shallow`: see _shallow)."""
    if not isinstance(message, dict):
        return Message(reply=_invalid("expected a JSON-RPC object"))
    method = message.get("method")
    if method is None:
        if "id" in message and ("result" in message or "error" in message):
            return _answer(message, callbacks, shallow)
        return Message(reply=_invalid("expected a method, or an answer with result or error"))
    if not isinstance(method, str):
        return Message(reply=_invalid("method must be a string"))
    is_request = "id" in message
    client_id = message.get("id")
    if not valid_id(client_id):
        return Message(reply=_invalid("id must be a string, a finite number or null"))
    binding = _REQUESTS.get(method)
    notice = binding is None and method in _NOTIFICATIONS
    if notice:
        binding = _NOTIFICATIONS[method]
    if binding is None:
        if not is_request:
            return Message()  # notifications are never answered, not even with an error
        error = error_object(METHOD_NOT_FOUND, f"unknown method: {method}")
        return Message(reply=error_response(client_id, error))
    frame = session_pb2.ClientFrame()
    body = getattr(frame, binding.field)
    body.SetInParent()
    params = message.get("params")
    turns = turn_text.NOT_READ
    try:
        # A chat event (a token: the hot path) is read with its JSON text for the host's
        # notification in one pass where it can be (chat_text.py), and so are a batch of
        # run turns and their texts (turn_text.py); else the codec reads them.
        if binding.field == _RECORD_TURNS:
            turns = turn_text.read_turns(params, body)
        if turns == turn_text.NOT_READ and not (
            binding.field == _CHAT_EVENT and shallow and chat_text.read_event(params, body)
        ):
            codec.params_to_message(params, body, binding.bare_field)
    except (ValueError, TypeError, RecursionError) as e:
        msg, data = _params_error(e)
        if not isinstance(e, RecursionError):  # too deep: the error _too_deep gives too
            msg = api.params_usage(body.DESCRIPTOR) or msg  # e.g. runs.record_turns
        return _refuse(is_request, client_id, error_object(INVALID_PARAMS, msg, data))
    deep = binding.deep and not shallow and turns != turn_text.READ_FLAT
    if deep and _too_deep(frame):
        msg = f"invalid params: nested more than {MAX_PROTO_DEPTH} levels deep"
        return _refuse(is_request, client_id, error_object(INVALID_PARAMS, msg))
    if binding.field == _RECORD_TURNS and turns == turn_text.NOT_READ:
        _add_turn_texts(params, body)
    return Message(frame=frame, client_id=client_id, answered=is_request, notice=notice)


_RECORD_TURNS = "runs_record_turns"
_RECORD_TURNS_METHOD = api.CLIENT_MEMBERS[_RECORD_TURNS].method
_CHAT_EVENT = "agent_chat_event"
_CHAT_EVENT_METHOD = api.CLIENT_MEMBERS[_CHAT_EVENT].method
_TOOLS_EXECUTE = "tools_execute"


def _add_turn_texts(params: JSON, request: Any) -> None:
    """Each turn's JSON as the wire writes it, for its runs.trace.event (turn_text.py)."""
    turns = params.get("turns") if isinstance(params, dict) else None
    if isinstance(turns, list) and len(turns) == len(request.turns):
        request.turn_texts.extend(turn_text.turn_texts(turns))


def _refuse(is_request: bool, client_id: JSON, error: JSON) -> Message:
    return Message(reply=error_response(client_id, error) if is_request else None)


def _answer(message: dict[str, JSON], callbacks: Mapping[str, str], shallow: bool) -> Message:
    """The client's answer to a server-initiated request."""
    cb = message["id"]
    method = callbacks.get(cb) if isinstance(cb, str) else None
    if method is None:
        return Message()  # unknown, late or duplicate: the core would ignore it too
    binding = _ANSWERS[method]
    frame = session_pb2.ClientFrame(id=cb)
    if "error" in message:
        frame.error.CopyFrom(_json_error_to_proto(message["error"]))
        if frame.error.HasField("data") and not shallow and _too_deep(frame):
            frame.error.ClearField("data")  # the core could not read the frame at all
    else:
        body = getattr(frame, binding.field)
        body.SetInParent()
        try:
            codec.params_to_message(message["result"], body, binding.bare_field)
            if binding.deep and not shallow and _too_deep(frame):
                raise ValueError(f"nested more than {MAX_PROTO_DEPTH} levels deep")
            if binding.field == _TOOLS_EXECUTE:
                # A tool's output goes with its text where it has one (proposal_text.py):
                # the core reads that and writes it into the proposal's result as it is.
                body.output_text = proposal_text.output_text(message["result"])
        except (ValueError, TypeError, RecursionError) as e:
            # Fail the core's call at once rather than let it wait for its timeout.
            reason = _params_error(e)[0].removeprefix("invalid params: ")
            frame = session_pb2.ClientFrame(id=cb)
            frame.error.code = INVALID_PARAMS
            frame.error.message = f"invalid answer to {binding.method}: {reason}"
    return Message(frame=frame, answer_to=cb)


def _with_id(frame: session_pb2.ClientFrame | bytes, gid: str) -> session_pb2.ClientFrame | bytes:
    if isinstance(frame, bytes):
        # A serialized frame without an id: the id's field appended reads as set.
        return session_pb2.ClientFrame(id=gid).SerializeToString() + frame
    frame.id = gid
    return frame


# ------------------------------------------------------------------ the bridge


@dataclass
class Inbound:
    """What one client text frame produced."""

    #: Frames for the core, in order.
    frames: list[session_pb2.ClientFrame] = field(default_factory=list)
    #: Frames for the core already serialized (decoded off the loop), in order; a frame
    #: gives `frames` or `wire`, never both.
    wire: list[bytes] = field(default_factory=list)
    #: Text frames the gateway answers itself, at once (errors, complete batches).
    replies: list[str] = field(default_factory=list)

    def add(self, frame: session_pb2.ClientFrame | bytes) -> None:
        if isinstance(frame, bytes):
            self.wire.append(frame)
        else:
            self.frames.append(frame)


class _Batch:
    """A JSON array of requests: answered as one array once every request is answered."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.open = 0

    def text(self) -> str:
        return "[" + ",".join(self.entries) + "]"


class _NoReply:
    """The client id of a request sent as a notification: its answer is dropped."""


_NO_REPLY = _NoReply()


@dataclass
class _Pending:
    client_id: JSON
    batch: _Batch | None


class Bridge:
    """The JSON-RPC state of one connection: pending requests and open server calls."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        #: cb-N -> the method of the server's request (its answer is read accordingly).
        self._callbacks: dict[str, str] = {}
        #: Set once the core refused the session (-32001): the connection must close.
        self.auth_refused = False
        #: Set by the first response from the core: the core answers nothing but an
        #: error before the session is authenticated.
        self.authenticated = False

    # -------------------------------------------------------------- client -> core

    def reserve_ids(self, n: int) -> int:
        """Set `n` gateway ids aside for `decode`; returns the first."""
        first = next(self._ids)
        self._ids = itertools.count(first + n)
        return first

    @property
    def callbacks(self) -> Mapping[str, str]:
        """The server's open requests (cb-N -> method), as `decode` needs them."""
        return self._callbacks

    def from_client(self, text: str | bytes) -> Inbound:
        """Translate one text frame from the client."""
        try:
            message = parse(text)
        except ValueError as e:
            return self.admit(_unparsed(e))
        # An agent's chat token (the hot path): its frame for the core written at once
        # (chat_text.event_frame), no message to build, nothing to remember.
        if (
            type(message) is dict
            and message.get("method") == _CHAT_EVENT_METHOD
            and "id" not in message
            and (frame := chat_text.event_frame(message.get("params"))) is not None
        ):
            return Inbound(wire=[frame])
        return self.admit(_decode_parsed(message, text, self._callbacks, None))

    def admit(self, decoded: Decoded) -> Inbound:
        """Take a decoded frame in: requests get their gateway ids and are remembered,
        answers settle the server's requests, batches are assembled."""
        inbound = Inbound()
        if decoded.error is not None:
            inbound.replies.append(decoded.error)
            return inbound
        batch = _Batch() if decoded.batch else None
        for message in decoded.messages:
            reply = self._admit(message, inbound, batch)
            if reply is None:
                continue
            if batch is None:
                inbound.replies.append(reply)
            else:
                batch.entries.append(reply)
        if batch is not None and batch.open == 0 and batch.entries:
            inbound.replies.append(batch.text())
        return inbound

    def _admit(self, message: Message, inbound: Inbound, batch: _Batch | None) -> str | None:
        """Take one message in; returns its immediate reply."""
        frame = message.frame
        if frame is None:
            return message.reply
        if message.answer_to:
            if self._callbacks.pop(message.answer_to, None) is not None:
                inbound.add(frame)  # else a duplicate: already answered
            return None
        if message.notice:
            inbound.add(frame)
            # A notification method called with an id still gets its (empty) answer.
            return response(message.client_id, None) if message.answered else None
        if message.gid:
            gid = message.gid
        else:
            gid = str(next(self._ids))
            frame = _with_id(frame, gid)
        inbound.add(frame)
        if message.answered:
            self._pending[gid] = _Pending(message.client_id, batch)
            if batch is not None:
                batch.open += 1
        else:  # the core answers every request; this answer is dropped
            self._pending[gid] = _Pending(_NO_REPLY, None)
        return None

    # -------------------------------------------------------------- core -> client

    def from_core(self, frame: session_pb2.ServerFrame) -> str | None:
        """Translate one frame from the core; None when nothing goes to the client. The
        text is written straight from the message (codec.result_to_text): the same text
        as dumps() of the JSON-RPC object with codec.message_to_result's payload."""
        member = frame.WhichOneof("body")
        # A notification the core wrote as its params' text (an empty text is none: the
        # event is then written from its fields below). Read once: each read of a string
        # field makes a new str.
        if (head := _TEXT_NOTIFICATION_HEAD.get(member or "")) is not None and (
            given := getattr(frame, member or "").params_text
        ):
            return f"{head}{given}}}"
        if member == "error":
            if frame.error.code == AUTH_REQUIRED:
                self.auth_refused = True
            error = _proto_error_to_json(frame.error)
            return self._settle(frame.id, lambda client_id: error_response(client_id, error))
        if member is None:
            return None
        kind, binding = _FROM_CORE[member]
        if kind not in _JSON_KINDS:
            return None  # not JSON-RPC (binary members travel as binary frames)
        body = getattr(frame, member)
        if kind == api.RESPONSE:
            self.authenticated = True
            if member in _RESULT_TEXT and (given := body.result_text):
                # The result the core wrote as its text (a proposal's: proposal_text.py).
                return self._settle(frame.id, lambda client_id: _response_text(client_id, given))
            return self._settle(
                frame.id,
                lambda client_id: _response_text(
                    client_id, codec.result_to_text(body, binding.bare_field)
                ),
            )
        try:
            params = codec.result_to_text(body, binding.bare_field)
        except ValueError as e:
            log.error("gateway: dropped %s from the core: not strict JSON: %s", binding.method, e)
            return None
        method = _METHOD_TEXT[binding.method]
        if kind == api.REQUEST:
            self._remember_callback(frame.id, binding.method)
            return f'{{"jsonrpc":"2.0","id":{dumps(frame.id)},"method":{method},"params":{params}}}'
        return f'{{"jsonrpc":"2.0","method":{method},"params":{params}}}'

    def _settle(self, gid: str, render: Callable[[JSON], str]) -> str | None:
        """The answer to request `gid` (`render` writes it for the client's id), in its
        batch when it was part of one."""
        pending = self._pending.pop(gid, None)
        if pending is None or pending.client_id is _NO_REPLY:
            return None
        try:
            text = render(pending.client_id)
        except ValueError as e:
            # Not strict JSON (NaN, Infinity): never sent. codec renders the core's
            # non-finite numbers as null, so this is a bug, but the client still gets its
            # answer.
            log.error("gateway: an answer from the core is not strict JSON: %s", e)
            error = error_object(INTERNAL, "internal error: the answer is not valid JSON")
            text = error_response(pending.client_id, error)
        batch = pending.batch
        if batch is None:
            return text
        batch.entries.append(text)
        batch.open -= 1
        return batch.text() if batch.open == 0 else None

    def _remember_callback(self, cb: str, method: str) -> None:
        if len(self._callbacks) >= MAX_OPEN_CALLBACKS:
            del self._callbacks[next(iter(self._callbacks))]
        self._callbacks[cb] = method

    def abandon(self, message: str) -> Iterator[str]:
        """Answer every request still open with -32603 `message` (the core went away)."""
        error = error_object(INTERNAL, message)
        for gid in list(self._pending):
            text = self._settle(gid, lambda client_id: error_response(client_id, error))
            if text is not None:
                yield text
        self._callbacks.clear()

    @property
    def open_requests(self) -> int:
        return len(self._pending)


def _invalid(reason: str) -> str:
    return error_response(None, error_object(INVALID_REQUEST, f"invalid request: {reason}"))
