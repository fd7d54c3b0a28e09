"""End-to-end: session.auth in every variant (docs/protocol.md §2) and the token files."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.core.session import Role
from car_grpc.core.tokens import AUTH_TOKEN_FILE, HOST_TOKEN_FILE
from car_grpc.v1 import session_pb2, state_pb2
from car_grpc.wire.errors import AUTH_REQUIRED, INTERNAL, CarError
from tests.bounded import bounded
from tests.conftest import make_config
from tests.session_client import SessionClient
from tests.ws_helpers import running_core

Auth = session_pb2.AuthenticateRequest
TOKEN_MISMATCH = "auth failed: token mismatch"


def tokens(core: Core) -> tuple[str, str]:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon, core.parts.tokens.host


async def auth(
    channel: grpc.aio.Channel, request: Auth
) -> tuple[SessionClient, session_pb2.AuthenticateResponse]:
    client = SessionClient(channel)
    reply = await client.request("session_auth", request)
    return client, reply


async def assert_usable(client: SessionClient) -> None:
    keys = await client.request("state_keys", state_pb2.ListStateKeysRequest())
    assert list(keys.keys) == []


async def test_daemon_token(core: Core, channel: grpc.aio.Channel) -> None:
    daemon, _ = tokens(core)
    client, reply = await auth(channel, Auth(token=daemon, memory_namespace="projA"))
    assert reply.ok and reply.auth_enabled
    assert not reply.HasField("role") and not reply.HasField("agent_id")
    assert reply.memory_namespace == "projA"
    assert (
        core.parts is not None
        and core.parts.registry.sessions[reply.session_id].role is Role.DAEMON
    )
    await assert_usable(client)
    await client.close()


async def test_host_token_gives_the_host_role(core: Core, channel: grpc.aio.Channel) -> None:
    _, host = tokens(core)
    client, reply = await auth(channel, Auth(host_token=host))
    assert reply.ok and reply.role == "host"
    assert not reply.HasField("memory_namespace")
    await assert_usable(client)
    await client.close()


async def test_agent_token_attaches_the_agent(core: Core, channel: grpc.aio.Channel) -> None:
    assert core.parts is not None
    token = await core.parts.agent_tokens.add("agent-7")
    client, reply = await auth(channel, Auth(token=token, agent_id="agent-7"))
    assert reply.ok and reply.agent_id == "agent-7"
    assert not reply.HasField("role")
    assert core.parts.registry.attached["agent-7"].id == reply.session_id
    await assert_usable(client)
    await client.close()


@pytest.mark.parametrize(
    "variant",
    ["daemon", "host", "agent-wrong-token", "agent-unknown", "daemon-as-agent", "host-as-daemon"],
)
async def test_wrong_tokens_leave_the_session_unauthenticated(
    core: Core, channel: grpc.aio.Channel, variant: str
) -> None:
    assert core.parts is not None
    daemon, host = tokens(core)
    agent = await core.parts.agent_tokens.add("agent-7")
    request = {
        "daemon": Auth(token=daemon + "x"),
        "host": Auth(host_token=daemon),
        "agent-wrong-token": Auth(token=agent[:-1], agent_id="agent-7"),
        "agent-unknown": Auth(token=agent, agent_id="agent-unknown"),
        "daemon-as-agent": Auth(token=daemon, agent_id="agent-7"),
        "host-as-daemon": Auth(token=host),
    }[variant]
    client = SessionClient(channel)
    with pytest.raises(CarError) as err:
        await client.request("session_auth", request)
    assert (err.value.code, err.value.message) == (INTERNAL, TOKEN_MISMATCH)
    assert "agent-7" not in core.parts.registry.attached
    # Still open, still unauthenticated: a right token now works on the same stream...
    reply = await client.request("session_auth", Auth(token=daemon))
    assert reply.ok
    await client.close()
    # ...and any other request after a wrong one is refused and ends the stream.
    client = SessionClient(channel)
    with pytest.raises(CarError):
        await client.request("session_auth", request)
    with pytest.raises(CarError) as err:
        await client.request("state_keys", state_pb2.ListStateKeysRequest())
    assert err.value.code == AUTH_REQUIRED
    await bounded(client.ended.wait())
    assert client.end_code == grpc.StatusCode.UNAUTHENTICATED
    await client.close()


async def test_missing_auth_is_refused_and_the_stream_closed(
    core: Core, channel: grpc.aio.Channel
) -> None:
    client = SessionClient(channel)
    with pytest.raises(CarError) as err:
        await client.request("state_keys", state_pb2.ListStateKeysRequest())
    assert err.value.code == AUTH_REQUIRED
    assert err.value.message.startswith("auth required: ")
    await bounded(client.ended.wait())
    assert client.end_code == grpc.StatusCode.UNAUTHENTICATED
    await client.close()


async def test_auth_with_no_credential_fails(core: Core, channel: grpc.aio.Channel) -> None:
    client = SessionClient(channel)
    with pytest.raises(CarError) as err:
        await client.request("session_auth", Auth())
    assert err.value.code == INTERNAL
    await client.close()


async def test_reattach_replaces_the_older_attachment(
    core: Core, channel: grpc.aio.Channel
) -> None:
    assert core.parts is not None
    token = await core.parts.agent_tokens.add("agent-7")
    first, one = await auth(channel, Auth(token=token, agent_id="agent-7"))
    second, two = await auth(channel, Auth(token=token, agent_id="agent-7"))
    assert core.parts.registry.attached["agent-7"].id == two.session_id
    # The older connection ending does not detach the newer one.
    older = core.parts.registry.sessions[one.session_id]
    await first.close()
    await asyncio.wait_for(older.closed.wait(), 5)
    assert core.parts.registry.attached["agent-7"].id == two.session_id
    await second.close()


async def test_no_auth(tmp_path: Path) -> None:
    config = make_config(tmp_path, auth=False)
    async with running_core(config.core) as core:
        assert not (config.core.token_dir / AUTH_TOKEN_FILE).exists()
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            client, reply = await auth(channel, Auth(token="anything", memory_namespace="n"))
            assert reply.ok and not reply.auth_enabled
            assert not reply.HasField("memory_namespace")
            await client.close()
            # car-runtime finds no token file and starts with the handshake.
            client = SessionClient(channel)
            hs = session_pb2.HandshakeRequest(client_version="0.58.0")
            hs.protocol_version.number_value = 3
            assert (await client.request("server_handshake", hs)).protocol_version == 3
            await assert_usable(client)
            await client.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_token_files_are_private_and_removed_on_stop(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running_core(config.core) as core:
        daemon, host = tokens(core)
        auth_file = config.core.token_dir / AUTH_TOKEN_FILE
        host_file = config.core.token_dir / HOST_TOKEN_FILE
        assert auth_file.read_text() == daemon and host_file.read_text() == host
        assert len(daemon) == len(host) == 43 and daemon != host
        assert _mode(auth_file) == _mode(host_file) == 0o600
    assert not auth_file.exists() and not host_file.exists()


def test_token_dir_follows_car_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAR_HOME", str(tmp_path))
    assert Config().core.token_dir == tmp_path / "ai.parslee.car"
    monkeypatch.delenv("CAR_HOME")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert Config().core.token_dir == tmp_path / "run" / "ai.parslee.car"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Config().core.token_dir == tmp_path / "home" / ".config" / "ai.parslee.car"
