"""gRPC server reflection, served as both `grpc.reflection.v1` (what grpcurl and current
tools ask for) and the older `grpc.reflection.v1alpha`.

grpcio-reflection ships only v1alpha. The two protos are wire-identical (the same messages,
fields and numbers; only the package differs), so one asyncio servicer answers both
method paths, and the v1 file is derived from the v1alpha one and added to the default
descriptor pool, so that v1 can describe itself too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

from car_grpc.core.open_services import capped_stream
from car_grpc.core.registry import StreamCap

V1ALPHA_SERVICE: str = reflection.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, derived from the v1alpha descriptor."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    return proto


def _ensure_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def add_reflection(
    server: grpc.aio.Server, service_names: Iterable[str], streams: StreamCap
) -> None:
    """Serve reflection (v1 and v1alpha) listing `service_names` and both reflection
    services, each once; its streams, of both versions, held under `streams`."""
    _ensure_v1_descriptor()
    names = sorted({*service_names, V1_SERVICE, V1ALPHA_SERVICE})
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        capped_stream(servicer.ServerReflectionInfo, streams),
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1_SERVICE, V1ALPHA_SERVICE)
        ]
    )
