"""The A2A callers: a bearer token minted per caller by the operator
(`car-grpc a2a-clients add NAME`), kept in the store as a SHA-256 digest like agent tokens
(car_grpc.core.tokens), and looked up by that digest on every A2A request."""

from __future__ import annotations

import hashlib

from car_grpc.clock import now_ms
from car_grpc.core.tokens import mint_token
from car_grpc.store.repositories import A2aClientRow, A2aClientStore

#: Longest bearer token looked at (ours are 43 characters); anything longer is no token.
MAX_TOKEN_CHARS = 256


class A2aCallers:
    def __init__(self, store: A2aClientStore) -> None:
        self.store = store

    async def add(self, name: str) -> str:
        """Mint (or replace) the token of caller `name`; returns it. It is shown only once."""
        if not name.strip():
            raise ValueError("an A2A caller needs a name")
        token = mint_token()
        await self.store.put(name, _digest(token), now_ms())
        return token

    async def remove(self, name: str) -> bool:
        return await self.store.remove(name)

    async def list(self) -> list[A2aClientRow]:
        return await self.store.list_all()

    async def identify(self, authorization: str) -> str | None:
        """The caller whose token an `Authorization: Bearer ...` value carries; None for a
        missing, malformed or unknown one."""
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            return None
        return await self.store.find(_digest(token))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
