"""A2aRouteAuth and outbound A2A end to end, against software nobody here wrote: the remote
agent is an a2a-sdk server running its own AgentExecutor (tests/a2a_remote_agent.py) that
answers with an A2UI surface built with the A2UI agent SDK. Our server reaches it with
`a2a.send` (from our WebSocket client and from car-runtime's `a2a_send`) or ingests its
answer with `a2ui.ingest`; a user action goes back to it as a SendMessage in the same task,
with the `a2uiAction` data part and the route credential; the credential never shows in
an answer, an event, a log line, the metrics or the store file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import minimal_agent_card
from a2a.client.transports.jsonrpc import JsonRpcTransport
from a2a.types import a2a_pb2
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from google.protobuf import json_format

from car_grpc.config import Config
from car_grpc.core.route_auth import ROUTE_KEY_FILE
from car_grpc.wire.errors import INVALID_PARAMS
from tests.a2a_remote_agent import QUESTION, SURFACE, RemoteAgent, remote_agent
from tests.conftest import make_config
from tests.postgres_server import PostgresServer
from tests.processes import cli_env, completed
from tests.ws_helpers import Rpc, daemon_token, rpc, running

SECRET = "route-secret-7f3a9c1e5b"
BOOK = {"name": "book", "surfaceId": SURFACE, "sourceComponentId": "book", "context": {"seats": 2}}
CAR_RUNTIME_A2A = Path(__file__).with_name("car_runtime_a2a.py")


def send_params(agent: RemoteAgent, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint": agent.url,
        "message": {"role": "user", "parts": [{"kind": "text", "text": "a table, please"}]},
        "blocking": True,
        "routeAuth": {"type": "bearer", "token": SECRET},
    } | extra


def store_bytes(config: Config) -> bytes:
    """Every byte of the SQLite store (database, WAL)."""
    root = config.core.state_root
    return b"".join(p.read_bytes() for p in root.rglob("*.sqlite3*") if p.is_file())


def assert_no_secret(*where: Any) -> None:
    for item in where:
        if isinstance(item, bytes):
            assert SECRET.encode() not in item
        else:
            assert SECRET not in (item if isinstance(item, str) else json.dumps(item))


async def all_frames(c: Rpc) -> list[Any]:
    return await c.queued()


async def test_a2a_send_then_a_click_continues_the_remote_task_with_the_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Our own loggers at every level (the websockets library's frame dumps at DEBUG are
    # not ours: they show whatever a client sends, secrets included, and are off unless
    # an operator turns DEBUG on for that library).
    caplog.set_level(logging.DEBUG, logger="car_grpc")
    config = make_config(tmp_path, store=None)  # the embedded file, read below
    async with (
        remote_agent() as agent,
        running(config) as (core, gateway),
        rpc(gateway.url) as c,
        rpc(gateway.url) as watcher,
    ):
        await c.login(daemon_token(core))
        await watcher.login(daemon_token(core))
        await watcher.result("a2ui/subscribe", {})
        sent = await c.result("a2a.send", send_params(agent))
        task = sent["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        assert agent.seen.tasks == [task["id"]]
        applied = sent["a2ui"]["applied"]
        assert [a["surfaceId"] for a in applied] == [SURFACE, SURFACE]
        surface = applied[-1]["surface"]
        assert surface["owner"] == {
            "kind": "a2a",
            "taskId": task["id"],
            "contextId": task["contextId"],
            "endpoint": agent.url,
        }
        assert surface["hasRouteAuth"] is True
        kinds = {c["component"] for c in surface["components"]}
        assert kinds == {"Card", "Column", "Text", "Button"}

        clicked = await c.result("a2ui.action", BOOK)
        route = clicked["route"]
        assert route["status"] == "delivered", route
        assert route["taskId"] == task["id"]
        assert route["taskState"] == "TASK_STATE_COMPLETED"
        # The remote answered the action with an update of the form.
        question = next(
            x for x in route["applied"][0]["surface"]["components"] if x["id"] == QUESTION
        )
        assert question["text"] == "Booked for 2."
        stored = await c.result("a2ui.get", {"surfaceId": SURFACE})
        assert next(x for x in stored["components"] if x["id"] == QUESTION) == question
        # The remote got one SendMessage in the same task and context, with the a2uiAction
        # part, and the bearer credential on every request.
        [(task_id, context_id, action)] = agent.seen.actions
        assert (task_id, context_id) == (task["id"], task["contextId"])
        assert action["name"] == "book" and action["surfaceId"] == SURFACE
        assert action["sourceComponentId"] == "book" and action["context"] == {"seats": 2}
        assert [h.get("authorization") for h in agent.seen.headers] == [f"Bearer {SECRET}"] * 2

        # The subscriber heard the surface, the action and the update, never the secret.
        events = [await watcher.next_notification("a2ui.event") for _ in range(4)]
        assert [e["kind"] for e in events] == [
            "a2ui.surface_updated",
            "a2ui.surface_updated",
            "a2ui.action",
            "a2ui.surface_updated",
        ]
        metrics = await watcher.error("server.metrics", {})  # daemon: refused; host reads it
        async with rpc(gateway.url) as host:
            assert core.parts is not None and core.parts.tokens is not None
            await host.login(host_token=core.parts.tokens.host)
            metrics = await host.result("server.metrics", {})
            host_events = (await host.result("host.subscribe", {}))["events"]
        assert {"a2ui.surface_updated", "a2ui.action"} <= {e["kind"] for e in host_events}
        assert_no_secret(
            sent,
            clicked,
            events,
            metrics,
            host_events,
            await c.result("a2ui.surfaces", {}),
            await all_frames(c),
            await all_frames(watcher),
        )
    assert_no_secret(caplog.text, store_bytes(config))


async def test_ingest_with_a_header_credential_routes_the_click_back(tmp_path: Path) -> None:
    """The remote's answer, fetched with the a2a-sdk client, is ingested with a named-header
    routeAuth; the click reaches the remote with that header."""
    async with remote_agent() as agent:
        http = httpx.AsyncClient(headers={VERSION_HEADER: PROTOCOL_VERSION_CURRENT})
        transport = JsonRpcTransport(http, minimal_agent_card(agent.url), agent.url)
        message = a2a_pb2.Message(
            message_id="m1", role=a2a_pb2.ROLE_USER, parts=[a2a_pb2.Part(text="hi")]
        )
        answer = await transport.send_message(a2a_pb2.SendMessageRequest(message=message))
        await http.aclose()
        payload = json_format.MessageToDict(answer)
        async with running(make_config(tmp_path)) as (core, gateway), rpc(gateway.url) as c:
            await c.login(daemon_token(core))
            ingested = await c.result(
                "a2ui.ingest",
                {
                    "payload": payload,
                    "endpoint": agent.url,
                    "routeAuth": {"type": "header", "name": "X-Api-Key", "value": SECRET},
                },
            )
            surface = ingested["applied"][-1]["surface"]
            assert surface["owner"]["taskId"] == answer.task.id
            route = (await c.result("a2ui.action", BOOK))["route"]
            assert route["status"] == "delivered", route
            assert agent.seen.actions[0][0] == answer.task.id
            assert agent.seen.headers[-1].get("x-api-key") == SECRET
            assert_no_secret(ingested, route)


async def test_untrusted_endpoints_are_refused_unless_allowed(tmp_path: Path) -> None:
    far = "http://192.0.2.10:9/a2a"  # TEST-NET-1: never loopback
    config = make_config(tmp_path, a2a_send_timeout=0.5)
    async with running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        for method, params in (
            ("a2a.send", {"endpoint": far, "message": "hi"}),
            ("a2ui.ingest", {"payload": {"taskId": "t"}, "endpoint": far}),
            ("a2a.peers.add", {"url": far}),
        ):
            error = await c.error(method, params)
            assert error["code"] == INVALID_PARAMS
            assert "is not a loopback endpoint" in error["message"], error
        # A credential needs the A2A task it is for, and a well-formed shape.
        near = "http://127.0.0.1:9/a2a"
        for route_auth in (
            {"type": "bearer", "token": SECRET},
            {"type": "bearer"},
            {"type": "header", "name": "Host", "value": SECRET},
            {"type": "header", "name": "Bad Name", "value": SECRET},
            {"type": "basic", "token": SECRET},
        ):
            payload = {} if route_auth == {"type": "bearer", "token": SECRET} else {"taskId": "t"}
            error = await c.error(
                "a2ui.ingest", {"payload": payload, "endpoint": near, "routeAuth": route_auth}
            )
            assert error["code"] == INVALID_PARAMS and "routeAuth" in error["message"], error
            assert_no_secret(error)
        for bad in ("ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/x", "not a url"):
            error = await c.error("a2a.send", {"endpoint": bad, "message": "hi"})
            assert error["code"] == INVALID_PARAMS
            assert "pw" not in error["message"]
        # Allowed: the call is made, and fails within the bound.
        started = time.monotonic()
        error = await c.error(
            "a2a.send", {"endpoint": far, "message": "hi", "allowUntrustedEndpoint": True}
        )
        assert f"a2a.send to {far} failed" in error["message"]
        assert time.monotonic() - started < 3
        ingested = await c.result(
            "a2ui.ingest",
            {
                "payload": {
                    "taskId": "t",
                    "parts": [{"data": {"version": "v0.9", "createSurface": {"surfaceId": "far"}}}],
                },
                "endpoint": far,
                "allowUntrustedEndpoint": True,
            },
        )
        assert ingested["applied"][0]["surface"]["owner"]["endpoint"] == far


async def test_a_failed_delivery_is_reported_in_route_and_never_hangs(tmp_path: Path) -> None:
    config = make_config(tmp_path, a2a_send_timeout=0.5)
    async with running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        async with remote_agent() as agent:
            await c.result("a2a.send", send_params(agent))
        # The remote is gone: the click is still broadcast, and `route` says why.
        started = time.monotonic()
        answer = await c.result("a2ui.action", BOOK)
        assert time.monotonic() - started < 3
        assert answer["event"]["kind"] == "a2ui.action"
        route = answer["route"]
        assert route["status"] == "failed" and route["error"], route
        assert_no_secret(answer)
        # A remote slower than the bound: the same, within the bound.
        async with remote_agent(delay=1.0) as slow:
            error = await c.error("a2a.send", send_params(slow))
            assert "no answer within 0.5 s" in error["message"]


async def test_an_answer_over_the_size_bound_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, a2a_send_max_bytes=300)
    async with remote_agent() as agent, running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        error = await c.error("a2a.send", send_params(agent))
        assert "larger than 300 bytes" in error["message"]
        assert await c.result("a2ui.surfaces", {}) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_route_survives_a_restart_sealed_with_a_key_kept_0600(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """On either store: the credential is stored sealed only, survives a restart (the
    key beside the token files), and is gone with its surface."""
    if backend == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database("a2ui")
        config = make_config(tmp_path, store=url)

        def stored() -> bytes:
            rows = server.execute(url, "SELECT surface, route FROM a2ui_surfaces")
            return b"".join(bytes(v) for row in rows for v in row if v is not None)
    else:
        config = make_config(tmp_path, store=None)  # the embedded file, read below

        def stored() -> bytes:
            return store_bytes(config)

    async with remote_agent() as agent:
        async with running(config) as (core, gateway), rpc(gateway.url) as c:
            await c.login(daemon_token(core))
            await c.result("a2a.send", send_params(agent))
        key = config.core.token_dir / ROUTE_KEY_FILE
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert stored() and SECRET.encode() not in stored()
        async with running(config) as (core, gateway), rpc(gateway.url) as c:
            await c.login(daemon_token(core))
            route = (await c.result("a2ui.action", BOOK))["route"]
            assert route["status"] == "delivered", route
            assert agent.seen.headers[-1]["authorization"] == f"Bearer {SECRET}"
            # Deleted with its surface: the credential goes with it.
            await c.result(
                "a2ui.apply", {"version": "v0.9", "deleteSurface": {"surfaceId": SURFACE}}
            )
    assert SECRET.encode() not in stored()
    if backend == "postgres":
        assert stored() == b""


async def test_the_peer_registry(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        one = await c.result(
            "a2a.peers.add", {"url": "HTTP://LocalHost:80/agents/one/", "label": "One"}
        )
        assert one == {"slug": "localhost", "url": "http://localhost/agents/one", "label": "One"}
        two = await c.result("a2a.peers.add", {"url": "http://localhost:8080/two"})
        assert two == {"slug": "localhost-2", "url": "http://localhost:8080/two"}
        error = await c.error("a2a.peers.add", {"url": "http://localhost/agents/one"})
        assert "already registered" in error["message"]
        far = await c.result(
            "a2a.peers.add", {"url": "https://agents.example.com:443/x", "allowUntrusted": True}
        )
        assert far == {"slug": "agents-example-com", "url": "https://agents.example.com/x"}
        listed = await c.result("a2a.peers.list", {})
        assert [p["slug"] for p in listed["peers"]] == [
            "localhost",
            "localhost-2",
            "agents-example-com",
        ]
        assert await c.result("a2a.peers.remove", {"slug": "localhost"}) == {"removed": True}
        assert await c.result("a2a.peers.remove", {"slug": "localhost"}) == {"removed": False}


async def test_car_runtime_a2a_send_reaches_the_remote_agent(tmp_path: Path) -> None:
    """car-runtime 0.58's own wrappers (`a2a_send`, `a2ui_surfaces`, the peers), as its
    users call them, in a process of their own."""
    config = make_config(tmp_path)
    async with remote_agent() as agent, running(config) as (_core, gateway):
        env = cli_env(
            config.core.state_root, CAR_DAEMON_URL=gateway.url, CAR_NO_VERSION_WARNING="1"
        )
        argv = [sys.executable, str(CAR_RUNTIME_A2A), agent.url, SECRET]
        code, out, err = await completed(argv, env, timeout=45)
        assert code == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        sent = seen["a2a_send"]["result"]
        assert sent["result"]["task"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        assert [s["surfaceId"] for s in seen["a2ui_surfaces"]["result"]] == [SURFACE]
        assert seen["a2ui_get"]["result"]["owner"]["endpoint"] == agent.url
        assert len(seen["a2ui_capabilities"]["result"]["components"]) == 24
        assert seen["a2a_peers_add"]["result"]["url"] == agent.url
        assert seen["a2a_peers_list"]["result"]["peers"][0]["slug"] == "127-0-0-1"
        assert seen["a2a_peers_remove"]["result"] == {"removed": True}
        assert agent.seen.headers[0]["authorization"] == f"Bearer {SECRET}"
        assert_no_secret(seen)


async def test_a2a_send_reaches_an_agent_attached_to_this_server_over_its_a2a_listener(
    tmp_path: Path,
) -> None:
    """Both halves of A2A meet: `a2a.send` (outbound, a2a-sdk's client) to the A2A
    listener of this very server (inbound), authenticated by a caller token minted with
    the operator command's code, reaches the attached agent as a chat."""
    config = make_config(tmp_path, chat_ack_timeout=2.0)
    async with running(config) as (core, gateway), rpc(gateway.url) as c, rpc(gateway.url) as agent:
        assert core.parts is not None and core.parts.a2a is not None
        caller = await core.parts.a2a.callers.add("outbound")
        await agent.login(await core.parts.agent_tokens.add("helper"), agent_id="helper")
        await c.login(daemon_token(core))
        params = {
            "endpoint": f"{core.a2a_url}/a2a/helper",
            "message": "what is two and two?",
            "blocking": True,
            "routeAuth": {"type": "bearer", "token": caller},
        }
        sending = asyncio.create_task(c.result("a2a.send", params))
        chat = await agent.expect_request("agent.chat")
        assert chat["params"]["prompt"] == "what is two and two?"
        await agent.answer(chat, {"accepted": True})
        session_id = chat["params"]["session_id"]
        for kind, extra in (("token", {"delta": "four"}), ("done", {})):
            await agent.notify(
                "agent.chat.event", {"session_id": session_id, "kind": kind, **extra}
            )
        sent = await sending
        task = sent["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED"
        assert "".join(p["text"] for a in task["artifacts"] for p in a["parts"]) == "four"
        assert sent["a2ui"] == {"applied": []}
        # A wrong caller token is refused by the listener, and said so without the token.
        error = await c.error(
            "a2a.send", params | {"routeAuth": {"type": "bearer", "token": "nope"}}
        )
        assert "failed" in error["message"] and "nope" not in error["message"]
