"""JSON-RPC 2.0 over the session stream, free of I/O (docs/protocol.md §1).

`Bridge` holds the JSON-RPC state of one WebSocket connection. `from_client` turns a text
frame into ClientFrames for the core plus the errors the gateway answers itself;
`from_core` turns a ServerFrame into the text frame for the client. The method table and
the JSON<->proto mapping come from the descriptors (car_grpc.wire.api, car_grpc.wire.codec): nothing
here names a method.

Correlation: every request the client sends goes to the core under a gateway-side id, so
client ids of any JSON type (car-runtime uses integers) and duplicate ids are harmless;
the answer carries the client's original id back. Server-initiated requests keep their
`cb-N` id, and the bridge remembers which ClientFrame member answers each one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from car_grpc.v1 import errors_pb2, session_pb2
from car_grpc.wire import api, codec
from car_grpc.wire.errors import (
    AUTH_REQUIRED,
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)

JSON = Any

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
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def parse(text: str | bytes) -> JSON:
    """Strict JSON (no NaN/Infinity). Raises ValueError when the frame is not JSON."""
    try:
        if not isinstance(text, str):
            text = text.decode(json.detect_encoding(text))  # as json.loads does
        return _decoder.decode(text)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def dumps(obj: JSON) -> str:
    return _encoder.encode(obj)


def error_object(code: int, message: str, data: JSON = None, *, has_data: bool = False) -> JSON:
    """A JSON-RPC error object; `data` only when there is some."""
    error: dict[str, JSON] = {"code": code, "message": message}
    if has_data or data is not None:
        error["data"] = data
    return error


def response(id_: JSON, result: JSON) -> str:
    return dumps({"jsonrpc": "2.0", "id": id_, "result": result})


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
        out.message = dumps(error)
        return out
    code, message = error.get("code"), error.get("message")
    if isinstance(code, int) and not isinstance(code, bool) and -(2**31) <= code < 2**31:
        out.code = code
    out.message = message if isinstance(message, str) else dumps(message)
    if "data" in error:
        try:
            codec.json_to_value(error["data"], out.data)
        except ValueError:
            out.ClearField("data")
    return out


def _params_error(e: Exception) -> tuple[str, JSON]:
    """(-32602 message, data) for a failed JSON -> proto conversion."""
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


# ------------------------------------------------------------------ the bridge


@dataclass
class Inbound:
    """What one client text frame produced."""

    #: Frames for the core, in order.
    frames: list[session_pb2.ClientFrame] = field(default_factory=list)
    #: Text frames the gateway answers itself, at once (errors, complete batches).
    replies: list[str] = field(default_factory=list)


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
        #: cb-N -> the ClientFrame member that answers it.
        self._callbacks: dict[str, _Binding] = {}
        #: Set once the core refused the session (-32001): the connection must close.
        self.auth_refused = False
        #: Set by the first response from the core: the core answers nothing but an
        #: error before the session is authenticated.
        self.authenticated = False

    # -------------------------------------------------------------- client -> core

    def from_client(self, text: str | bytes) -> Inbound:
        """Translate one text frame from the client."""
        inbound = Inbound()
        try:
            message = parse(text)
        except ValueError as e:
            error = error_object(PARSE_ERROR, f"parse error: {e}")
            inbound.replies.append(error_response(None, error))
            return inbound
        if isinstance(message, list):
            self._batch(message, inbound)
        else:
            reply = self._one(message, inbound, None)
            if reply is not None:
                inbound.replies.append(reply)
        return inbound

    def _batch(self, messages: list[JSON], inbound: Inbound) -> None:
        if not messages:
            inbound.replies.append(
                error_response(None, error_object(INVALID_REQUEST, "invalid request: empty batch"))
            )
            return
        batch = _Batch()
        for message in messages:
            reply = self._one(message, inbound, batch)
            if reply is not None:
                batch.entries.append(reply)
        if batch.open == 0 and batch.entries:
            inbound.replies.append(batch.text())

    def _one(self, message: JSON, inbound: Inbound, batch: _Batch | None) -> str | None:
        """Handle one request, notification or answer; returns an immediate reply."""
        if not isinstance(message, dict):
            return _invalid("expected a JSON-RPC object")
        method = message.get("method")
        if method is None:
            if "id" in message and ("result" in message or "error" in message):
                self._answer(message, inbound)
                return None
            return _invalid("expected a method, or an answer with result or error")
        if not isinstance(method, str):
            return _invalid("method must be a string")
        is_request = "id" in message
        client_id = message.get("id") if is_request else _NO_REPLY
        binding = _REQUESTS.get(method)
        notice = binding is None and method in _NOTIFICATIONS
        if notice:
            binding = _NOTIFICATIONS[method]
        if binding is None:
            if not is_request:
                return None  # notifications are never answered, not even with an error
            return error_response(
                client_id, error_object(METHOD_NOT_FOUND, f"unknown method: {method}")
            )
        frame = session_pb2.ClientFrame()
        body = getattr(frame, binding.field)
        body.SetInParent()
        try:
            codec.params_to_message(message.get("params"), body, binding.bare_field)
        except (ValueError, TypeError, RecursionError) as e:
            msg, data = _params_error(e)
            msg = api.params_usage(body.DESCRIPTOR) or msg  # e.g. runs.record_turns
            return self._refuse(is_request, client_id, error_object(INVALID_PARAMS, msg, data))
        if binding.deep and _too_deep(frame):
            msg = f"invalid params: nested more than {MAX_PROTO_DEPTH} levels deep"
            return self._refuse(is_request, client_id, error_object(INVALID_PARAMS, msg))
        inbound.frames.append(frame)
        if notice:
            # A notification method called with an id still gets its (empty) answer.
            return response(client_id, None) if is_request else None
        frame.id = gid = str(next(self._ids))
        self._pending[gid] = _Pending(client_id, batch if is_request else None)
        if is_request and batch is not None:
            batch.open += 1
        return None

    @staticmethod
    def _refuse(is_request: bool, client_id: JSON, error: JSON) -> str | None:
        return error_response(client_id, error) if is_request else None

    def _answer(self, message: dict[str, JSON], inbound: Inbound) -> None:
        """The client's answer to a server-initiated request."""
        cb = message["id"]
        binding = self._callbacks.pop(cb, None) if isinstance(cb, str) else None
        if binding is None:
            return  # unknown, late or duplicate: the core would ignore it too
        frame = session_pb2.ClientFrame(id=cb)
        if "error" in message:
            frame.error.CopyFrom(_json_error_to_proto(message["error"]))
        else:
            body = getattr(frame, binding.field)
            body.SetInParent()
            try:
                codec.params_to_message(message["result"], body, binding.bare_field)
                if binding.deep and _too_deep(frame):
                    raise ValueError(f"nested more than {MAX_PROTO_DEPTH} levels deep")
            except (ValueError, TypeError, RecursionError) as e:
                # Fail the core's call at once rather than let it wait for its timeout.
                reason = _params_error(e)[0].removeprefix("invalid params: ")
                frame = session_pb2.ClientFrame(id=cb)
                frame.error.code = INVALID_PARAMS
                frame.error.message = f"invalid answer to {binding.method}: {reason}"
        inbound.frames.append(frame)

    # -------------------------------------------------------------- core -> client

    def from_core(self, frame: session_pb2.ServerFrame) -> str | None:
        """Translate one frame from the core; None when nothing goes to the client."""
        member = frame.WhichOneof("body")
        if member == "error":
            if frame.error.code == AUTH_REQUIRED:
                self.auth_refused = True
            return self._settle(frame.id, error_response, _proto_error_to_json(frame.error))
        if member is None:
            return None
        kind, binding = _FROM_CORE[member]
        if kind not in _JSON_KINDS:
            return None  # not JSON-RPC (binary members travel as binary frames)
        payload = codec.message_to_result(getattr(frame, member), binding.bare_field)
        if kind == api.RESPONSE:
            self.authenticated = True
            return self._settle(frame.id, response, payload)
        if kind == api.REQUEST:
            self._remember_callback(frame.id, binding.method)
            return dumps(
                {"jsonrpc": "2.0", "id": frame.id, "method": binding.method, "params": payload}
            )
        return dumps({"jsonrpc": "2.0", "method": binding.method, "params": payload})

    def _settle(self, gid: str, render: Callable[[JSON, JSON], str], payload: JSON) -> str | None:
        pending = self._pending.pop(gid, None)
        if pending is None or pending.client_id is _NO_REPLY:
            return None
        text = render(pending.client_id, payload)
        batch = pending.batch
        if batch is None:
            return text
        batch.entries.append(text)
        batch.open -= 1
        return batch.text() if batch.open == 0 else None

    def _remember_callback(self, cb: str, method: str) -> None:
        if len(self._callbacks) >= MAX_OPEN_CALLBACKS:
            del self._callbacks[next(iter(self._callbacks))]
        self._callbacks[cb] = _ANSWERS[method]

    def abandon(self, message: str) -> Iterator[str]:
        """Answer every request still open with -32603 `message` (the core went away)."""
        error = error_object(INTERNAL, message)
        for gid in list(self._pending):
            text = self._settle(gid, error_response, error)
            if text is not None:
                yield text
        self._callbacks.clear()

    @property
    def open_requests(self) -> int:
        return len(self._pending)


def _invalid(reason: str) -> str:
    return error_response(None, error_object(INVALID_REQUEST, f"invalid request: {reason}"))
