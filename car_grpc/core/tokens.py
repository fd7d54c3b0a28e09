"""Tokens: the daemon token, the host token, and per-agent tokens (docs/protocol.md §2).

The daemon and host tokens are minted at start (32 random bytes, base64url without
padding: 43 characters) and written 0600 to the token directory, where car-runtime finds
them; they are removed on graceful shutdown. Agent tokens are minted by the operator
(`car-grpc agents add <id>`) and stored in the store as SHA-256 digests, so they survive
restarts and take effect at once on a running server. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from car_grpc.clock import now_ms
from car_grpc.store.repositories import AgentTokenRow, AgentTokenStore

AUTH_TOKEN_FILE = "auth-token"
HOST_TOKEN_FILE = "host-token"


def mint_token() -> str:
    """32 random bytes, base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def write_secret(path: Path, value: str) -> None:
    """Write a secret file readable by its owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class ServerTokens:
    """The tokens of one running server, and where their files are."""

    daemon: str
    host: str
    token_dir: Path

    @classmethod
    def mint(cls, token_dir: Path, *, write: bool = True) -> ServerTokens:
        """New tokens, written to their files unless `write` is False (then `write_files`
        writes them: the core does once it serves, so a client that reads a file finds
        the token of a core that answers)."""
        tokens = cls(mint_token(), mint_token(), token_dir)
        if write:
            tokens.write_files()
        return tokens

    def write_files(self) -> None:
        write_secret(self.token_dir / AUTH_TOKEN_FILE, self.daemon)
        write_secret(self.token_dir / HOST_TOKEN_FILE, self.host)

    def remove_files(self) -> None:
        """Remove the token files, if they are still ours."""
        for name, value in ((AUTH_TOKEN_FILE, self.daemon), (HOST_TOKEN_FILE, self.host)):
            path = self.token_dir / name
            try:
                if path.read_text() == value:
                    path.unlink()
            except OSError:
                pass

    #: In a cluster: digests of the other live cores' daemon and host tokens, accepted
    #: here as theirs are there (a client behind a load balancer may reach any core).
    peer_daemons: tuple[bytes, ...] = ()
    peer_hosts: tuple[bytes, ...] = ()

    @property
    def digests(self) -> tuple[bytes, bytes]:
        """(daemon, host) token digests, for the other cores of a cluster."""
        return _digest(self.daemon), _digest(self.host)

    def is_daemon(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.daemon.encode()) or _any_digest(
            token, self.peer_daemons
        )

    def is_host(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.host.encode()) or _any_digest(
            token, self.peer_hosts
        )


def _any_digest(token: str, digests: tuple[bytes, ...]) -> bool:
    if not digests:
        return False
    mine = _digest(token)
    return any([hmac.compare_digest(mine, d) for d in digests])  # every one compared


class AgentTokens:
    """Per-agent tokens: minted here, kept in the store as digests, compared here."""

    def __init__(self, store: AgentTokenStore) -> None:
        self.store = store

    async def add(self, agent_id: str) -> str:
        """Mint (or replace) the token of `agent_id`; returns it. It is shown only once."""
        token = mint_token()
        await self.store.put(agent_id, _digest(token), now_ms())
        return token

    async def remove(self, agent_id: str) -> bool:
        return await self.store.remove(agent_id)

    async def list(self) -> list[AgentTokenRow]:
        """Every agent with a token (and when it was minted), sorted by id."""
        return await self.store.list_all()

    async def verify(self, agent_id: str, token: str) -> bool:
        """Whether `token` is the current token of `agent_id` (constant-time)."""
        stored = await self.store.digest(agent_id)
        # Compare against a dummy digest when unknown so timing says nothing either way.
        return hmac.compare_digest(_digest(token), stored or b"\0" * 32) and stored is not None
