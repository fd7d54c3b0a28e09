"""End-to-end over plain HTTP: the dashboard of a real `Server` (core + gateway +
dashboard on loopback): login, cookie, 401s, origin and Host checks, the JSON API, the
live event streams and their resumption, /metrics and /healthz, and half-open
connections (slowloris) against its connection caps and header deadline."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from car_grpc.config import DEFAULT_GATED_METHODS
from car_grpc.core.server import Core
from car_grpc.dashboard import Dashboard
from car_grpc.serve import Server
from car_grpc.v1 import host_pb2, state_pb2
from car_grpc.wire.errors import APPROVAL_DENIED, INVALID_PARAMS, CarError
from tests.bounded import stopped
from tests.conftest import make_config
from tests.dashboard_helpers import (
    PARTIAL_HEAD,
    event_stream,
    half_open,
    log_in,
    printed_login_urls,
    request,
    until_closed,
)
from tests.runs_helpers import complete, record, start, turns
from tests.session_client import SessionClient, connect


@pytest.fixture
async def server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Server]:
    caplog.set_level(logging.INFO, logger="car_grpc.dashboard")
    config = make_config(tmp_path, gated_methods=DEFAULT_GATED_METHODS | {"state.set"})
    async with Server(config) as server:
        yield server


def base(server: Server) -> str:
    assert server.dashboard is not None
    return server.dashboard.url


def tokens(server: Server) -> tuple[str, str]:
    state = server.core.parts
    assert state is not None and state.tokens is not None
    return state.tokens.daemon, state.tokens.host


def login_urls(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The login links logged so far (at the server's start-up too)."""
    return printed_login_urls([*caplog.get_records("setup"), *caplog.records])


@pytest.fixture
async def cookie(server: Server, caplog: pytest.LogCaptureFixture) -> str:
    return await log_in(login_urls(caplog)[-1])


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.core.grpc_address) as ch:
        yield ch


def same_origin(server: Server, cookie: str) -> dict[str, str]:
    return {"Cookie": cookie, "Origin": base(server).rstrip("/")}


async def test_without_the_cookie_every_endpoint_answers_401(server: Server) -> None:
    url = base(server)
    for path in (
        "",
        "static/app.js",
        "static/style.css",
        "api/status",
        "api/approvals",
        "api/runs?agent_id=a",
        "api/events",
        "api/runs/r1/events",
        "metrics",
        "healthz",
        "no-such-page",
    ):
        for headers in ({}, {"Cookie": "car_dashboard=forged"}):
            answer = await request("GET", url + path, headers)
            assert answer.status == 401, (path, headers, answer.status)
    for path in ("api/approvals/a1", "logout"):
        answer = await request("POST", url + path, {"Origin": url.rstrip("/")}, b"{}")
        assert answer.status == 401, path
    page = await request("GET", url)
    assert b"Log in with the dashboard link printed in the car-grpc server log" in page.body


async def test_the_printed_login_link_works_once_and_sets_a_strict_http_only_cookie(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    [first] = login_urls(caplog)
    answer = await request("GET", first)
    assert answer.status == 303 and answer.header("location") == "/"
    attributes = [a.strip() for a in answer.header("set-cookie").split(";")]
    assert attributes[0].startswith("car_dashboard=") and len(attributes[0]) > 40
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
    cookie = attributes[0]

    status = await request("GET", base(server) + "api/status", {"Cookie": cookie})
    assert status.status == 200 and status.json()["auth_enabled"] is True
    page = await request("GET", base(server), {"Cookie": cookie})
    assert page.status == 200 and b"<title>car-grpc dashboard</title>" in page.body
    assert "script-src 'self'" in page.header("content-security-policy")
    assert tokens(server)[0].encode() not in page.body
    assert tokens(server)[1].encode() not in page.body

    assert (await request("GET", first)).status == 401  # spent
    fresh = login_urls(caplog)[-1]
    assert fresh != first
    assert (await request("GET", fresh)).status == 303


async def test_other_origins_and_foreign_hosts_are_refused(server: Server, cookie: str) -> None:
    url = base(server)
    body = json.dumps({"approved": True}).encode()
    json_type = {"Content-Type": "application/json"}
    evil = {"Cookie": cookie, "Origin": "http://evil.example", **json_type}
    assert (await request("POST", url + "api/approvals/a1", evil, body)).status == 403
    no_origin = {"Cookie": cookie, **json_type}
    assert (await request("POST", url + "api/approvals/a1", no_origin, body)).status == 403
    cross_site = {**same_origin(server, cookie), "Sec-Fetch-Site": "cross-site", **json_type}
    assert (await request("POST", url + "api/approvals/a1", cross_site, body)).status == 403
    async with event_stream(url + "api/events", {"Cookie": cookie, "Origin": "http://x"}) as es:
        assert es.status == 403
    rebound = {"Cookie": cookie, "Host": "evil.example:80"}
    assert (await request("GET", url + "api/status", rebound)).status == 421


async def test_metrics_and_healthz_take_the_cookie_or_the_host_token(
    server: Server, cookie: str
) -> None:
    url = base(server)
    daemon, host = tokens(server)
    for headers in ({"Cookie": cookie}, {"Authorization": f"Bearer {host}"}):
        metrics = await request("GET", url + "metrics", headers)
        assert metrics.status == 200
        assert metrics.header("content-type").startswith("text/plain; version=0.0.4")
        assert b"# TYPE car_requests_total counter" in metrics.body
        assert b"car_sessions_opened_total" in metrics.body
        health = await request("GET", url + "healthz", headers)
        assert (health.status, health.body) == (200, b"ok\n")
    for bad in (f"Bearer {daemon}", "Bearer nope", host):
        assert (await request("GET", url + "metrics", {"Authorization": bad})).status == 401


async def park_gated_call(
    client: SessionClient, key: str
) -> asyncio.Task[state_pb2.SetStateResponse]:
    request_ = state_pb2.SetStateRequest(key=key)
    request_.value.string_value = "v"
    return asyncio.create_task(client.request("state_set", request_, timeout=15))


async def test_a_gated_call_is_listed_and_resolved_through_the_api(
    server: Server, cookie: str, channel: grpc.aio.Channel
) -> None:
    url = base(server)
    headers = {**same_origin(server, cookie), "Content-Type": "application/json"}
    client = await connect(channel, token=tokens(server)[0])
    async with event_stream(url + "api/events", {"Cookie": cookie}) as events:
        assert events.status == 200
        assert events.headers["content-type"] == ["text/event-stream; charset=utf-8"]
        parked = await park_gated_call(client, "k1")
        requested = json.loads((await events.next_of("host")).data)
        assert requested["kind"] == "approval.requested"
        approval_id = requested["payload"]["id"]
        listing = (await request("GET", url + "api/approvals", {"Cookie": cookie})).json()
        [pending] = [a for a in listing["approvals"] if a["status"] == "pending"]
        assert pending["id"] == approval_id and pending["action"] == "ws.method:state.set"

        answer = await request(
            "POST", url + f"api/approvals/{approval_id}", headers, b'{"approved": false}'
        )
        assert answer.status == 200 and answer.json()["status"] == "denied"
        with pytest.raises(CarError) as denied:
            await parked
        assert denied.value.code == APPROVAL_DENIED
        resolved = json.loads((await events.next_of("host")).data)
        assert resolved["kind"] == "approval.resolved"

    again = await request(
        "POST", url + f"api/approvals/{approval_id}", headers, b'{"approved": true}'
    )
    assert again.status == 409 and again.json()["error"]["code"] == INVALID_PARAMS
    assert "already denied" in again.json()["error"]["message"]
    bad = await request("POST", url + "api/approvals/x", headers, b'{"approved": "yes"}')
    assert bad.status == 400
    wrong_type = {**headers, "Content-Type": "text/plain"}
    assert (await request("POST", url + "api/approvals/x", wrong_type, b"{}")).status == 415
    await client.close()


async def test_a_run_stream_resumes_after_the_last_event_id(
    server: Server, cookie: str, channel: grpc.aio.Channel
) -> None:
    state = server.core.parts
    assert state is not None
    agent = await connect(channel, token=await state.agent_tokens.add("a1"), agent_id="a1")
    run_id = await start(agent, "write the report")
    await record(agent, run_id, turns(3))
    url = base(server) + f"api/runs/{run_id}/events?cursor=0"
    async with event_stream(url, {"Cookie": cookie}) as stream:
        ids = [(await stream.next_of("record")).id for _ in range(4)]
    assert ids == ["1", "2", "3", "4"]  # started, then three turns

    await record(agent, run_id, turns(2, prompt="late"))
    async with event_stream(url, {"Cookie": cookie, "Last-Event-ID": "3"}) as resumed:
        first = json.loads((await resumed.next_of("record")).data)
        assert first["cursor"] == 4 and first["record"]["prompt"] == "p2"
        await complete(agent, run_id)
        rest = [json.loads((await resumed.next_of("record")).data) for _ in range(3)]
        assert [r["cursor"] for r in rest] == [5, 6, 7]
        ended = rest[-1]["record"]
        assert (ended["record"], ended["status"], ended["outcome"]["status"]) == (
            "ended",
            "completed",
            "success",
        )
        assert (await resumed.next()).event == "end"
    runs = await request("GET", base(server) + "api/runs?agent_id=a1", {"Cookie": cookie})
    [summary] = runs.json()["runs"]
    assert (summary["run_id"], summary["status"], summary["turn_count"]) == (
        run_id,
        "completed",
        5,
    )
    async with event_stream(base(server) + "api/runs/nope/events", {"Cookie": cookie}) as gone:
        failed = await gone.next_of("failed")
        assert json.loads(failed.data)["code"] == INVALID_PARAMS
    await agent.close()


async def test_status_lists_sessions_for_the_page(
    server: Server, cookie: str, channel: grpc.aio.Channel
) -> None:
    client = await connect(channel, token=tokens(server)[0])
    await client.request("host_agents", host_pb2.ListAgentsRequest())
    status = (await request("GET", base(server) + "api/status", {"Cookie": cookie})).json()
    assert status["session_count"] == 1
    assert status["sessions"][0]["role"] == "ordinary"
    assert status["store_bytes"] > 0 and status["server_version"]
    await client.close()


async def test_with_auth_off_the_page_still_needs_its_login_and_sees_every_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="car_grpc.dashboard")
    async with Server(make_config(tmp_path, auth=False)) as server:
        url = base(server)
        assert (await request("GET", url + "api/status")).status == 401
        cookie = await log_in(printed_login_urls(caplog.records)[-1])
        async with grpc.aio.insecure_channel(server.core.grpc_address) as ch:
            agent = await connect(ch, agent_id="a1")
            run_id = await start(agent)
            status = (await request("GET", url + "api/status", {"Cookie": cookie})).json()
            assert status["auth_enabled"] is False and status["run_agents"][0]["agent_id"] == "a1"
            runs = (await request("GET", url + "api/runs?agent_id=a1", {"Cookie": cookie})).json()
            assert [r["run_id"] for r in runs["runs"]] == [run_id]
            async with event_stream(url + f"api/runs/{run_id}/events", {"Cookie": cookie}) as es:
                started = json.loads((await es.next_of("record")).data)
                assert started["record"]["record"] == "started"
            await agent.close()


async def test_a_dashboard_beside_a_core_in_another_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dashboard needs only the core's address and host token (here a `Core` alone,
    as `car-grpc core` runs it)."""
    caplog.set_level(logging.INFO, logger="car_grpc.dashboard")
    config = make_config(tmp_path, dashboard_port=0)
    core = Core(config.core)
    await core.start()
    assert core.parts is not None and core.parts.tokens is not None
    dashboard = Dashboard(config.dashboard, core.grpc_address, core.parts.tokens.host)
    await dashboard.start()
    try:
        cookie = await log_in(printed_login_urls(caplog.records)[-1])
        status = await request("GET", dashboard.url + "api/status", {"Cookie": cookie})
        assert status.status == 200 and status.json()["auth_enabled"] is True
    finally:
        await stopped(dashboard.stop())
        await stopped(core.stop(grace=0))
    core = Core(config.core)
    await core.start()
    wrong = Dashboard(config.dashboard, core.grpc_address, "not-the-host-token")
    await wrong.start()
    try:
        cookie = await log_in(printed_login_urls(caplog.records)[-1])
        health = await request("GET", wrong.url + "healthz", {"Cookie": cookie})
        assert health.status == 503
        assert health.body.startswith(b"unhealthy: auth failed: token mismatch"), health.body
    finally:
        await stopped(wrong.stop())
        await stopped(core.stop(grace=0))


# ------------------------------------------------------------------ half-open connections


def port_of(server: Server) -> int:
    assert server.dashboard is not None
    return server.dashboard.port


async def test_half_open_connections_cannot_lock_out_a_logged_in_operator(
    server: Server, cookie: str
) -> None:
    """200 connections that send part of a request head and then nothing, from the
    operator's own address (on loopback every client is one peer): the operator's
    requests are still served at once, and the flood holds no more than the per-peer cap
    (the connections that waited longest were closed, without an answer)."""
    async with half_open(port_of(server), 200) as flood:
        for _ in range(3):
            async with asyncio.timeout(2):
                answer = await request("GET", base(server) + "api/status", {"Cookie": cookie})
            assert answer.status == 200, answer.body
        limits = server.config.dashboard
        cap = limits.dashboard_max_connections_per_peer
        assert cap < limits.dashboard_max_connections < 200
        await until_closed(flood, 200 - cap)
        assert sum(c.is_open for c in flood) <= cap
        assert all(c.closed.result() == b"" for c in flood if not c.is_open)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer (head and Content-Length body) off a kept-alive connection."""
    async with asyncio.timeout(2):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)


async def test_a_request_head_must_arrive_whole_within_the_header_deadline(
    tmp_path: Path,
) -> None:
    """A connection that sends part of a head, or nothing, is answered 408 and closed
    after `dashboard_header_timeout`; so is a kept-alive connection that begins a second
    request and stops. A kept-alive connection that merely idles stays open (the idle
    timeout is longer) and serves its next request."""
    async with Server(make_config(tmp_path, dashboard_header_timeout=0.5)) as server:
        port = port_of(server)
        loop = asyncio.get_running_loop()
        complete = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        kept_alive = await asyncio.open_connection("127.0.0.1", port)
        idle = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with half_open(port, 1) as [partial], half_open(port, 1, data=b"") as [silent]:
                started = loop.time()
                for reader, writer in (kept_alive, idle):
                    writer.write(complete)
                    assert (await read_answer(reader)).startswith(b"HTTP/1.1 401 ")  # no cookie
                kept_alive[1].write(PARTIAL_HEAD)
                async with asyncio.timeout(4):
                    kept_alive_answer = await kept_alive[0].read()  # until the server closes
                await until_closed([partial, silent], 2, timeout=4)
                elapsed = loop.time() - started
                assert 0.45 <= elapsed < 3, elapsed
                for answer in (partial.closed.result(), silent.closed.result(), kept_alive_answer):
                    assert answer.startswith(b"HTTP/1.1 408 "), answer
                    assert b"Connection: close" in answer
                assert not idle[0].at_eof()
                idle[1].write(complete)
                assert (await read_answer(idle[0])).startswith(b"HTTP/1.1 401 ")
        finally:
            for _, writer in (kept_alive, idle):
                writer.close()


async def test_the_caps_close_the_longest_waiting_connection_of_the_peer_then_of_anyone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-peer cap 4, global cap 8; any 127.x.y.z is a peer of its own. A peer that opens
    20 half-open connections keeps its 4 newest, while the 3 older half-open connections
    of another peer survive. At the global cap a new peer's connection closes the one
    that has waited longest of all, and is served."""
    caplog.set_level(logging.INFO, logger="car_grpc.dashboard")
    config = make_config(
        tmp_path,
        dashboard_max_connections=8,
        dashboard_max_connections_per_peer=4,
        dashboard_header_timeout=30.0,  # no deadline during the test: only the caps act
    )
    async with Server(config) as server:
        port, url = port_of(server), base(server)
        cookie = await log_in(printed_login_urls(caplog.records)[-1])
        async with (
            half_open(port, 3, source="127.0.0.1") as mine,
            half_open(port, 20, source="127.0.0.2") as theirs,
        ):
            await until_closed(theirs, 16)
            assert [i for i, c in enumerate(theirs) if c.is_open] == [16, 17, 18, 19]
            assert all(c.is_open for c in mine)
            async with half_open(port, 1, source="127.0.0.3"):  # 8 connections now
                async with asyncio.timeout(2):
                    answer = await request(
                        "GET", url + "api/status", {"Cookie": cookie, "Host": f"127.0.0.1:{port}"}
                    )
                assert answer.status == 200
                await until_closed(mine, 1)
                assert [c.is_open for c in mine] == [False, True, True]
                assert sum(c.is_open for c in theirs) == 4


async def test_at_the_cap_busy_connections_stay_and_a_new_one_is_refused_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Live event streams are busy connections, never closed for a newcomer: with the
    per-peer cap (2) taken by two streams, the same peer's next connection is answered
    503, while another peer is still served."""
    caplog.set_level(logging.INFO, logger="car_grpc.dashboard")
    config = make_config(
        tmp_path, dashboard_max_connections=4, dashboard_max_connections_per_peer=2
    )
    async with Server(config) as server:
        url = base(server)
        cookie = await log_in(printed_login_urls(caplog.records)[-1])
        headers = {"Cookie": cookie}
        async with (
            event_stream(url + "api/events", headers) as first,
            event_stream(url + "api/events", headers) as second,
        ):
            for stream in (first, second):
                assert stream.status == 200 and (await stream.next()).event == "hello"
            refused = await request("GET", url + "api/status", headers)
            assert (refused.status, refused.body) == (503, b"too many connections")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(server), local_addr=("127.0.0.2", 0)
            )
            try:
                host = url.removeprefix("http://").rstrip("/")
                writer.write(
                    f"GET /api/status HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                async with asyncio.timeout(2):
                    answer = await reader.read()
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            finally:
                writer.close()
