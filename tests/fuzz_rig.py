"""The server the fuzz tests attack, and what they check after every example.

A real core and WebSocket gateway on loopback (auth on, every wait configured short so that
no example can park for long), plus two sessions that must outlive any hostile input:

- the holder, attached as FUZZ_AGENT over gRPC, owns the open run FUZZ_RUN (so that fuzzed
  runs.* calls reach past "unknown run");
- the bystander, a host-role WebSocket client subscribed to host events (so every event
  the fuzzing causes fans out to it), which must answer a round trip after every example.

`Rig.settle()` is the check after each example: the sessions it opened have ended and
nothing of them is left (the core holds exactly the baseline sessions, no attachment
points at a closed session), the bystander is served, and nothing was logged at ERROR by
car_grpc (a handler, hook or connection task that raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.core.wiring import CoreParts
from car_grpc.gateway import Gateway
from car_grpc.v1 import runs_pb2
from car_grpc.wire.errors import (
    APPROVAL_DENIED,
    AUTH_REQUIRED,
    CAPABILITY_MISMATCH,
    DEADLINE_EXCEEDED,
    HANDSHAKE_REQUIRED,
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PROTOCOL_VERSION_MISMATCH,
)
from tests.conftest import make_config
from tests.fuzz_strategies import FUZZ_AGENT, FUZZ_RUN
from tests.session_client import connect
from tests.ws_helpers import Rpc, rpc, running

#: docs/protocol.md §8.
DOCUMENTED = frozenset(
    {
        PARSE_ERROR,
        INVALID_REQUEST,
        METHOD_NOT_FOUND,
        INVALID_PARAMS,
        INTERNAL,
        AUTH_REQUIRED,
        APPROVAL_DENIED,
        DEADLINE_EXCEEDED,
        HANDSHAKE_REQUIRED,
        PROTOCOL_VERSION_MISMATCH,
        CAPABILITY_MISMATCH,
    }
)
#: What a known method may fail with once the session is authenticated.
HANDLER_ERRORS = DOCUMENTED - {PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, AUTH_REQUIRED}
#: Longest any one example may take before it counts as a hang.
EXAMPLE_TIMEOUT = 10.0


def fuzz_config(root: Path) -> Config:
    """Auth on; every wait short (a fuzzed proposal that retries, a chat nobody acks, a
    gated call nobody approves all end well within EXAMPLE_TIMEOUT)."""
    return make_config(
        root,
        tool_timeout=0.5,
        callback_grace=0.1,
        # Not shorter: the rig's own runs.start (a store write) ran past 1 s on a loaded
        # machine; what a fuzzed handler waits for is bounded by the shorter waits here.
        handler_timeout=5.0,
        approval_timeout=0.05,
        gated_methods=frozenset({"policy.unregister"}),
        chat_ack_timeout=0.2,
        chat_stall_timeout=0.5,
        voice_ack_timeout=0.2,
        voice_stall_timeout=0.5,
        run_complete_grace=0.01,
    )


class ErrorLog(logging.Handler):
    """Collects ERROR records of the car_grpc loggers: each one is a bug the fuzzer found."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        found = [self.format(r) for r in self.records]
        self.records.clear()
        return found


@dataclass
class Rig:
    core: Core
    gateway: Gateway
    state: CoreParts
    channel: grpc.aio.Channel
    bystander: Rpc
    errors: ErrorLog
    #: The token of FUZZ_AGENT (the holder's; fuzzing sessions attach with it too).
    agent_token: str
    #: Session ids alive before any example: the holder's and the bystander's.
    baseline: frozenset[str] = frozenset()
    _round: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def daemon_token(self) -> str:
        assert self.state.tokens is not None
        return self.state.tokens.daemon

    @property
    def host_token(self) -> str:
        assert self.state.tokens is not None
        return self.state.tokens.host

    def credentials(self, role: str) -> dict[str, str]:
        """session.auth params of a role: "daemon", "host" or "agent" (FUZZ_AGENT)."""
        if role == "host":
            return {"host_token": self.host_token}
        if role == "agent":
            return {"token": self.agent_token, "agent_id": FUZZ_AGENT}
        return {"token": self.daemon_token}

    async def settle(self) -> None:
        """After an example (its connections closed by the client): every session it opened
        ends without a trace, the bystander is served, and nothing raised in the server."""
        left = [s for s in self.state.registry.sessions.values() if s.id not in self.baseline]
        try:
            async with asyncio.timeout(EXAMPLE_TIMEOUT):
                for session in left:
                    await session.closed.wait()
        except TimeoutError:
            still = [s for s in left if not s.closed.is_set()]
            raise AssertionError(f"sessions that never closed: {still}") from None
        assert set(self.state.registry.sessions) == self.baseline
        for agent_id, session in self.state.registry.attached.items():
            assert session.id in self.state.registry.sessions, (
                f"{agent_id} attached to a dead session"
            )
        await self.check_bystander()
        errors = self.errors.take()
        assert not errors, "the server logged errors:\n" + "\n".join(errors)

    async def check_bystander(self) -> None:
        n = next(self._round)
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            await self.bystander.result("state.set", {"key": "round", "value": n})
            assert await self.bystander.result("state.get", {"key": "round"}) == n
        # Host events the example caused: each was strict JSON (no NaN or Infinity, which
        # JSON cannot carry and strict parsers such as car-runtime's refuse).
        for frame in self.bystander.other:
            assert _finite(frame), f"the bystander got a frame that is not JSON: {frame}"
        self.bystander.other.clear()


def strict_json(data: str | bytes) -> Any:
    """json.loads without NaN/Infinity. Raises ValueError for anything that is not JSON."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(data, parse_constant=constant)
    except RecursionError as e:
        raise ValueError("too deep") from e


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@contextlib.asynccontextmanager
async def rig(root: Path, config: Config | None = None) -> AsyncIterator[Rig]:
    errors = ErrorLog()
    errors.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("car_grpc")
    logger.addHandler(errors)
    try:
        async with (
            running(config or fuzz_config(root)) as (core, gateway),
            grpc.aio.insecure_channel(core.grpc_address) as channel,
            rpc(gateway.url) as bystander,
        ):
            state = core.parts
            assert state is not None and state.tokens is not None
            agent_token = await state.agent_tokens.add(FUZZ_AGENT)
            holder = await connect(channel, token=agent_token, agent_id=FUZZ_AGENT)
            start = runs_pb2.StartRunRequest(intent="be fuzzed", idempotency_key=FUZZ_RUN)
            await holder.request("runs_start", start)
            await bystander.result("session.auth", {"host_token": state.tokens.host})
            await bystander.result("server.handshake", {"protocol_version": 3})
            await bystander.result("host.subscribe", {})
            the_rig = Rig(core, gateway, state, channel, bystander, errors, agent_token)
            the_rig.baseline = frozenset(state.registry.sessions)
            try:
                yield the_rig
            finally:
                await holder.close()
    finally:
        logger.removeHandler(errors)
