"""The one error model: JSON-RPC codes and their gRPC status twins, read from errors.proto.

Handlers raise `CarError`; the session stream turns it into `ServerFrame.error`, the typed
RPCs into a gRPC status (with the exact Error in the `car-error-bin` trailer and a standard
`google.rpc.Status` with an `ErrorInfo` in `grpc-status-details-bin`), and the gateway
into a JSON-RPC error object. The code table itself lives in the proto.

A JSON-RPC code is coarse where car-runtime expects it to be (a refused approval and a
crashed handler are both -32603), so an error may name a finer gRPC status and a stable
reason of its own: `permission_denied`, `not_found`, `failed_precondition` below. The
JSON-RPC code never changes for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from car_grpc.v1 import errors_pb2

ErrorCode = errors_pb2.ErrorCode

# Trailing-metadata key of the serialized car.v1.Error on failed typed RPCs.
ERROR_TRAILER = "car-error-bin"
# The `domain` of every ErrorInfo this server attaches.
ERROR_DOMAIN = "car.v1"
# Trailing-metadata key of the standard google.rpc.Status (grpcio-status writes it).
_STATUS_DETAILS = "grpc-status-details-bin"


@dataclass(frozen=True)
class _Twin:
    error_code: errors_pb2.ErrorCode.ValueType
    json_rpc_code: int
    grpc_status: grpc.StatusCode
    reason: str  # the ErrorCode name without its prefix, e.g. "INVALID_PARAMS"


#: How a session that did not authenticate in time is ended: the gateway's close reason
#: (1008) and the core's UNAUTHENTICATED details say the same, so that a gateway whose
#: stream the core ended for it closes its client 1008 too (`auth_timeout`).
AUTH_TIMEOUT = "auth timeout: not authenticated within "


def auth_timeout(seconds: float) -> str:
    return f"{AUTH_TIMEOUT}{seconds:g}s"


def _load_twins() -> dict[int, _Twin]:
    twins: dict[int, _Twin] = {}
    for value in errors_pb2.DESCRIPTOR.enum_types_by_name["ErrorCode"].values:
        if value.number == 0:
            continue
        opts = value.GetOptions()
        code = opts.Extensions[errors_pb2.json_rpc_code]
        status = getattr(grpc.StatusCode, opts.Extensions[errors_pb2.grpc_status])
        reason = value.name.removeprefix("ERROR_CODE_")
        twins[value.number] = _Twin(ErrorCode.Value(value.name), code, status, reason)
    return twins


_TWINS = _load_twins()
_TWIN_BY_JSON_CODE = {t.json_rpc_code: t for t in _TWINS.values()}

PARSE_ERROR = _TWINS[ErrorCode.ERROR_CODE_PARSE_ERROR].json_rpc_code
INVALID_REQUEST = _TWINS[ErrorCode.ERROR_CODE_INVALID_REQUEST].json_rpc_code
METHOD_NOT_FOUND = _TWINS[ErrorCode.ERROR_CODE_METHOD_NOT_FOUND].json_rpc_code
INVALID_PARAMS = _TWINS[ErrorCode.ERROR_CODE_INVALID_PARAMS].json_rpc_code
INTERNAL = _TWINS[ErrorCode.ERROR_CODE_INTERNAL].json_rpc_code
AUTH_REQUIRED = _TWINS[ErrorCode.ERROR_CODE_AUTH_REQUIRED].json_rpc_code
APPROVAL_DENIED = _TWINS[ErrorCode.ERROR_CODE_APPROVAL_DENIED].json_rpc_code
DEADLINE_EXCEEDED = _TWINS[ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED].json_rpc_code
HANDSHAKE_REQUIRED = _TWINS[ErrorCode.ERROR_CODE_HANDSHAKE_REQUIRED].json_rpc_code
PROTOCOL_VERSION_MISMATCH = _TWINS[ErrorCode.ERROR_CODE_PROTOCOL_VERSION_MISMATCH].json_rpc_code
CAPABILITY_MISMATCH = _TWINS[ErrorCode.ERROR_CODE_CAPABILITY_MISMATCH].json_rpc_code


def grpc_status_for(json_rpc_code: int) -> grpc.StatusCode:
    """The gRPC status twin of a JSON-RPC code (UNKNOWN for codes outside §8)."""
    twin = _TWIN_BY_JSON_CODE.get(json_rpc_code)
    return twin.grpc_status if twin else grpc.StatusCode.UNKNOWN


class CarError(Exception):
    """A failure with a JSON-RPC code, raised by handlers and shown to the client as is.

    `status` and `reason` refine what a typed RPC reports (default: the code's twin and
    its ErrorCode name). `client_error` is False only for failures of the server itself
    (worth a traceback in the log); everything a client's request can cause is True.
    `answer`, when set, is what the session stream (the JSON-RPC wire) answers instead of
    an error, where the CAR protocol answers a refusal with a result (`runs.get_trace`:
    `{run_id, not_found: true}`); typed RPCs still fail with the status.
    """

    def __init__(
        self,
        code: int,
        message: str,
        data: struct_pb2.Value | None = None,
        *,
        status: grpc.StatusCode | None = None,
        reason: str = "",
        client_error: bool = True,
        answer: Message | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        twin = _TWIN_BY_JSON_CODE.get(code)
        self.status = status or (twin.grpc_status if twin else grpc.StatusCode.UNKNOWN)
        self.reason = reason or (twin.reason if twin else "CLIENT_ERROR")
        self.client_error = client_error
        self.answer = answer

    def to_proto(self) -> errors_pb2.Error:
        error = errors_pb2.Error(code=self.code, message=self.message)
        twin = _TWIN_BY_JSON_CODE.get(self.code)
        if twin is not None:
            error.error_code = twin.error_code
        if self.data is not None:
            error.data.CopyFrom(self.data)
        return error

    @classmethod
    def from_proto(cls, error: errors_pb2.Error) -> CarError:
        return cls(error.code, error.message, error.data if error.HasField("data") else None)

    @classmethod
    def of_call(cls, e: grpc.aio.AioRpcError) -> CarError | None:
        """The error a car-grpc core ended the call `e` with (`trailers`, below): its code,
        message and data, with the gRPC status and reason it was sent with; None when the
        call carried none (it failed on the way, or another server answered), or one that
        does not parse (so the caller's own error for the call stands)."""
        error: errors_pb2.Error | None = None
        reason = ""
        try:
            for key, value in e.trailing_metadata() or ():
                if not isinstance(value, bytes):
                    continue
                if key == ERROR_TRAILER:
                    error = errors_pb2.Error.FromString(value)
                elif key == _STATUS_DETAILS:
                    for detail in status_pb2.Status.FromString(value).details:
                        info = error_details_pb2.ErrorInfo()
                        if detail.Unpack(info):
                            reason = info.reason
        except DecodeError:
            return None
        if error is None:
            return None
        data = error.data if error.HasField("data") else None
        return cls(error.code, error.message, data, status=e.code(), reason=reason)

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """End the gRPC call `context` serves with this error: its status, message and
        trailers (below)."""
        context.set_trailing_metadata(self.trailers())
        await context.abort(self.status, self.message)

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailing metadata of a typed RPC failing with this error: the exact Error
        (`car-error-bin`) and the standard google.rpc.Status (what grpcio-status clients
        read with `rpc_status.from_call`, Go with `status.Convert(err).Details()`), whose
        details are an ErrorInfo (`reason`, the domain and the JSON-RPC code) and the same
        car.v1.Error (with its ErrorCode)."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata={"json_rpc_code": str(self.code)}
        )
        error = self.to_proto()
        details = [any_pb2.Any(), any_pb2.Any()]
        details[0].Pack(info)
        details[1].Pack(error)
        rich = status_pb2.Status(code=self.status.value[0], message=self.message, details=details)
        standard = rpc_status.to_status(rich).trailing_metadata
        return ((ERROR_TRAILER, error.SerializeToString()), *standard)


def invalid_params(message: str) -> CarError:
    return CarError(INVALID_PARAMS, message)


def internal(message: str) -> CarError:
    return CarError(INTERNAL, message)


def permission_denied(message: str, code: int = INTERNAL) -> CarError:
    """`code` on the wire (-32603 unless the protocol fixes another: what car-runtime
    expects), PERMISSION_DENIED on typed RPCs."""
    return CarError(
        code, message, status=grpc.StatusCode.PERMISSION_DENIED, reason="PERMISSION_DENIED"
    )


def not_found(code: int, message: str, *, answer: Message | None = None) -> CarError:
    """Something the caller named does not exist (or is not the caller's to see): `code`
    (or `answer`) on the wire, NOT_FOUND on typed RPCs."""
    return CarError(
        code, message, status=grpc.StatusCode.NOT_FOUND, reason="NOT_FOUND", answer=answer
    )


def already_exists(message: str) -> CarError:
    """-32602, ALREADY_EXISTS on typed RPCs: the thing to create is taken (a provider
    another voice engine serves)."""
    return CarError(
        INVALID_PARAMS, message, status=grpc.StatusCode.ALREADY_EXISTS, reason="ALREADY_EXISTS"
    )


def resource_exhausted(message: str) -> CarError:
    """-32603, RESOURCE_EXHAUSTED on typed RPCs: a peer fell too far behind (a voice
    engine that stopped reading)."""
    return CarError(
        INTERNAL, message, status=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="RESOURCE_EXHAUSTED"
    )


def unavailable(message: str) -> CarError:
    """-32603, UNAVAILABLE on typed RPCs: something the server depends on (its store) cannot
    be reached right now; the same request may succeed later."""
    return CarError(
        INTERNAL,
        message,
        status=grpc.StatusCode.UNAVAILABLE,
        reason="UNAVAILABLE",
        client_error=False,
    )


def failed_precondition(code: int, message: str) -> CarError:
    """The request is well formed but the thing it acts on is in the wrong state (a run
    that has ended, an approval already resolved): FAILED_PRECONDITION on typed RPCs."""
    return CarError(
        code, message, status=grpc.StatusCode.FAILED_PRECONDITION, reason="FAILED_PRECONDITION"
    )


def field_error(name: str, reason: str = "missing field") -> CarError:
    """-32602 naming the field, e.g. `invalid params: missing field: name`."""
    return invalid_params(f"invalid params: {reason}: {name}")


def require(value: str, name: str) -> str:
    """The value of a required string field, or -32602 naming it."""
    if not value:
        raise field_error(name)
    return value
