"""End-to-end: the `car-grpc` command. `car-grpc core` serves stock gRPC health and
reflection; `car-grpc agents add|list|remove` manage agent tokens that a running core
honours at once, and name the store they used; `./dev car-grpc` runs it from a checkout."""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from car_grpc.core.tokens import AUTH_TOKEN_FILE, HOST_TOKEN_FILE
from car_grpc.v1 import session_pb2
from car_grpc.wire.errors import INTERNAL, CarError
from tests.conftest import make_config
from tests.processes import car_grpc, cli_env, completed
from tests.session_client import SessionClient
from tests.ws_helpers import running_core

CAR_GRPC = str(Path(sys.executable).with_name("car-grpc"))
CHECKOUT = Path(__file__).resolve().parents[1]
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
NEW_STORE = "that store did not exist before"


async def run_car_grpc(car_home: Path, *args: str) -> tuple[int, str, str]:
    return await completed([CAR_GRPC, *args], cli_env(car_home))


def store_line(car_home: Path) -> str:
    """What `car-grpc agents ...` prints on stderr about the store it used."""
    return f"agent tokens of the store {car_home}/car-grpc/store.sqlite3 (CAR_HOME={car_home})"


async def test_core_serves_health_and_reflection(tmp_path: Path) -> None:
    async with car_grpc(tmp_path / "car-home", "core", "--grpc-port", "0") as core:
        [address] = await core.listeners(1)
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "car.v1.SessionService", "car.v1.ToolService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            stream = reflection.ServerReflectionInfo()
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await stream.read()
            # A service's file descriptor, as grpcurl fetches it.
            await stream.write(
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="car.v1.ToolService")
            )
            files = await stream.read()
            await stream.done_writing()
        assert await core.terminate() == 0, core.lines
    names = {s.name for s in listed.list_services_response.service}
    expected = {
        "car.v1.SessionService",
        "car.v1.ToolService",
        "car.v1.StateService",
        "car.v1.PolicyService",
        "grpc.health.v1.Health",
    }
    assert expected <= names
    assert files.file_descriptor_response.file_descriptor_proto


async def test_core_writes_private_token_files_and_removes_them(tmp_path: Path) -> None:
    car_home = tmp_path / "car-home"
    token_dir = car_home / "ai.parslee.car"  # what car-runtime reads under CAR_HOME
    async with car_grpc(car_home, "core", "--grpc-port", "0") as core:
        await core.listeners(1)
        for name in (AUTH_TOKEN_FILE, HOST_TOKEN_FILE):
            path = token_dir / name
            assert TOKEN.fullmatch(path.read_text())
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await core.terminate() == 0, core.lines
    assert not (token_dir / AUTH_TOKEN_FILE).exists()
    assert not (token_dir / HOST_TOKEN_FILE).exists()


async def attach(channel: grpc.aio.Channel, agent_id: str, token: str) -> tuple[SessionClient, str]:
    client = SessionClient(channel)
    reply = await client.request(
        "session_auth", session_pb2.AuthenticateRequest(token=token, agent_id=agent_id)
    )
    assert reply.agent_id == agent_id
    return client, reply.session_id


async def test_agents_add_works_at_once_on_a_running_core(tmp_path: Path) -> None:
    # CAR_HOME is tmp_path/car-home, and its store is the one `agents` uses by default
    config = make_config(tmp_path, store=None)
    car_home = config.core.state_root
    async with running_core(config.core) as core:
        code, out, err = await run_car_grpc(car_home, "agents", "add", "agent-x")
        assert code == 0, err
        token = out.removesuffix("\n")
        assert out == token + "\n" and TOKEN.fullmatch(token)  # the token alone, once
        # The store it used, on stderr: the server's (it exists already: no warning).
        assert store_line(car_home) in err and NEW_STORE not in err, err

        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            first, first_id = await attach(channel, "agent-x", token)
            # Re-attach of the same agent replaces the older attachment.
            second, second_id = await attach(channel, "agent-x", token)
            assert core.parts is not None
            assert core.parts.registry.attached["agent-x"].id == second_id != first_id

            code, out, err = await run_car_grpc(car_home, "agents", "list")
            assert code == 0 and out.startswith("agent-x\t") and len(out.splitlines()) == 1
            assert store_line(car_home) in err

            # Minting again replaces the token; removing revokes it.
            code, out, _ = await run_car_grpc(car_home, "agents", "add", "agent-x")
            newer = out.strip()
            assert newer != token
            client = SessionClient(channel)
            with pytest.raises(CarError) as caught:
                await client.request(
                    "session_auth", session_pb2.AuthenticateRequest(token=token, agent_id="agent-x")
                )
            assert caught.value.code == INTERNAL
            await client.close()
            code, out, err = await run_car_grpc(car_home, "agents", "remove", "agent-x")
            assert code == 0 and out == "" and store_line(car_home) in err
            client = SessionClient(channel)
            with pytest.raises(CarError):
                await client.request(
                    "session_auth", session_pb2.AuthenticateRequest(token=newer, agent_id="agent-x")
                )
            await client.close()
            code, _, err = await run_car_grpc(car_home, "agents", "remove", "agent-x")
            assert code == 1 and "agent-x" in err
            for c in (first, second):
                await c.close()


async def test_agents_add_names_a_new_store_and_the_home_it_came_from(tmp_path: Path) -> None:
    """Without CAR_HOME the token goes to ~/.car: `agents add` says so, and that the store
    did not exist (no server has used it), while stdout stays the token alone."""
    home = tmp_path / "user"
    code, out, err = await completed([CAR_GRPC, "agents", "add", "bot"], cli_env(HOME=str(home)))
    assert code == 0, err
    assert TOKEN.fullmatch(out.removesuffix("\n")) and out.count("\n") == 1
    store = home / ".car" / "car-grpc" / "store.sqlite3"
    assert f"agent tokens of the store {store} (CAR_HOME unset, so {home / '.car'})" in err
    assert NEW_STORE in err and "its own CAR_HOME" in err
    code, out, err = await completed([CAR_GRPC, "agents", "list"], cli_env(HOME=str(home)))
    assert code == 0 and out.startswith("bot\t")
    assert str(store) in err and NEW_STORE not in err


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (CHECKOUT / ".venv").resolve(),
    reason="./dev sets up the checkout's .venv: run under it (./dev test)",
)
async def test_dev_runs_any_car_grpc_command_from_the_checkout(tmp_path: Path) -> None:
    """`./dev car-grpc ARGS` runs the checkout's car-grpc with ARGS: its stdout is the
    command's alone (here the token), so `$(./dev car-grpc agents add a)` works."""
    dev = str(CHECKOUT / "dev")
    car_home = tmp_path / "car-home"
    code, out, err = await completed([dev, "car-grpc", "agents", "add", "a1"], cli_env(car_home))
    assert code == 0, err
    assert TOKEN.fullmatch(out.removesuffix("\n")) and out.count("\n") == 1
    assert store_line(car_home) in err
    code, out, _ = await completed([dev, "car-grpc", "agents", "list"], cli_env(car_home))
    assert code == 0 and out.startswith("a1\t")
