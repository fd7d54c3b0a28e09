"""Host events, approvals and the gate over the WebSocket gateway: a real core and gateway
on loopback, `websockets` clients speaking JSON-RPC, and the official `car-runtime`
client submitting a gated proposal."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.wire.errors import APPROVAL_DENIED, HANDSHAKE_REQUIRED, INVALID_PARAMS
from tests.conftest import make_config
from tests.ws_helpers import daemon_token, running

JSON = Any
GATED_SCRIPT = Path(__file__).with_name("car_runtime_gated.py")


class Peer:
    """A JSON-RPC client on one WebSocket that matches answers by id and queues the
    notifications, so that host events may arrive between a request and its answer."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[JSON]] = {}
        self.notifications: asyncio.Queue[JSON] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                message = json.loads(raw)
                waiter = None if "method" in message else self._waiting.pop(message["id"], None)
                if waiter is not None:
                    waiter.set_result(message)
                else:
                    await self.notifications.put(message)

    async def call(self, method: str, params: JSON = None) -> JSON:
        """The whole answer object (result or error)."""
        request_id = next(self._ids)
        waiter: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        request = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        await self.ws.send(json.dumps(request))
        return await asyncio.wait_for(waiter, 10)

    async def result(self, method: str, params: JSON = None) -> JSON:
        answer = await self.call(method, params)
        assert "result" in answer, answer
        return answer["result"]

    async def event(self, kind: str) -> JSON:
        """The params of the next host.event of that kind."""
        while True:
            message = await asyncio.wait_for(self.notifications.get(), 5)
            if message["method"] == "host.event" and message["params"]["kind"] == kind:
                return message["params"]


@contextlib.asynccontextmanager
async def peer(core: Core, gateway: Gateway, handshake: bool = True) -> AsyncIterator[Peer]:
    async with connect(gateway.url, ping_interval=None) as ws:
        client = Peer(ws)
        await client.result("session.auth", {"token": daemon_token(core)})
        if handshake:
            await client.result("server.handshake", {"protocol_version": 3})
        yield client


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
            event = await host.event("agent.registered")
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
            changed = await host.event("agent.status_changed")
            assert (changed["sequence"], changed["message"]) == (2, "m")
            assert await owner.result("host.unregister_agent", {"agent_id": "a1"}) == {"ok": True}
            assert (await host.event("agent.unregistered"))["sequence"] == 3
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
        requested = await person.event("approval.requested")
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
        approval = (await person.event("approval.requested"))["payload"]
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
        env |= {
            "CAR_DAEMON_URL": gateway.url,
            "CAR_AUTH_TOKEN": daemon_token(core),
            "CAR_NO_VERSION_WARNING": "1",
        }
        for approved in (True, False):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(GATED_SCRIPT),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                approval = (await person.event("approval.requested"))["payload"]
                assert approval["action"] == "ws.method:proposal.submit"
                await person.result(
                    "host.resolve_approval", {"approval_id": approval["id"], "approved": approved}
                )
                out, err = await asyncio.wait_for(proc.communicate(), 30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, err.decode()
            *_, last = out.decode().splitlines()
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
