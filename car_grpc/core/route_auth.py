"""A2aRouteAuth: the credentials the server presents when it continues an A2A task, and
which A2A endpoints it calls at all (docs/protocol.md §7a).

A credential (`{type: "bearer", token}` or `{type: "header", name, value}`) becomes one
HTTP header. It is held by the server only: `RouteSealer` encrypts it (AES-256-GCM, the
surface id as associated data, so a sealed credential cannot be moved to another surface)
with a key kept beside the token files (`a2ui-route-key`, mode 0600, made at first use
and kept across restarts), and only the sealed bytes reach the store. `RouteAuth` never
shows its value in a repr, so it cannot slip into a log line.

An endpoint must be http(s); a loopback one (127.0.0.0/8, ::1, `localhost`) is trusted,
any other needs the caller's explicit `allowUntrustedEndpoint: true`.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from car_grpc.core.tokens import write_secret
from car_grpc.v1 import a2ui_pb2
from car_grpc.wire.errors import field_error, invalid_params

ROUTE_KEY_FILE = "a2ui-route-key"
#: Longest credential value (token or header value), in characters.
MAX_SECRET = 8 * 1024
MAX_URL = 2048
_NONCE = 12
#: An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
#: Headers a credential may not set: they belong to the request itself.
_RESERVED = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "te"}
)


@dataclass(frozen=True)
class RouteAuth:
    """One credential as the header it becomes. Its value never appears in a repr."""

    header: str
    value: str = field(repr=False)

    def headers(self) -> dict[str, str]:
        return {self.header: self.value}

    def to_json(self) -> str:
        return json.dumps({"header": self.header, "value": self.value})


def route_auth_from(given: a2ui_pb2.A2aRouteAuth, name: str = "routeAuth") -> RouteAuth:
    """The credential a request gives; -32602 naming what is wrong (never its value)."""
    if given.type == "bearer":
        if not given.token:
            raise field_error(f"{name}.token")
        value = given.token
        header, value = "Authorization", f"Bearer {value}"
    elif given.type == "header":
        if not given.name or not _HEADER_NAME.fullmatch(given.name):
            raise field_error(f"{name}.name", "not an HTTP header name")
        if given.name.lower() in _RESERVED:
            raise field_error(f"{name}.name", "a header the request itself sets")
        if not given.value:
            raise field_error(f"{name}.value")
        header, value = given.name, given.value
    else:
        raise field_error(f"{name}.type", 'expected "bearer" or "header"')
    if len(value) > MAX_SECRET or any(c in value for c in "\r\n\0"):
        raise field_error(name, f"a credential is one line of at most {MAX_SECRET} characters")
    return RouteAuth(header, value)


class RouteSealer:
    """Seals and opens route credentials with the server's route key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def beside_tokens(cls, token_dir: Path) -> RouteSealer:
        """The sealer of the key in `token_dir`, made (0600) when there is none yet."""
        path = token_dir / ROUTE_KEY_FILE
        try:
            key = base64.urlsafe_b64decode(path.read_text().strip())
        except FileNotFoundError:
            key = AESGCM.generate_key(bit_length=256)
            write_secret(path, base64.urlsafe_b64encode(key).decode())
        else:
            os.chmod(path, 0o600)
        if len(key) != 32:
            raise ValueError(f"{path}: not a 256-bit key")
        return cls(key)

    def seal(self, auth: RouteAuth, surface_id: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, auth.to_json().encode(), surface_id.encode())

    def open(self, sealed: bytes, surface_id: str) -> RouteAuth | None:
        """The credential; None when it was sealed under another key or surface."""
        try:
            plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], surface_id.encode())
        except (InvalidTag, ValueError):
            return None
        data = json.loads(plain)
        return RouteAuth(data["header"], data["value"])


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, *, allow_untrusted: bool, name: str, allow_flag: str) -> str:
    """The endpoint, if the server may call it: http(s) with a host, loopback unless
    `allow_untrusted`; -32602 naming `name` otherwise."""
    if not url:
        raise field_error(name)
    if len(url) > MAX_URL:
        raise field_error(name, f"longer than {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise field_error(name, "not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise field_error(name, "credentials in the URL (use routeAuth)")
    if not is_loopback(parts.hostname) and not allow_untrusted:
        raise invalid_params(
            f"invalid params: {name} {parts.hostname} is not a loopback endpoint:"
            f" set {allow_flag}: true to call it"
        )
    return url
