"""Handlers registered `inline` run in a session stream's read loop, so they must never
wait: each one, given a valid request, completes without suspending even once. Requests
that may wait (the approval gate) run as tasks like every other request."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest

from car_grpc import api, codec
from car_grpc.core import dispatch
from car_grpc.core.server import Core
from car_grpc.core.session import Role
from car_grpc.v1 import session_pb2
from tests.conftest import make_config

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


def test_the_common_requests_are_inline() -> None:
    assert {"tools_list", "state_get", "state_set", "server_handshake"} <= dispatch.INLINE
    # ...and the ones that wait on a client, the store or a person are not.
    assert not {"proposal_submit", "runs_record_turns", "agents_chat"} & dispatch.INLINE


async def test_every_inline_handler_completes_without_waiting(tmp_path: Any) -> None:
    core = Core(make_config(tmp_path, auth=False))
    await core.start()
    try:
        assert core.state is not None
        session = core.state.open_session(streaming=True)
        session.role = Role.HOST
        # The host agent is registered before its status is set, and unregistered last.
        last = ("host_set_status", "host_unregister_agent")
        for member in sorted(
            dispatch.INLINE, key=lambda m: (last.index(m) if m in last else -1, m)
        ):
            coro = dispatch.HANDLERS[member](session, _request(member))
            assert isinstance(coro, Coroutine)
            try:
                coro.send(None)
            except StopIteration:
                continue
            coro.close()
            pytest.fail(f"inline handler {member} waited")
        await core.state.close_session(session)
    finally:
        await core.stop(grace=0)


async def test_a_gated_method_is_never_inline(tmp_path: Any) -> None:
    config = make_config(tmp_path, auth=False, gated_methods=frozenset({"tools.list"}))
    core = Core(config)
    await core.start()
    try:
        assert core.state is not None
        session = core.state.open_session(streaming=True)
        assert not dispatch.runs_inline(session, "tools_list")
        assert dispatch.runs_inline(session, "state_get")
        config.approvals = False
        assert dispatch.runs_inline(session, "tools_list")
        await core.state.close_session(session)
    finally:
        await core.stop(grace=0)
