"""Reading the standard rich error of a failed typed RPC, as a grpcio-status client does."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from car_grpc.v1 import errors_pb2
from car_grpc.wire.errors import ERROR_DOMAIN, grpc_status_for


def error_code_for(value: int) -> int:
    """The JSON-RPC code of an ErrorCode value (its json_rpc_code option)."""
    enum = errors_pb2.DESCRIPTOR.enum_types_by_name["ErrorCode"]
    return int(enum.values_by_number[value].GetOptions().Extensions[errors_pb2.json_rpc_code])


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


def car_error(e: grpc.aio.AioRpcError) -> errors_pb2.Error:
    """The car.v1.Error among the details of the google.rpc.Status of a failed call."""
    status = rpc_status.from_call(e)
    assert status is not None, f"no google.rpc.Status on {e}"
    errors = []
    for detail in status.details:
        error = errors_pb2.Error()
        if detail.Unpack(error):
            errors.append(error)
    assert len(errors) == 1, status
    return errors[0]


def assert_rich_status(e: grpc.aio.AioRpcError, error: errors_pb2.Error) -> None:
    """The status is the code's twin or a refinement its reason names, the ErrorInfo
    carries the JSON-RPC code of the exact Error, and the details carry that Error too,
    with the ErrorCode whose JSON-RPC code it is."""
    assert car_error(e) == error
    assert error.error_code != 0 and error_code_for(error.error_code) == error.code
    info = error_info(e)
    assert info.domain == ERROR_DOMAIN and info.reason
    assert info.metadata["json_rpc_code"] == str(error.code)
    if e.code() != grpc_status_for(error.code):
        assert e.code() in REFINED and info.reason == e.code().name, (error, e.code(), info)
