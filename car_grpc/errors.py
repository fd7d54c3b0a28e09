"""The one error model: JSON-RPC codes and their gRPC status twins, read from errors.proto.

Handlers raise `CarError`; the session stream turns it into `ServerFrame.error`, the typed
RPCs into a gRPC status (with the exact Error in the `car-error-bin` trailer), and the
gateway into a JSON-RPC error object. The code table itself lives in the proto.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2

from car_grpc.v1 import errors_pb2

ErrorCode = errors_pb2.ErrorCode

# Trailing-metadata key of the serialized car.v1.Error on failed typed RPCs.
ERROR_TRAILER = "car-error-bin"


@dataclass(frozen=True)
class _Twin:
    json_rpc_code: int
    grpc_status: grpc.StatusCode


def _load_twins() -> dict[int, _Twin]:
    twins: dict[int, _Twin] = {}
    for value in errors_pb2.DESCRIPTOR.enum_types_by_name["ErrorCode"].values:
        if value.number == 0:
            continue
        opts = value.GetOptions()
        code = opts.Extensions[errors_pb2.json_rpc_code]
        status = getattr(grpc.StatusCode, opts.Extensions[errors_pb2.grpc_status])
        twins[value.number] = _Twin(code, status)
    return twins


_TWINS = _load_twins()
_STATUS_BY_JSON_CODE = {t.json_rpc_code: t.grpc_status for t in _TWINS.values()}

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
    return _STATUS_BY_JSON_CODE.get(json_rpc_code, grpc.StatusCode.UNKNOWN)


class CarError(Exception):
    """A failure with a JSON-RPC code, raised by handlers and shown to the client as is."""

    def __init__(self, code: int, message: str, data: struct_pb2.Value | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_proto(self) -> errors_pb2.Error:
        error = errors_pb2.Error(code=self.code, message=self.message)
        if self.data is not None:
            error.data.CopyFrom(self.data)
        return error

    @classmethod
    def from_proto(cls, error: errors_pb2.Error) -> CarError:
        return cls(error.code, error.message, error.data if error.HasField("data") else None)


def invalid_params(message: str) -> CarError:
    return CarError(INVALID_PARAMS, message)


def internal(message: str) -> CarError:
    return CarError(INTERNAL, message)
