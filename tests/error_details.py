"""Reading the standard rich error of a failed typed RPC, as a grpcio-status client does."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from car_grpc.v1 import errors_pb2
from car_grpc.wire.errors import ERROR_DOMAIN, grpc_status_for

#: Statuses finer than a JSON-RPC code's twin, each named by its ErrorInfo reason.
REFINED = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def error_info(e: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of the google.rpc.Status in a failed call's trailers."""
    status = rpc_status.from_call(e)
    assert status is not None, f"no google.rpc.Status on {e}"
    assert status.code == e.code().value[0] and status.message == e.details()
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, status
    return infos[0]


def assert_rich_status(e: grpc.aio.AioRpcError, error: errors_pb2.Error) -> None:
    """The status is the code's twin or a refinement its reason names, and the ErrorInfo
    carries the JSON-RPC code of the exact Error."""
    info = error_info(e)
    assert info.domain == ERROR_DOMAIN and info.reason
    assert info.metadata["json_rpc_code"] == str(error.code)
    if e.code() != grpc_status_for(error.code):
        assert e.code() in REFINED and info.reason == e.code().name, (error, e.code(), info)
