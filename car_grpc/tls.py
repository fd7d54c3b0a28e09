"""Optional TLS, from certificate files named in the configs (and so on the command line).

- The core's gRPC port: `grpc_tls_cert` + `grpc_tls_key` (PEM chain and key).
- The core's A2A HTTP listener (https://): `a2a_tls_cert` + `a2a_tls_key`.
- The gateway's WebSocket port (wss://): `ws_tls_cert` + `ws_tls_key`. Its Unix socket
  stays plain: it is local, and only its owner may open it (0600).
- The core's own clients (a gateway, the dashboard) dial it with TLS when they know whom
  to trust: their `core_ca` (PEM). `car-grpc serve` sets it to the core's own
  certificate unless a CA is named (`Config.for_serve`: right for a self-signed one; a
  certificate issued by a CA needs `--core-ca`).

A certificate must name the address its clients dial (e.g. IP 127.0.0.1 or localhost).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc


def _server_context(cert: Path | None, key: Path | None, what: str) -> ssl.SSLContext | None:
    """A server context holding `cert` and `key` (None: no TLS). Loading them here checks
    them too, so that a bad file fails at start with its name."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError(f"TLS for {what} needs both a certificate and its key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except OSError as e:  # ssl.SSLError included
        raise OSError(f"TLS for {what}: cannot use {cert} with {key}: {e}") from e
    return context


def grpc_server_credentials(cert: Path | None, key: Path | None) -> grpc.ServerCredentials | None:
    """Credentials of the core's gRPC port; None: plaintext."""
    if _server_context(cert, key, "the gRPC port") is None:
        return None
    assert cert is not None and key is not None
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def ws_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server context of the WebSocket TCP listener; None: plaintext."""
    return _server_context(cert, key, "the WebSocket port")


def a2a_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server context of the A2A HTTP listener; None: plaintext."""
    return _server_context(cert, key, "the A2A port")


def core_channel(
    address: str, trust: Path | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A channel to the core at `address`: TLS trusting `trust` (CA certificates, PEM),
    plaintext when None."""
    if trust is None:
        return grpc.aio.insecure_channel(address, options=options)
    try:
        ssl.create_default_context(cafile=trust)  # fails now, with the file's name
    except OSError as e:
        raise OSError(f"TLS to the core: cannot trust {trust}: {e}") from e
    credentials = grpc.ssl_channel_credentials(root_certificates=trust.read_bytes())
    return grpc.aio.secure_channel(address, credentials, options=options)
