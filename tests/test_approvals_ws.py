"""Host events, approvals and the gate over the WebSocket gateway: a real core and gateway
on loopback, `websockets` clients speaking JSON-RPC, and the official `car-runtime`
client submitting a gated proposal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.wire.errors import APPROVAL_DENIED, HANDSHAKE_REQUIRED, INVALID_PARAMS
from tests.conftest import make_config
from tests.processes import cli_env, launch
from tests.ws_helpers import Rpc, daemon_token, rpc, running

JSON = Any
GATED_SCRIPT = Path(__file__).with_name("car_runtime_gated.py")


@contextlib.asynccontextmanager
async def peer(core: Core, gateway: Gateway, handshake: bool = True) -> AsyncIterator[Rpc]:
    """A session with the daemon token (after the handshake, unless not `handshake`)."""
    async with rpc(gateway.url) as client:
        if handshake:
            await client.login(daemon_token(core))
        else:
            await client.result("session.auth", {"token": daemon_token(core)})
        yield client


async def host_event(client: Rpc, kind: str) -> JSON:
    """The params of the first host.event of that kind (the others stay queued)."""
    return await client.next_notification("host.event", where={"kind": kind})


async def test_host_events_and_ownership_over_websocket(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (core, gateway):
        async with peer(core, gateway, handshake=False) as early:
            refused = await early.call("host.subscribe", {})
            assert refused["error"]["code"] == HANDSHAKE_REQUIRED
        async with peer(core, gateway) as host, peer(core, gateway) as owner:
            snapshot = await host.result("host.subscribe", {})
            assert snapshot == {"subscribed": True, "agents": [], "approvals": [], "events": []}
            agent = await owner.result(
                "host.register_agent",
                {"id": "a1", "name": "Writer", "kind": "assistant", "capabilities": ["write"]},
            )
            assert agent["id"] == "a1" and agent["status"] == "registered"
            event = await host_event(host, "agent.registered")
            assert event["sequence"] == 1 and event["agent_id"] == "a1"
            assert event["payload"]["capabilities"] == ["write"]
            assert set(event) == {"id", "sequence", "timestamp", "kind", "agent_id", "payload"}

            refused = await host.call("host.set_status", {"agent_id": "a1", "status": "busy"})
            assert refused["error"]["code"] == INVALID_PARAMS
            assert refused["error"]["message"] == "agent 'a1' is owned by another session"
            updated = await owner.result(
                "host.set_status", {"agent_id": "a1", "status": "busy", "message": "m", "eta": 3}
            )
            assert updated["status"] == "busy" and updated["metadata"] == {"eta": 3}
            changed = await host_event(host, "agent.status_changed")
            assert (changed["sequence"], changed["message"]) == (2, "m")
            assert await owner.result("host.unregister_agent", {"agent_id": "a1"}) == {"ok": True}
            assert (await host_event(host, "agent.unregistered"))["sequence"] == 3
            assert await host.result("host.agents", {}) == {"agents": []}


async def test_a_gated_call_over_websocket_is_approved_or_denied(tmp_path: Path) -> None:
    config = make_config(tmp_path, gated_methods=frozenset({"host.register_agent"}))
    async with (
        running(config) as (core, gateway),
        peer(core, gateway) as caller,
        peer(core, gateway) as person,
    ):
        await person.result("host.subscribe", {})
        params = {"id": "a1", "name": "Writer", "kind": "assistant"}
        parked = asyncio.create_task(caller.call("host.register_agent", params))
        requested = await host_event(person, "approval.requested")
        approval = requested["payload"]
        assert requested["message"] == approval["action"] == "ws.method:host.register_agent"
        assert approval["status"] == "pending" and "client_id" not in approval
        assert approval["options"] == ["approve", "deny"]
        assert approval["details"]["method"] == "host.register_agent"
        assert json.loads(approval["details"]["params_preview"])["name"] == "Writer"
        # Not gated, so not delayed by the parked call on the same connection.
        assert await caller.result("host.agents", {}) == {"agents": []}

        resolved = await person.result(
            "host.resolve_approval", {"approval_id": approval["id"], "approved": True}
        )
        assert resolved["status"] == "approved" and resolved["resolved_at"] > 0
        assert (await parked)["result"]["id"] == "a1"

        parked = asyncio.create_task(caller.call("host.register_agent", params | {"id": "a2"}))
        approval = (await host_event(person, "approval.requested"))["payload"]
        await person.result(
            "host.resolve_approval",
            {"approval_id": approval["id"], "approved": False, "notes": "not now"},
        )
        denied = await parked
        assert denied["error"] == {
            "code": APPROVAL_DENIED,
            "message": "approval denied: host.register_agent: not now",
        }
        # The connection stays open.
        assert [a["id"] for a in (await caller.result("host.agents", {}))["agents"]] == ["a1"]
        listed = (await person.result("host.approvals", {}))["approvals"]
        assert [a["status"] for a in listed] == ["denied", "approved"]


async def test_car_runtime_tools_run_only_after_the_gate_approves(tmp_path: Path) -> None:
    config = make_config(tmp_path, gated_methods=frozenset({"proposal.submit"}))
    async with running(config) as (core, gateway), peer(core, gateway) as person:
        await person.result("host.subscribe", {})
        env = cli_env(
            CAR_DAEMON_URL=gateway.url,
            CAR_AUTH_TOKEN=daemon_token(core),
            CAR_NO_VERSION_WARNING="1",
        )
        for approved in (True, False):
            async with launch([sys.executable, str(GATED_SCRIPT)], env=env, stdout=True) as proc:
                approval = (await host_event(person, "approval.requested"))["payload"]
                assert approval["action"] == "ws.method:proposal.submit"
                await person.result(
                    "host.resolve_approval", {"approval_id": approval["id"], "approved": approved}
                )
                code, out = await proc.output(30)
            assert code == 0, proc.log
            *_, last = out.splitlines()
            seen = json.loads(last)
            if approved:
                (action,) = seen["result"]["results"]
                # When the tool ran, the ledger already had the gate's approval approved.
                assert action["output"] == {"params": {"a": 1}, "gate": ["approved"]}
            else:  # the tool never ran; car-runtime raises the -32003 as a RuntimeError
                assert seen == {
                    "raised": "RuntimeError",
                    "message": f"{APPROVAL_DENIED} approval denied: proposal.submit",
                }
