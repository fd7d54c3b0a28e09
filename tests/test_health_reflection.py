"""Stock gRPC health and reflection on the core, as real processes and real clients:
an open Health.Watch stream does not keep `car-grpc serve` / `car-grpc core` from
exiting on SIGTERM, and reflection is served as grpc.reflection.v1 and v1alpha, each
listing every service once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from car_grpc.wire import api
from tests.processes import ONE_PROCESS, car_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "command",
    [
        (
            "serve",
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--no-unix-socket",
            "--no-dashboard",
            *ONE_PROCESS,
        ),
        ("core", "--grpc-port", "0"),
    ],
    ids=["serve", "core"],
)
async def test_sigterm_ends_the_process_with_a_health_watch_open(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    async with car_grpc(tmp_path / "home", *command) as server:
        grpc_address = (await server.listeners(1))[0]
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse) and first.status == SERVING
            began = time.monotonic()
            assert await server.terminate(timeout=5) == 0, server.lines
            elapsed = time.monotonic() - began
            # The watcher was told before the stream ended.
            statuses = [r.status async for r in _until_end(watch)]
        assert statuses[:1] == [NOT_SERVING], statuses
    assert elapsed < 3, f"exit took {elapsed:.1f}s"
    assert server.lines[-1].endswith("stopped"), server.lines


async def _until_end(call: Any) -> AsyncIterator[Any]:
    """The responses of a server stream until it ends (cancelled or not)."""
    try:
        while (reply := await call.read()) is not grpc.aio.EOF:
            yield reply
    except grpc.aio.AioRpcError as e:
        assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), e


REFLECTION = {
    "v1": "grpc.reflection.v1.ServerReflection",
    "v1alpha": "grpc.reflection.v1alpha.ServerReflection",
}


def _reflection_call(channel: grpc.aio.Channel, version: str) -> Any:
    """A ServerReflectionInfo stream under `version`. The v1 messages are wire-identical
    to v1alpha's (same fields, same numbers): only the method path differs."""
    return channel.stream_stream(
        f"/{REFLECTION[version]}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()


async def _ask(call: Any, **request: Any) -> Any:
    await call.write(reflection_pb2.ServerReflectionRequest(**request))
    return await call.read()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_every_service_once(version: str, tmp_path: Path) -> None:
    async with car_grpc(tmp_path / "home", "core", "--grpc-port", "0") as core:
        [address] = await core.listeners(1)
        async with grpc.aio.insecure_channel(address) as channel:
            call = _reflection_call(channel, version)
            listed = await _ask(call, list_services="")
            # What grpcurl does next: the file of each listed service, by symbol.
            files = {}
            for service in listed.list_services_response.service:
                reply = await _ask(call, file_containing_symbol=service.name)
                assert reply.WhichOneof("message_response") == "file_descriptor_response", (
                    service.name,
                    reply,
                )
                files[service.name] = reply.file_descriptor_response.file_descriptor_proto
            await call.done_writing()
        assert await core.terminate() == 0, core.lines

    names = [s.name for s in listed.list_services_response.service]
    assert len(names) == len(set(names)), names
    expected = {
        "car.v1.SessionService",
        *(rpc.service.full_name for rpc in api.TYPED_RPCS),
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "lf.a2a.v1.A2AService",  # A2A, on unless --no-a2a
    }
    assert set(names) == expected
    # Each service's file (the first of the reply) declares it.
    for name, protos in files.items():
        package, _, short = name.rpartition(".")
        first = descriptor_pb2.FileDescriptorProto.FromString(protos[0])
        assert first.package == package and short in [s.name for s in first.service], name


async def test_reflection_v1_as_a_dynamic_client_uses_it(tmp_path: Path) -> None:
    """What grpcurl does: fetch the v1 reflection service's own descriptor by reflection,
    then speak v1 with messages built from that descriptor alone."""
    async with car_grpc(tmp_path / "home", "core", "--grpc-port", "0") as core:
        [address] = await core.listeners(1)
        async with grpc.aio.insecure_channel(address) as channel:
            call = _reflection_call(channel, "v1")
            reply = await _ask(call, file_containing_symbol=REFLECTION["v1"])
            await call.done_writing()
            pool = descriptor_pool.DescriptorPool()
            for raw in reversed(reply.file_descriptor_response.file_descriptor_proto):
                pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
            method = pool.FindMethodByName(f"{REFLECTION['v1']}.ServerReflectionInfo")
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
            v1 = channel.stream_stream(
                f"/{REFLECTION['v1']}/{method.name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )()
            await v1.write(request_cls(list_services="*"))
            listed: Any = await v1.read()
            await v1.done_writing()
        assert await core.terminate() == 0, core.lines
    assert type(listed).DESCRIPTOR.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    assert listed.original_request.list_services == "*"
    names = [s.name for s in listed.list_services_response.service]
    assert REFLECTION["v1"] in names and "car.v1.SessionService" in names
