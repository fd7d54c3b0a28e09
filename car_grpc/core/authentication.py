"""session.auth and server.handshake (docs/protocol.md §2)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from car_grpc.config import CAPABILITIES, PROTOCOL_VERSIONS, SERVER_VERSION
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession, Role
from car_grpc.core.tokens import AgentTokens, ServerTokens
from car_grpc.v1 import session_pb2
from car_grpc.wire.errors import CAPABILITY_MISMATCH, INTERNAL, PROTOCOL_VERSION_MISMATCH, CarError

TOKEN_MISMATCH = "auth failed: token mismatch"


class Authentication:
    """session.auth and server.handshake: proves a session's role and negotiates its
    protocol. The typed RPCs authenticate their one-call sessions through `authenticate`."""

    def __init__(
        self, tokens: ServerTokens | None, agent_tokens: AgentTokens, registry: SessionRegistry
    ) -> None:
        #: None when auth is off.
        self.tokens = tokens
        self.agent_tokens = agent_tokens
        self._registry = registry
        #: In a cluster: re-reads the other cores' token digests (a core that joined
        #: since the last renewal), before a daemon or host token is refused.
        self.refresh_peers: Callable[[], Awaitable[object]] | None = None

    async def _accepted(self, check: Callable[[str], bool], token: str) -> bool:
        if check(token):
            return True
        if self.refresh_peers is None:
            return False
        await self.refresh_peers()
        return check(token)

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    async def authenticate(
        self,
        session: ClientSession,
        *,
        token: str = "",
        host_token: str = "",
        agent_id: str = "",
    ) -> None:
        """Authenticate `session` with one credential variant, or raise -32603 token mismatch."""
        tokens = self.tokens
        if tokens is None:  # auth off: any params succeed
            session.role = Role.DAEMON
            if agent_id:
                await self._registry.attach(session, agent_id)
            return
        if host_token:
            if not await self._accepted(tokens.is_host, host_token):
                raise CarError(INTERNAL, TOKEN_MISMATCH)
            session.role = Role.HOST
            session.credential = ("host", host_token)
        elif token and agent_id:
            if not await self.agent_tokens.verify(agent_id, token):
                raise CarError(INTERNAL, TOKEN_MISMATCH)
            session.credential = ("agent:" + agent_id, token)
            await self._registry.attach(session, agent_id)
        elif token:
            if not await self._accepted(tokens.is_daemon, token):
                raise CarError(INTERNAL, TOKEN_MISMATCH)
            session.role = Role.DAEMON
            session.credential = ("daemon", token)
        else:
            raise CarError(INTERNAL, "auth failed: no token given")

    @handles("session_auth")
    async def session_auth(
        self, session: ClientSession, req: session_pb2.AuthenticateRequest
    ) -> session_pb2.AuthenticateResponse:
        await self.authenticate(
            session, token=req.token, host_token=req.host_token, agent_id=req.agent_id
        )
        if req.HasField("memory_namespace"):
            session.memory_namespace = req.memory_namespace
        reply = session_pb2.AuthenticateResponse(
            ok=True, auth_enabled=self.enabled, session_id=session.id, role_enum=session.role.value
        )
        if not self.enabled:
            return reply
        if session.agent_id:
            reply.agent_id = session.agent_id
        if session.role is Role.HOST:
            reply.role = "host"
        if session.memory_namespace is not None:
            reply.memory_namespace = session.memory_namespace
        return reply

    @handles("server_handshake", inline=True)
    async def server_handshake(
        self, session: ClientSession, req: session_pb2.HandshakeRequest
    ) -> session_pb2.HandshakeResponse:
        version = _protocol_version(req)
        missing = sorted(set(req.required_capabilities) - CAPABILITIES)
        if missing:
            raise CarError(
                CAPABILITY_MISMATCH,
                f"protocol capability mismatch: unsupported required capabilities: "
                f"{', '.join(missing)}",
            )
        requested = set(req.required_capabilities) | set(req.optional_capabilities)
        negotiated = sorted(requested & CAPABILITIES)
        session.protocol_version = version
        session.capabilities = frozenset(negotiated)
        return session_pb2.HandshakeResponse(
            protocol_version=version,
            server_version=SERVER_VERSION,
            client_protocol_version=version,
            client_version=req.client_version,
            negotiated_capabilities=negotiated,
        )


def _protocol_version(req: session_pb2.HandshakeRequest) -> int:
    value = req.protocol_version
    kind = value.WhichOneof("kind") if req.HasField("protocol_version") else None
    if kind != "number_value" or not value.number_value.is_integer():
        shown = "missing" if kind is None else "not a number"
        raise CarError(
            PROTOCOL_VERSION_MISMATCH,
            f"protocol version mismatch: protocol_version is {shown}; "
            f"this server speaks {_versions()}",
        )
    version = int(value.number_value)
    if version not in PROTOCOL_VERSIONS:
        raise CarError(
            PROTOCOL_VERSION_MISMATCH,
            f"protocol version mismatch: client speaks {version}, server speaks {_versions()}",
        )
    return version


def _versions() -> str:
    return " and ".join(str(v) for v in sorted(PROTOCOL_VERSIONS))
