"""`car-grpc gateway --core-token-file PATH` reads the file again whenever it opens a
multiplexed stream anew, as docs/grpc-guide.md asks of every client: pointed at the core's
own token file, a gateway goes on serving when the core restarts and mints new tokens
(pointed at a copy that goes stale, it tells each client that its token was refused:
tests/test_gateway_token_processes.py). Real `car-grpc core` and `car-grpc gateway`
processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.processes import port
from tests.test_faults_processes import child, restartable_core, token_file
from tests.ws_helpers import RpcError, rpc


async def logged_in(url: str, token: str) -> object:
    """tools.list through the gateway once a session authenticates with `token` (until the
    gateway reaches the new core its stream to the old one may still be failing)."""
    async with asyncio.timeout(20):
        while True:
            async with rpc(url) as client:
                try:
                    await client.login(token)
                except RpcError as e:
                    message = str(e.args[0]["error"]["message"])
                    assert "UNAVAILABLE" in message, message  # never the token refused
                else:
                    return await client.result("tools.list")
            await asyncio.sleep(0.05)  # polling another process: nothing to wait on


async def test_a_gateway_reads_the_cores_new_token_after_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with child(home, *restartable_core(0)) as (core, address):
        path = home / "ai.parslee.car" / "auth-token"
        args = ("gateway", "--core", address, "--port", "0", "--core-token-file", str(path))
        async with child(tmp_path / "gw", *args) as (_, url):
            assert await logged_in(url, token_file(home, "auth-token")) == {"tools": [], "count": 0}
            old = token_file(home, "auth-token")
            assert await core.terminate() == 0
            async with child(home, *restartable_core(port(address))):
                fresh = token_file(home, "auth-token")
                assert fresh != old
                assert await logged_in(url, fresh) == {"tools": [], "count": 0}
