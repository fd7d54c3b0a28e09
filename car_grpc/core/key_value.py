"""state.get/set/exists/keys/snapshot: the session's key-value state (docs/protocol.md §3).

Values are any JSON, held as Python values in `ClientSession.kv`; they vanish with the
session. Proposals read and write the same state (see proposals.py). The state is held
to its budget (kv.py; Config.state_value_max_bytes, state_max_bytes, state_max_keys): a
write over it fails with -32602 naming the limit and stores nothing. A value is measured
by the serialized size of its google.protobuf.Value, before it is converted.
"""

from __future__ import annotations

from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession
from car_grpc.v1 import state_pb2
from car_grpc.wire.codec import to_struct, to_value, value_to_json
from car_grpc.wire.errors import field_error, require


class KeyValue:
    """state.get/set/exists/keys/snapshot: each acts on the caller's session only."""

    @handles("state_get", inline=True)
    async def state_get(
        self, session: ClientSession, req: state_pb2.GetStateRequest
    ) -> state_pb2.GetStateResponse:
        key = require(req.key, "key")
        return state_pb2.GetStateResponse(value=to_value(session.kv.get(key)))

    @handles("state_set", inline=True)
    async def state_set(
        self, session: ClientSession, req: state_pb2.SetStateRequest
    ) -> state_pb2.SetStateResponse:
        key = require(req.key, "key")
        if not req.HasField("value"):
            raise field_error("value")
        size = req.value.ByteSize()
        session.kv.check(key, size)  # before the (costly) conversion of a value refused anyway
        session.kv.set(key, value_to_json(req.value), size)
        return state_pb2.SetStateResponse(ok=True)

    @handles("state_exists", inline=True)
    async def state_exists(
        self, session: ClientSession, req: state_pb2.StateExistsRequest
    ) -> state_pb2.StateExistsResponse:
        return state_pb2.StateExistsResponse(exists=require(req.key, "key") in session.kv)

    @handles("state_keys", inline=True)
    async def state_keys(
        self, session: ClientSession, req: state_pb2.ListStateKeysRequest
    ) -> state_pb2.ListStateKeysResponse:
        return state_pb2.ListStateKeysResponse(keys=sorted(session.kv))

    @handles("state_snapshot", inline=True)
    async def state_snapshot(
        self, session: ClientSession, req: state_pb2.SnapshotStateRequest
    ) -> state_pb2.SnapshotStateResponse:
        return state_pb2.SnapshotStateResponse(state=to_struct(dict(session.kv)))
