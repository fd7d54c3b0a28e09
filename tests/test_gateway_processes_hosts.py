"""`car-grpc serve --host HOST`: the gateway listens on every address HOST stands for ("":
every interface, IPv4 and IPv6; a name: each address it resolves to), on one port, whether
it runs in the core's process or in processes of its own (which then share one listening
socket per address). "auto" counts CPUs alone, whatever the host."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from car_grpc.config import gateway_processes, serve_gateway_processes
from tests.processes import car_grpc_serve, port
from tests.ws_helpers import rpc


def _loopbacks(host: str) -> list[str]:
    """The loopback addresses a client reaches a gateway on `host` at: for "", one of
    each family this machine has (::1 where it has IPv6); for a name, what it resolves to."""
    if host:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        return sorted({str(info[4][0]) for info in infos})
    return ["127.0.0.1", *(["::1"] if socket.has_ipv6 and _has_ipv6_loopback() else [])]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("host", "processes"), [("", "1"), ("", "0"), ("localhost", "auto")]
)  # fmt: skip
async def test_the_gateway_listens_on_every_address_of_its_host(
    tmp_path: Path, host: str, processes: str
) -> None:
    home = tmp_path / "home"
    flags = ("--no-dashboard", "--host", host, "--gateway-processes", processes)
    async with car_grpc_serve(home, *flags) as server:
        _, url = await server.listeners(2)
        assert url == f"ws://{host}:{port(url)}/"
        token = (home / "ai.parslee.car" / "auth-token").read_text()
        for address in _loopbacks(host):
            literal = f"[{address}]" if ":" in address else address
            async with rpc(f"ws://{literal}:{port(url)}/") as client:
                await client.login(token)
                assert await client.result("tools.list") == {"tools": [], "count": 0}
        count, counted = serve_gateway_processes(gateway_processes(processes))
        assert f"serve: gateway processes: {count} ({counted})" in server.log
        assert await server.terminate() == 0, server.log


@pytest.mark.parametrize("processes", ["0", "1"])
async def test_a_taken_port_is_named(tmp_path: Path, processes: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # (No A2A port beside it: by default the WebSocket port + 3, which may be taken.)
        flags = ("--no-dashboard", "--a2a-port", "0", "--gateway-processes", processes)
        async with car_grpc_serve(tmp_path / "home", *flags, "--port", str(busy)) as server:
            assert await server.wait(30) == 1, server.log
    said = (
        f"error while attempting to bind on address ('127.0.0.1', {busy}): address already in use"
    )
    assert f"car-grpc: [Errno 98] {said}" in server.lines, server.log
