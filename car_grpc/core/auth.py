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
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from car_grpc.store.sqlite import SqliteStore

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
    def mint(cls, token_dir: Path) -> ServerTokens:
        tokens = cls(mint_token(), mint_token(), token_dir)
        write_secret(token_dir / AUTH_TOKEN_FILE, tokens.daemon)
        write_secret(token_dir / HOST_TOKEN_FILE, tokens.host)
        return tokens

    def remove_files(self) -> None:
        """Remove the token files, if they are still ours."""
        for name, value in ((AUTH_TOKEN_FILE, self.daemon), (HOST_TOKEN_FILE, self.host)):
            path = self.token_dir / name
            try:
                if path.read_text() == value:
                    path.unlink()
            except OSError:
                pass

    def is_daemon(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.daemon.encode())

    def is_host(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.host.encode())


class AgentTokens:
    """Per-agent tokens in the store."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def add(self, agent_id: str) -> str:
        """Mint (or replace) the token of `agent_id`; returns it. It is shown only once."""
        token = mint_token()
        digest = _digest(token)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO agent_tokens(agent_id, token_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(agent_id) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (agent_id, digest, int(time.time() * 1000)),
            )

        self.store.run_sync(insert)
        return token

    def remove(self, agent_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM agent_tokens WHERE agent_id = ?", (agent_id,))
            return cur.rowcount > 0

        return self.store.run_sync(delete)

    def list(self) -> list[tuple[str, int]]:
        """(agent_id, created_at ms) of every agent with a token, sorted by id."""

        def select(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            rows = conn.execute(
                "SELECT agent_id, created_at FROM agent_tokens ORDER BY agent_id"
            ).fetchall()
            return [(str(a), int(c)) for a, c in rows]

        return self.store.run_sync(select)

    async def verify(self, agent_id: str, token: str) -> bool:
        """Whether `token` is the current token of `agent_id` (constant-time)."""

        def select(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT token_hash FROM agent_tokens WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            return bytes(row[0]) if row else None

        stored = await self.store.run(select)
        # Compare against a dummy digest when unknown so timing says nothing either way.
        return hmac.compare_digest(_digest(token), stored or b"\0" * 32) and stored is not None
