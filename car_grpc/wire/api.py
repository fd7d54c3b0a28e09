"""The JSON-RPC method table, derived from the car.v1 descriptors alone.

Every member of the `body` oneof of ClientFrame / ServerFrame declares its JSON-RPC method
and kind (request, response, notification) with the `json_rpc` option; typed RPCs declare
the method they perform with `json_rpc_method`. This module reads those options once and
exposes them as tables; nothing here is kept by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from car_grpc.v1 import (
    a2ui_pb2,
    chats_pb2,
    host_pb2,
    options_pb2,
    runs_pb2,
    session_pb2,
    state_pb2,
    status_pb2,
    tools_pb2,
    voice_pb2,
)

FrameKind = options_pb2.FrameKind
REQUEST = options_pb2.FRAME_KIND_REQUEST
RESPONSE = options_pb2.FRAME_KIND_RESPONSE
NOTIFICATION = options_pb2.FRAME_KIND_NOTIFICATION
BINARY = options_pb2.FRAME_KIND_BINARY


@dataclass(frozen=True)
class Member:
    """One member of a frame's `body` oneof and its JSON-RPC binding."""

    field: str  # the oneof member's name, e.g. "runs_start"
    method: str  # the JSON-RPC method, e.g. "runs.start"
    kind: int  # FrameKind
    message: Descriptor  # the member's message type
    bare_field: str  # "" when params/result is a JSON object
    access: options_pb2.Access  # who may send it (requests only; empty otherwise)


def _members(frame: Descriptor) -> dict[str, Member]:
    members: dict[str, Member] = {}
    for fd in frame.oneofs_by_name["body"].fields:
        opts = fd.GetOptions()
        if not opts.HasExtension(options_pb2.json_rpc):
            continue  # `error`
        binding = opts.Extensions[options_pb2.json_rpc]
        assert fd.message_type is not None
        members[fd.name] = Member(
            fd.name,
            binding.method,
            binding.kind,
            fd.message_type,
            binding.bare_field,
            binding.access,
        )
    return members


CLIENT_MEMBERS = _members(session_pb2.ClientFrame.DESCRIPTOR)
SERVER_MEMBERS = _members(session_pb2.ServerFrame.DESCRIPTOR)


def _by_method(members: dict[str, Member], kind: int) -> dict[str, Member]:
    return {m.method: m for m in members.values() if m.kind == kind}


# Client -> server requests by JSON-RPC method, and the response member for each.
CLIENT_REQUESTS = _by_method(CLIENT_MEMBERS, REQUEST)
CLIENT_RESPONSES = _by_method(CLIENT_MEMBERS, RESPONSE)
CLIENT_NOTIFICATIONS = _by_method(CLIENT_MEMBERS, NOTIFICATION)
SERVER_RESPONSES = _by_method(SERVER_MEMBERS, RESPONSE)
SERVER_REQUESTS = _by_method(SERVER_MEMBERS, REQUEST)
SERVER_NOTIFICATIONS = _by_method(SERVER_MEMBERS, NOTIFICATION)
# Members that travel as CAR binary frames on the WebSocket (no JSON-RPC method), by field.
CLIENT_BINARY = {m.field: m for m in CLIENT_MEMBERS.values() if m.kind == BINARY}
SERVER_BINARY = {m.field: m for m in SERVER_MEMBERS.values() if m.kind == BINARY}


@dataclass(frozen=True)
class TypedRpc:
    """A unary or server-streaming RPC of a per-domain service bound to a JSON-RPC method."""

    service: ServiceDescriptor
    name: str
    method: str
    server_streaming: bool
    request: Descriptor
    response: Descriptor


def _all_services() -> list[ServiceDescriptor]:
    files = [
        session_pb2,
        tools_pb2,
        state_pb2,
        runs_pb2,
        chats_pb2,
        host_pb2,
        voice_pb2,
        status_pb2,
        a2ui_pb2,
    ]
    return [svc for f in files for svc in f.DESCRIPTOR.services_by_name.values()]


def _typed_rpcs() -> list[TypedRpc]:
    rpcs: list[TypedRpc] = []
    for service in _all_services():
        for m in service.methods:
            opts = m.GetOptions()
            if not opts.HasExtension(options_pb2.json_rpc_method):
                continue
            rpcs.append(
                TypedRpc(
                    service,
                    m.name,
                    opts.Extensions[options_pb2.json_rpc_method],
                    m.server_streaming,
                    m.input_type,
                    m.output_type,
                )
            )
    return rpcs


TYPED_RPCS = _typed_rpcs()


def rpc_access(method: MethodDescriptor) -> options_pb2.Access:
    """Who may call an RPC: the `access` of its JSON-RPC method's request member, or the
    RPC's own `access` option when it has no JSON-RPC method."""
    opts = method.GetOptions()
    if opts.HasExtension(options_pb2.json_rpc_method):
        return CLIENT_REQUESTS[opts.Extensions[options_pb2.json_rpc_method]].access
    return opts.Extensions[options_pb2.access]


def all_rpcs() -> list[MethodDescriptor]:
    """Every RPC of every car.v1 service."""
    return [m for service in _all_services() for m in service.methods]


def request_member_for(message: Descriptor) -> Member | None:
    """The ClientFrame request member whose message type is `message`."""
    for member in CLIENT_REQUESTS.values():
        if member.message is message:
            return member
    return None


def params_usage(message: Descriptor) -> str:
    """The fixed -32602 message of a request's params (`json_rpc_usage`), or ""."""
    return str(message.GetOptions().Extensions[options_pb2.json_rpc_usage])
