"""state.get/set/exists/keys/snapshot: the session's key-value state (docs/protocol.md §3).

Values are any JSON, held as Python values in `ClientSession.kv`; they vanish with the
session. Proposals read and write the same dict (see proposals.py).
"""

from __future__ import annotations

from car_grpc.codec import to_struct, to_value, value_to_json
from car_grpc.core.dispatch import field_error, handles, require
from car_grpc.core.session import ClientSession
from car_grpc.v1 import state_pb2


@handles("state_get", inline=True)
async def state_get(
    session: ClientSession, req: state_pb2.GetStateRequest
) -> state_pb2.GetStateResponse:
    key = require(req.key, "key")
    return state_pb2.GetStateResponse(value=to_value(session.kv.get(key)))


@handles("state_set", inline=True)
async def state_set(
    session: ClientSession, req: state_pb2.SetStateRequest
) -> state_pb2.SetStateResponse:
    key = require(req.key, "key")
    if not req.HasField("value"):
        raise field_error("value")
    session.kv[key] = value_to_json(req.value)
    return state_pb2.SetStateResponse(ok=True)


@handles("state_exists", inline=True)
async def state_exists(
    session: ClientSession, req: state_pb2.StateExistsRequest
) -> state_pb2.StateExistsResponse:
    return state_pb2.StateExistsResponse(exists=require(req.key, "key") in session.kv)


@handles("state_keys", inline=True)
async def state_keys(
    session: ClientSession, req: state_pb2.ListStateKeysRequest
) -> state_pb2.ListStateKeysResponse:
    return state_pb2.ListStateKeysResponse(keys=sorted(session.kv))


@handles("state_snapshot", inline=True)
async def state_snapshot(
    session: ClientSession, req: state_pb2.SnapshotStateRequest
) -> state_pb2.SnapshotStateResponse:
    return state_pb2.SnapshotStateResponse(state=to_struct(dict(session.kv)))
