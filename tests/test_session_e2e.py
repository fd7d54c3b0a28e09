"""End-to-end: a real core on loopback, the generated stub, a typed handshake."""

from __future__ import annotations

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2
from car_grpc.wire.errors import AUTH_REQUIRED, PROTOCOL_VERSION_MISMATCH, CarError
from tests.bounded import bounded
from tests.session_client import SessionClient, connect
from tests.ws_helpers import daemon_token


async def test_handshake_over_connect(core: Core, channel: grpc.aio.Channel) -> None:
    client = await connect(channel, token=daemon_token(core), handshake=False)
    hs = session_pb2.HandshakeRequest(client_version="0.58.0", required_capabilities=[])
    hs.protocol_version.number_value = 3
    reply = await client.request("server_handshake", hs)
    assert reply.protocol_version == 3
    assert reply.client_protocol_version == 3
    assert reply.client_version == "0.58.0"
    assert reply.server_version
    await client.close()


async def test_unsupported_protocol_version(core: Core, channel: grpc.aio.Channel) -> None:
    client = await connect(channel, token=daemon_token(core), handshake=False)
    hs = session_pb2.HandshakeRequest()
    hs.protocol_version.number_value = 7
    with pytest.raises(CarError) as err:
        await client.request("server_handshake", hs)
    assert err.value.code == PROTOCOL_VERSION_MISMATCH
    assert "protocol version mismatch" in err.value.message
    await client.close()


async def test_request_before_auth_is_refused_and_stream_closed(
    core: Core, channel: grpc.aio.Channel
) -> None:
    client = SessionClient(channel)
    hs = session_pb2.HandshakeRequest()
    hs.protocol_version.number_value = 3
    with pytest.raises(CarError) as err:
        await client.request("server_handshake", hs)
    assert err.value.code == AUTH_REQUIRED
    await bounded(client.ended.wait())
    assert client.end_code == grpc.StatusCode.UNAUTHENTICATED
    await client.close()
