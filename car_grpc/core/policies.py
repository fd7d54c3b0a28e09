"""policy.register/unregister/list (docs/protocol.md §3): the session's policies.

A policy is validated and normalised when registered: car-runtime 0.58 sends its kind as
`rule`, so `rule` is accepted as an alias of `kind` and folded into it. What a policy
rejects is decided by the executor (proposals.policy_denial).
"""

from __future__ import annotations

from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession
from car_grpc.v1 import state_pb2
from car_grpc.wire.errors import field_error, require

Kind = state_pb2.PolicyKind


def checked_policy(
    policy: state_pb2.PolicyDefinition, path: str = ""
) -> state_pb2.PolicyDefinition:
    """A copy of `policy` with its kind in `kind` (never `rule`), or -32602 naming the field
    (under `path`, e.g. `policies[2].`)."""
    require(policy.name, f"{path}name")
    if policy.kind and policy.rule and policy.kind != policy.rule:
        raise field_error(f"{path}rule", "conflicts with kind")
    kind = policy.kind or policy.rule
    if kind == Kind.POLICY_KIND_UNSPECIFIED:
        raise field_error(f"{path}kind")
    require(policy.target, f"{path}target")
    if kind == Kind.POLICY_KIND_DENY_TOOL_PARAM:
        require(policy.key, f"{path}key")
        require(policy.pattern, f"{path}pattern")
    out = state_pb2.PolicyDefinition()
    out.CopyFrom(policy)
    out.kind = kind
    out.ClearField("rule")
    return out


class Policies:
    """policy.register/unregister/list: each acts on the caller's session only."""

    @handles("policy_register", inline=True)
    async def policy_register(
        self, session: ClientSession, req: state_pb2.RegisterPolicyRequest
    ) -> state_pb2.RegisterPolicyResponse:
        policy = checked_policy(req.policy)
        session.policies[policy.name] = policy
        return state_pb2.RegisterPolicyResponse(registered=policy.name)

    @handles("policy_unregister", inline=True)
    async def policy_unregister(
        self, session: ClientSession, req: state_pb2.UnregisterPolicyRequest
    ) -> state_pb2.UnregisterPolicyResponse:
        removed = session.policies.pop(require(req.name, "name"), None) is not None
        return state_pb2.UnregisterPolicyResponse(removed=int(removed))

    @handles("policy_list", inline=True)
    async def policy_list(
        self, session: ClientSession, req: state_pb2.ListPoliciesRequest
    ) -> state_pb2.ListPoliciesResponse:
        return state_pb2.ListPoliciesResponse(
            policies=[session.policies[name] for name in sorted(session.policies)]
        )
