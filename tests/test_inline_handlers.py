"""Handlers registered `inline` run in a session stream's read loop, so they must never
wait: each one, given a valid request, completes without suspending even once. Requests
that may wait (the approval gate) run as tasks like every other request."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest

from car_grpc.core.session import Role
from car_grpc.v1 import session_pb2
from car_grpc.wire import api, codec
from tests.conftest import make_config
from tests.ws_helpers import running_core

#: A valid request (JSON-RPC params) for every inline member that needs one.
VALID_PARAMS: dict[str, Any] = {
    "session_init": {"tools": [{"name": "t"}], "policies": []},
    "tools_register": [{"name": "t"}],
    "tools_unregister": {"name": "t"},
    "state_get": {"key": "k"},
    "state_set": {"key": "k", "value": {"nested": [1, None]}},
    "state_exists": {"key": "k"},
    "policy_register": {"name": "p", "kind": "deny_tool", "target": "t"},
    "policy_unregister": {"name": "p"},
    "server_handshake": {"protocol_version": 3},
    "host_register_agent": {"id": "a", "name": "A", "kind": "bot"},
    "host_set_status": {"agent_id": "a", "status": "busy"},
    "host_unregister_agent": {"agent_id": "a"},
}


def _request(member: str) -> Any:
    body = getattr(session_pb2.ClientFrame(), member)
    codec.params_to_message(VALID_PARAMS.get(member), body, api.CLIENT_MEMBERS[member].bare_field)
    return body


async def test_the_common_requests_are_inline(tmp_path: Any) -> None:
    async with running_core(make_config(tmp_path, auth=False).core) as core:
        assert core.parts is not None
        inline = core.parts.router.inline
        assert {"tools_list", "state_get", "state_set", "server_handshake"} <= inline
        # ...and the ones that wait on a client, the store or a person are not.
        assert not {"proposal_submit", "runs_record_turns", "agents_chat"} & inline


async def test_every_inline_handler_completes_without_waiting(tmp_path: Any) -> None:
    async with running_core(make_config(tmp_path, auth=False).core) as core:
        assert core.parts is not None
        router = core.parts.router
        session = core.parts.registry.open(streaming=True)
        session.role = Role.HOST
        # The host agent is registered before its status is set, and unregistered last.
        last = ("host_set_status", "host_unregister_agent")
        for member in sorted(router.inline, key=lambda m: (last.index(m) if m in last else -1, m)):
            coro = router.requests[member](session, _request(member))
            assert isinstance(coro, Coroutine)
            try:
                coro.send(None)
            except StopIteration:
                continue
            coro.close()
            pytest.fail(f"inline handler {member} waited")
        await core.parts.registry.close(session)


@pytest.mark.parametrize("approvals", [True, False])
async def test_a_gated_method_is_never_inline(tmp_path: Any, approvals: bool) -> None:
    gated = frozenset({"tools.list"})
    async with running_core(
        make_config(tmp_path, auth=False, gated_methods=gated, approvals=approvals).core
    ) as core:
        assert core.parts is not None
        dispatcher = core.parts.grpc.dispatcher
        # Gated (only while the gate is on) means parked: never in the read loop.
        assert dispatcher.runs_inline("tools_list") is not approvals
        assert dispatcher.runs_inline("state_get")
