"""End-to-end: tools, policies, state and session.init over a real Connect stream."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2, state_pb2, tools_pb2
from car_grpc.wire.codec import json_to_message, message_to_json, struct_to_json, value_to_json
from car_grpc.wire.errors import INVALID_PARAMS, CarError
from tests.bounded import bounded
from tests.session_client import SessionClient, connect
from tests.ws_helpers import daemon_token


def msg(cls: type[Any], data: dict[str, Any]) -> Any:
    out = cls()
    json_to_message(data, out)
    return out


async def invalid(client: SessionClient, member: str, message: Any) -> str:
    with pytest.raises(CarError) as err:
        await client.request(member, message)
    assert err.value.code == INVALID_PARAMS
    return err.value.message


async def test_tools_register_list_unregister(client: SessionClient) -> None:
    tools = msg(
        tools_pb2.RegisterToolsRequest,
        {
            "tools": [
                {"name": "zeta", "description": "last", "idempotent": True},
                {"name": "alpha", "parameters": {"type": "object"}, "cache_ttl_secs": 5},
            ]
        },
    )
    assert (await client.request("tools_register", tools)).count == 2
    listed = await client.request("tools_list", tools_pb2.ListToolsRequest())
    assert listed.count == 2
    assert message_to_json(listed)["tools"] == [
        {
            "name": "alpha",
            "description": "",
            "parameters": {"type": "object"},
            "idempotent": False,
            "cache_ttl_secs": 5,
        },
        {"name": "zeta", "description": "last", "parameters": {}, "idempotent": True},
    ]
    # Same name replaces.
    again = msg(tools_pb2.RegisterToolsRequest, {"tools": [{"name": "zeta", "description": "new"}]})
    assert (await client.request("tools_register", again)).count == 1
    listed = await client.request("tools_list", tools_pb2.ListToolsRequest())
    assert [t.description for t in listed.tools] == ["", "new"]

    gone = await client.request("tools_unregister", tools_pb2.UnregisterToolRequest(name="zeta"))
    assert (gone.unregistered, gone.removed) == ("zeta", 1)
    gone = await client.request("tools_unregister", tools_pb2.UnregisterToolRequest(name="zeta"))
    assert gone.removed == 0
    listed = await client.request("tools_list", tools_pb2.ListToolsRequest())
    assert [t.name for t in listed.tools] == ["alpha"]


async def test_tool_params_name_the_field(client: SessionClient) -> None:
    bad = msg(tools_pb2.RegisterToolsRequest, {"tools": [{"name": "ok"}, {"description": "x"}]})
    assert (await invalid(client, "tools_register", bad)).endswith("tools[1].name")
    # Nothing of a rejected batch is registered.
    assert (await client.request("tools_list", tools_pb2.ListToolsRequest())).count == 0
    assert (await invalid(client, "tools_unregister", tools_pb2.UnregisterToolRequest())).endswith(
        "name"
    )


async def test_policies_register_list_unregister_with_rule_alias(client: SessionClient) -> None:
    # car-runtime 0.58 sends the kind as `rule`.
    by_rule = msg(
        state_pb2.RegisterPolicyRequest,
        # The exact params car-runtime sends (its `value` is carried but not used).
        {
            "key": "cmd",
            "name": "p2",
            "pattern": "rm",
            "rule": "deny_tool_param",
            "target": "shell",
        },
    )
    assert (await client.request("policy_register", by_rule)).registered == "p2"
    by_kind = msg(
        state_pb2.RegisterPolicyRequest,
        {"name": "p1", "kind": "deny_tool", "target": "rm"},
    )
    await client.request("policy_register", by_kind)
    listed = await client.request("policy_list", state_pb2.ListPoliciesRequest())
    assert [(p.name, p.kind, p.target, p.key, p.pattern) for p in listed.policies] == [
        ("p1", state_pb2.POLICY_KIND_DENY_TOOL, "rm", "", ""),
        ("p2", state_pb2.POLICY_KIND_DENY_TOOL_PARAM, "shell", "cmd", "rm"),
    ]
    assert not any(p.rule for p in listed.policies)  # folded into kind
    removed = await client.request(
        "policy_unregister", state_pb2.UnregisterPolicyRequest(name="p1")
    )
    assert removed.removed == 1
    removed = await client.request(
        "policy_unregister", state_pb2.UnregisterPolicyRequest(name="p1")
    )
    assert removed.removed == 0


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"kind": "deny_tool", "target": "x"}, "name"),
        ({"name": "p", "target": "x"}, "kind"),
        ({"name": "p", "kind": "deny_tool"}, "target"),
        ({"name": "p", "kind": "deny_tool_param", "target": "x", "pattern": "y"}, "key"),
        ({"name": "p", "kind": "deny_tool_param", "target": "x", "key": "y"}, "pattern"),
        ({"name": "p", "kind": "deny_tool", "rule": "require_state", "target": "x"}, "rule"),
    ],
)
async def test_policy_params_name_the_field(
    client: SessionClient, policy: dict[str, Any], field: str
) -> None:
    req = msg(state_pb2.RegisterPolicyRequest, policy)  # inline: the policy is the params
    assert (await invalid(client, "policy_register", req)).endswith(f": {field}")


async def test_state_get_set_exists_keys_snapshot(client: SessionClient) -> None:
    for key, value in [("b", {"nested": [1, "two", None]}), ("a", 3), ("n", None)]:
        req = msg(state_pb2.SetStateRequest, {"key": key, "value": value})
        assert (await client.request("state_set", req)).ok
    got = await client.request("state_get", state_pb2.GetStateRequest(key="b"))
    assert value_to_json(got.value) == {"nested": [1, "two", None]}
    missing = await client.request("state_get", state_pb2.GetStateRequest(key="zz"))
    assert missing.value.WhichOneof("kind") == "null_value"
    exists = await client.request("state_exists", state_pb2.StateExistsRequest(key="n"))
    assert exists.exists
    exists = await client.request("state_exists", state_pb2.StateExistsRequest(key="zz"))
    assert not exists.exists
    keys = await client.request("state_keys", state_pb2.ListStateKeysRequest())
    assert list(keys.keys) == ["a", "b", "n"]
    snap = await client.request("state_snapshot", state_pb2.SnapshotStateRequest())
    assert struct_to_json(snap.state) == {"a": 3, "b": {"nested": [1, "two", None]}, "n": None}


async def test_state_params_name_the_field(client: SessionClient) -> None:
    assert (await invalid(client, "state_get", state_pb2.GetStateRequest())).endswith("key")
    no_value = state_pb2.SetStateRequest(key="k")
    assert (await invalid(client, "state_set", no_value)).endswith("value")
    assert (await invalid(client, "state_exists", state_pb2.StateExistsRequest())).endswith("key")


async def test_state_is_per_session(core: Core, channel: grpc.aio.Channel) -> None:
    one = await connect(channel, token=daemon_token(core))
    two = await connect(channel, token=daemon_token(core))
    await one.request("state_set", msg(state_pb2.SetStateRequest, {"key": "k", "value": 1}))
    exists = await two.request("state_exists", state_pb2.StateExistsRequest(key="k"))
    assert not exists.exists
    await one.close()
    await two.close()


async def test_session_init_registers_tools_and_policies(client: SessionClient) -> None:
    req = msg(
        session_pb2.InitSessionRequest,
        {
            "tools": [{"name": "a"}, {"name": "b"}],
            "policies": [{"name": "p", "rule": "require_state", "target": "login"}],
        },
    )
    reply = await client.request("session_init", req)
    assert (reply.tools_registered, reply.policies_registered) == (2, 1)
    assert reply.session_id
    assert (await client.request("tools_list", tools_pb2.ListToolsRequest())).count == 2
    policies = await client.request("policy_list", state_pb2.ListPoliciesRequest())
    assert policies.policies[0].kind == state_pb2.POLICY_KIND_REQUIRE_STATE

    bad = msg(session_pb2.InitSessionRequest, {"policies": [{"name": "q"}]})
    assert (await invalid(client, "session_init", bad)).endswith("policies[0].kind")


async def test_session_state_is_released_on_close(core: Core, channel: grpc.aio.Channel) -> None:
    client = await connect(channel, token=daemon_token(core))
    init = msg(session_pb2.InitSessionRequest, {"tools": [{"name": "a"}]})
    session_id = (await client.request("session_init", init)).session_id
    assert core.parts is not None and session_id in core.parts.registry.sessions
    session = core.parts.registry.sessions[session_id]
    await client.request("state_set", msg(state_pb2.SetStateRequest, {"key": "k", "value": 1}))
    await client.close()
    await bounded(session.closed.wait())
    assert session_id not in core.parts.registry.sessions
    assert not session.tools and not session.kv
