"""Security: the auth paths not covered elsewhere, what a refused caller leaves behind,
token files, secrets kept out of logs and error messages, size limits, and listeners that
stay on loopback unless asked.

Covered elsewhere, not repeated here: session.auth in every variant on the stream
(test_auth_e2e), typed-RPC metadata binding (test_typed_rpcs_e2e), the dashboard's login
link, cookie, Origin and Host checks (test_dashboard_http), the 1009 close of an oversized
WebSocket message (test_gateway_e2e).
"""

from __future__ import annotations

import grpc
import pytest

from car_grpc.core.grpc_service import AGENT_ID_KEY
from car_grpc.core.server import Core
from car_grpc.v1 import state_pb2, state_pb2_grpc


def tokens(core: Core) -> tuple[str, str]:
    assert core.state is not None and core.state.tokens is not None
    return core.state.tokens.daemon, core.state.tokens.host


async def test_a_refused_typed_call_leaves_no_session_behind(
    core: Core, channel: grpc.aio.Channel
) -> None:
    """Every unauthenticated call opens a one-call session; refusing it must end it too,
    or anyone could fill the core's memory without a token."""
    assert core.state is not None
    daemon, _ = tokens(core)
    agent = core.state.agent_tokens.add("agent-7")
    before = set(core.state.sessions)
    state = state_pb2_grpc.StateServiceStub(channel)
    for meta in [
        (),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {daemon}x"),),
        (("authorization", f"Bearer {agent}"), (AGENT_ID_KEY, "agent-8")),
        (("authorization", f"Bearer {daemon}"), (AGENT_ID_KEY, "agent-7")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await state.ListStateKeys(state_pb2.ListStateKeysRequest(), metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, meta
        assert set(core.state.sessions) == before, meta
