"""CarError.of_call: the error a car-grpc core ended a call with, read back from the call's
trailers on a real gRPC call (a servicer on loopback that ends its call as told)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from car_grpc.wire.errors import ERROR_TRAILER, INVALID_PARAMS, CarError

METHOD = "/test.Trailers/End"


class _Ends(grpc.GenericRpcHandler):
    """Every call ends FAILED_PRECONDITION with the trailers the test set."""

    def __init__(self) -> None:
        self.trailers: Sequence[tuple[str, str | bytes]] = ()

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        async def end(_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            context.set_trailing_metadata(tuple(self.trailers))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")

        return grpc.unary_unary_rpc_method_handler(end)


@pytest.fixture
async def ends() -> AsyncIterator[tuple[_Ends, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]]]:
    handler = _Ends()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield handler, channel.unary_unary(METHOD)
    finally:
        await server.stop(0)


async def _failed(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(b"", timeout=10)
    return e.value


async def test_the_error_a_call_ended_with_is_read_back_and_garbled_trailers_are_none(
    ends: tuple[_Ends, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]],
) -> None:
    handler, call = ends
    data = struct_pb2.Value(string_value="x")
    sent = CarError(INVALID_PARAMS, "invalid params: x", data, reason="BAD_X")
    handler.trailers = sent.trailers()
    got = CarError.of_call(await _failed(call))
    assert got is not None
    assert (got.code, got.message, got.data, got.reason) == (
        INVALID_PARAMS,
        "invalid params: x",
        data,
        "BAD_X",
    )
    assert got.status == grpc.StatusCode.FAILED_PRECONDITION
    handler.trailers = ()  # another server's refusal: none
    assert CarError.of_call(await _failed(call)) is None
    # Trailers by those names that do not parse: none either, not an exception out of the
    # caller's `except AioRpcError` (its own error for the call stands).
    for key in (ERROR_TRAILER, "grpc-status-details-bin"):
        handler.trailers = ((key, b"\xff\xff\xff"),)
        assert CarError.of_call(await _failed(call)) is None, key
