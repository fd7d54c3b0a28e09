"""End-to-end: `car-grpc a2a-clients add|list|remove` mint and revoke the tokens of A2A
callers, which a running core honours (and stops honouring) at once; `car-grpc serve`
serves A2A on the WebSocket port + 3 unless told otherwise."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from a2a.types import a2a_pb2_grpc
from a2a.types.a2a_pb2 import GetTaskRequest

from car_grpc.cli import build_parser, config_from
from car_grpc.config import Config
from car_grpc.core.server import Core
from tests.conftest import make_config
from tests.test_cli_e2e import TOKEN, run_car_grpc
from tests.test_tls import Certificate, certificate
from tests.ws_helpers import rpc, running, running_core

__all__ = ["certificate"]


async def get_task(core: Core, token: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{core.a2a_url}/a2a/agent-1",
            json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "t"}},
            headers={"Authorization": f"Bearer {token}", "A2A-Version": "1.0"},
        )


async def test_a2a_clients_add_list_remove_on_a_running_core(tmp_path: Path) -> None:
    config = make_config(tmp_path, store=None)  # the store `a2a-clients` uses by default
    car_home = config.core.state_root
    async with running_core(config.core) as core:
        code, out, err = await run_car_grpc(car_home, "a2a-clients", "add", "peer")
        assert code == 0, err
        token = out.strip()
        assert out == token + "\n" and TOKEN.fullmatch(token)
        assert f"A2A caller tokens of the store {car_home}" in err
        known = await get_task(core, token)
        assert known.status_code == 200 and known.json()["error"]["code"] == -32001  # TaskNotFound
        code, out, _ = await run_car_grpc(car_home, "a2a-clients", "list")
        assert code == 0 and out.startswith("peer\t") and len(out.splitlines()) == 1
        code, out, _ = await run_car_grpc(car_home, "a2a-clients", "remove", "peer")
        assert code == 0 and out == ""
        assert (await get_task(core, token)).status_code == 401
        code, _, err = await run_car_grpc(car_home, "a2a-clients", "remove", "peer")
        assert code == 1 and "peer" in err


def test_a2a_flags_and_default_ports() -> None:
    args = build_parser().parse_args(
        ["serve", "--a2a-port", "7000", "--a2a-host", "::1", "--a2a-tls-cert", "c.pem",
         "--a2a-tls-key", "k.pem"]
    )  # fmt: skip
    core = config_from(args).for_serve().core
    assert (core.a2a, core.a2a_port, core.a2a_host) == (True, 7000, "::1")
    assert (core.a2a_tls_cert, core.a2a_tls_key) == (Path("c.pem"), Path("k.pem"))
    assert config_from(build_parser().parse_args(["core", "--no-a2a"])).core.a2a is False
    # Defaults: the WebSocket port + 3 under serve, the gRPC port + 1 for core (9103 both).
    assert Config().for_serve().core.a2a_port == 9103
    assert Config().core.a2a_listen_port == 9103
    assert Config().with_overrides(ws_port=0).for_serve().core.a2a_port == 0
    assert Config().with_overrides(grpc_port=0).core.a2a_listen_port == 0


async def test_no_a2a_serves_no_listener_and_no_service(tmp_path: Path) -> None:
    async with running_core(make_config(tmp_path, a2a=False).core) as core:
        assert core.a2a is None and core.a2a_url == ""
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetTask(GetTaskRequest(tenant="a", id="t"))
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_a2a_listener_speaks_tls_with_its_certificate(
    tmp_path: Path, certificate: Certificate
) -> None:
    config = make_config(tmp_path, a2a_tls_cert=certificate.cert, a2a_tls_key=certificate.key)
    async with running(config) as (core, gateway):
        assert core.a2a_url.startswith("https://127.0.0.1:")
        token = await core.parts.a2a.callers.add("peer") if core.parts and core.parts.a2a else ""
        agent_token = await core.parts.agent_tokens.add("agent-1") if core.parts else ""
        async with rpc(gateway.url) as agent:
            await agent.login(agent_token, agent_id="agent-1")
            card_url = f"{core.a2a_url}/a2a/agent-1/.well-known/agent-card.json"
            trust = ssl.create_default_context(cafile=certificate.cert)
            async with httpx.AsyncClient(verify=trust) as http:
                card = (await http.get(card_url)).json()
                assert card["supportedInterfaces"][0]["url"] == f"{core.a2a_url}/a2a/agent-1"
                answer = await http.post(
                    f"{core.a2a_url}/a2a/agent-1",
                    json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "t"}},
                    headers={"Authorization": f"Bearer {token}", "A2A-Version": "1.0"},
                )
                assert answer.json()["error"]["code"] == -32001
            async with httpx.AsyncClient() as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get(card_url)
            plain = card_url.replace("https://", "http://")
            async with httpx.AsyncClient() as http:
                with pytest.raises(httpx.HTTPError):
                    await http.get(plain)
