"""An embedding program's `Server(config)` runs its gateway in the program's own process
(`server.gateway`) unless it asks for processes: GatewayConfig's default is 0, whatever the
CPUs; "auto" is the default of `car-grpc serve` alone (tests/test_gateway_processes_auto.py)."""

from __future__ import annotations

from pathlib import Path

from car_grpc.config import Config
from car_grpc.serve import Server
from tests.conftest import make_config
from tests.ws_helpers import daemon_token, rpc


async def test_a_server_with_the_default_config_has_its_gateway_in_process(
    tmp_path: Path,
) -> None:
    default = Config().gateway.gateway_processes
    config = make_config(tmp_path, gateway_processes=default, dashboard=False)
    async with Server(config) as server:
        assert server.gateway_process_count == 0
        assert server.gateway is not None and server.gateway_processes == []
        assert server.gateway.url == f"ws://127.0.0.1:{server.ws_port}/"
        async with rpc(server.gateway.url) as client:
            await client.login(daemon_token(server.core))
            assert await client.result("tools.list") == {"tools": [], "count": 0}


async def test_a_server_asked_for_a_gateway_process_runs_one(tmp_path: Path) -> None:
    config = make_config(tmp_path, gateway_processes=1, dashboard=False)
    async with Server(config) as server:
        assert server.gateway is None and len(server.gateway_processes) == 1
        async with rpc(f"ws://127.0.0.1:{server.ws_port}/") as client:
            await client.login(daemon_token(server.core))
            assert await client.result("tools.list") == {"tools": [], "count": 0}
