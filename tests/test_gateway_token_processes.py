"""A gateway given the core's daemon token (`car-grpc gateway --core-token-file`) carries
its connections over multiplexed streams; real `car-grpc core` and `car-grpc gateway`
processes. With a token the core refuses (a wrong one, the host token) or no core to ask,
the gateway does not start: it exits 1 saying why. When the core refuses the token later
(it restarted and minted new tokens), each client is told that the gateway's own token
was refused, not that its own was. (And in process: a core that never answers fails the
start within core_check_timeout.)"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from car_grpc.core.tokens import mint_token
from car_grpc.gateway import Gateway
from car_grpc.gateway.server import CoreCheckFailed
from tests.bounded import bounded
from tests.conftest import make_config
from tests.processes import LISTENING, car_grpc, port
from tests.test_faults_processes import child, restartable_core, token_file
from tests.test_gateway_token_file import login_once_reached
from tests.ws_helpers import rpc

REFUSED = "the core refused the gateway's own token"


async def test_a_gateway_whose_token_the_core_refuses_exits_saying_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    wrong = tmp_path / "wrong"
    wrong.write_text(mint_token())
    # A port bound and not listening: refused, and nobody else's for the test's time.
    with socket.socket() as nothing_there:
        nothing_there.bind(("127.0.0.1", 0))
        unused = f"127.0.0.1:{nothing_there.getsockname()[1]}"
        async with child(home, "core", "--grpc-port", "0") as (_, address):
            host = tmp_path / "host"
            host.write_text(token_file(home, "host-token"))
            for core, token, said in (
                (
                    address,
                    wrong,
                    f"cannot serve through the core at {address}: UNAUTHENTICATED: {REFUSED}",
                ),
                (
                    address,
                    host,
                    f"cannot serve through the core at {address}: PERMISSION_DENIED: {REFUSED}",
                ),
                (unused, wrong, f"cannot serve through the core at {unused}: UNAVAILABLE: "),
            ):
                args = ("gateway", "--core", core, "--port", "0", "--core-token-file", str(token))
                async with car_grpc(tmp_path / "gw", *args) as gateway:
                    assert await gateway.wait(30) == 1, gateway.log
                    assert any(line.startswith(f"car-grpc: {said}") for line in gateway.lines), (
                        gateway.log
                    )
                    assert not any(LISTENING.search(line) for line in gateway.lines)


async def test_a_token_refused_later_is_named_to_every_client(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with child(home, *restartable_core(0)) as (core, address):
        token = tmp_path / "daemon"
        token.write_text(token_file(home, "auth-token"))
        args = ("gateway", "--core", address, "--port", "0", "--core-token-file", str(token))
        async with child(tmp_path / "gw", *args) as (_, url):
            async with rpc(url) as client:
                await client.login(token.read_text())
                assert await client.result("state.set", {"key": "k", "value": 1}) is not None
            # The core restarts on its port with new tokens: the gateway's is stale.
            assert await core.terminate() == 0
            async with child(home, *restartable_core(port(address))):
                fresh = token_file(home, "auth-token")
                assert fresh != token.read_text()
                answer = await login_once_reached(url, fresh, accepted=False)
                assert answer == (
                    f"core unavailable: UNAUTHENTICATED: {REFUSED} (auth failed: token mismatch)"
                )


async def test_a_core_that_never_answers_fails_the_start_within_the_check_timeout(
    tmp_path: Path,
) -> None:
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: held.append(writer), "127.0.0.1", 0)
    address = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    config = make_config(tmp_path, core_check_timeout=0.5)
    gateway = Gateway(config.gateway, address, core_token=mint_token())
    try:
        with pytest.raises(CoreCheckFailed) as failed:
            await gateway.start()
        assert str(failed.value) == (
            f"the core at {address} did not take the gateway's multiplexed stream in within 0.5 s"
        )
        assert gateway.ws_port == 0  # never listened
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await bounded(silent.wait_closed())
