"""Optional TLS on the gRPC port and the WebSocket port, with a self-signed certificate
made here: wss:// and TLS gRPC clients connect and talk, plaintext to a TLS port fails,
a client that does not trust the certificate is refused, and `car-grpc serve` wires its
gateway and dashboard to a TLS core by itself."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage
from websockets.frames import CloseCode

from car_grpc import cli
from car_grpc.config import Config
from car_grpc.gateway import Gateway
from car_grpc.serve import Server
from tests.bounded import bounded, stopped
from tests.conftest import make_config
from tests.dashboard_helpers import request
from tests.processes import car_grpc
from tests.ws_helpers import Rpc, daemon_token, running_core


@dataclass
class Certificate:
    cert: Path  # PEM, self-signed: also what clients trust
    key: Path


def _self_signed(directory: Path) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost (P-256, one day)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "car-grpc test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(directory / "cert.pem", directory / "key.pem")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return _self_signed(tmp_path_factory.mktemp("tls"))


def _tls_config(tmp_path: Path, certificate: Certificate, **overrides: object) -> Config:
    return make_config(
        tmp_path,
        ws_tls_cert=certificate.cert,
        ws_tls_key=certificate.key,
        grpc_tls_cert=certificate.cert,
        grpc_tls_key=certificate.key,
        **overrides,
    )


def _trusting(certificate: Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificate.cert)


@pytest.fixture
async def served(tmp_path: Path, certificate: Certificate) -> AsyncIterator[Server]:
    async with Server(_tls_config(tmp_path, certificate)) as server:
        yield server


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


async def test_wss_client_through_a_tls_gateway_to_a_tls_core(
    served: Server, certificate: Certificate
) -> None:
    assert served.gateway is not None
    url = served.gateway.url
    assert url.startswith("wss://127.0.0.1:")
    async with connect(url, ssl=_trusting(certificate), ping_interval=None) as ws:
        client = Rpc(ws)
        # The gateway reached the TLS core on its own (it trusts the core's certificate).
        await client.login(daemon_token(served.core))
        assert await client.result("tools.list") == {"tools": [], "count": 0}


async def test_tls_grpc_client_and_the_dashboard(served: Server, certificate: Certificate) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate.cert.read_bytes())
    async with grpc.aio.secure_channel(served.core.grpc_address, credentials) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    # The dashboard's own client of the core speaks TLS too: its health check passes.
    assert served.dashboard is not None and served.core.parts is not None
    tokens = served.core.parts.tokens
    assert tokens is not None
    answer = await request(
        "GET", served.dashboard.url + "healthz", {"Authorization": f"Bearer {tokens.host}"}
    )
    assert answer.status == 200, answer.body


async def test_plaintext_to_a_tls_port_fails(served: Server) -> None:
    assert served.gateway is not None
    plain_url = served.gateway.url.replace("wss://", "ws://")
    with pytest.raises((InvalidMessage, OSError, EOFError)):
        async with connect(plain_url, ping_interval=None, open_timeout=5):
            pass
    async with grpc.aio.insecure_channel(served.core.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_certificate_is_refused(served: Server) -> None:
    assert served.gateway is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(served.gateway.url, ssl=ssl.create_default_context()):
            pass
    credentials = grpc.ssl_channel_credentials()  # the system's roots only
    async with grpc.aio.secure_channel(served.core.grpc_address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_separate_gateway_needs_core_ca_for_a_tls_core(
    tmp_path: Path, certificate: Certificate
) -> None:
    core_config = make_config(
        tmp_path, grpc_tls_cert=certificate.cert, grpc_tls_key=certificate.key
    )
    async with running_core(core_config.core) as core:
        for core_ca, works in ((certificate.cert, True), (None, False)):
            gateway = Gateway(make_config(tmp_path, core_ca=core_ca).gateway, core.grpc_address)
            await gateway.start()
            try:
                async with connect(gateway.url, ping_interval=None) as ws:
                    if works:  # a request reaches the core, which wants auth first
                        client = Rpc(ws)
                        await client.send({"jsonrpc": "2.0", "id": 1, "method": "tools.list"})
                        assert (await client.recv())["error"]["code"] == -32001
                    else:  # plaintext to a TLS core: the connection closes and says why
                        await bounded(ws.wait_closed())
                        assert ws.close_code == CloseCode.INTERNAL_ERROR
                        assert (ws.close_reason or "").startswith("core unavailable")
            finally:
                await stopped(gateway.stop())


def test_tls_flags_fill_the_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        [
            "serve",
            *("--tls-cert", "ws.pem", "--tls-key", "ws.key"),
            *("--grpc-tls-cert", "g.pem", "--grpc-tls-key", "g.key", "--core-ca", "ca.pem"),
        ]
    )
    config = cli.config_from(args)
    gateway, core = config.gateway, config.core
    assert (gateway.ws_tls_cert, gateway.ws_tls_key) == (Path("ws.pem"), Path("ws.key"))
    assert (core.grpc_tls_cert, core.grpc_tls_key) == (Path("g.pem"), Path("g.key"))
    assert gateway.core_ca == config.dashboard.core_ca == Path("ca.pem")


@pytest.mark.parametrize("flag", ["--tls-cert", "--grpc-tls-key"])
def test_a_certificate_without_its_key_is_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", flag, "x.pem"])
    assert exited.value.code == 2
    assert "go together" in capsys.readouterr().err


async def test_car_grpc_serve_with_tls_flags(tmp_path: Path, certificate: Certificate) -> None:
    flags = ("--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key))
    grpc_flags = ("--grpc-tls-cert", str(certificate.cert), "--grpc-tls-key", str(certificate.key))
    async with car_grpc(
        tmp_path / "home",
        "serve",
        *("--port", "0", "--grpc-port", "0", "--no-unix-socket", "--no-dashboard"),
        *flags,
        *grpc_flags,
    ) as server:
        core_address, ws_address = await server.listeners(2)
        assert any("gRPC (TLS) listening" in line for line in server.lines)
        assert ws_address.startswith("wss://")
        async with connect(ws_address, ssl=_trusting(certificate), ping_interval=None) as ws:
            token = (tmp_path / "home" / "ai.parslee.car" / "auth-token").read_text().strip()
            auth = await Rpc(ws).result("session.auth", {"token": token})
            assert auth["ok"] is True
        assert core_address.startswith("127.0.0.1:")
        assert await server.terminate() == 0, server.log
