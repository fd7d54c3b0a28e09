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

#: tools.list's answer on a core without tools.
NO_TOOLS = {"tools": [], "count": 0}


async def login_once_reached(url: str, token: str, *, accepted: bool) -> object:
    """A session's session.auth with `token` through the gateway at `url`, once the gateway
    reaches the new core (until then its stream to the old one may still be failing:
    UNAVAILABLE, tried again). `accepted`: the session authenticates; tools.list's result.
    Else the token is refused: the error's message, which the connection closed with."""
    async with asyncio.timeout(20):
        while True:
            async with rpc(url) as client:
                try:
                    await client.login(token)
                except RpcError as e:
                    message = str(e.args[0]["error"]["message"])
                    if "UNAVAILABLE" not in message:
                        assert not accepted, message  # never the token refused
                        code, reason = await client.wait_closed()
                        assert (code, reason) == (1011, message)
                        return message
                else:
                    assert accepted, "a session authenticated through a refused stream"
                    return await client.result("tools.list")
            await asyncio.sleep(0.05)  # polling another process: nothing to wait on


async def test_a_gateway_reads_the_cores_new_token_after_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with child(home, *restartable_core(0)) as (core, address):
        path = home / "ai.parslee.car" / "auth-token"
        args = ("gateway", "--core", address, "--port", "0", "--core-token-file", str(path))
        async with child(tmp_path / "gw", *args) as (_, url):
            old = token_file(home, "auth-token")
            assert await login_once_reached(url, old, accepted=True) == NO_TOOLS
            assert await core.terminate() == 0
            async with child(home, *restartable_core(port(address))):
                fresh = token_file(home, "auth-token")
                assert fresh != old
                assert await login_once_reached(url, fresh, accepted=True) == NO_TOOLS
