"""End-to-end in a real headless Chromium (Debian's chromium, driven by playwright-core):
the dashboard of a real `Server` on loopback, WebSocket clients of its gateway making the
calls the page shows. One browser and one server for the module; each test also saves a
screenshot of the view it exercised under artifacts/dashboard/ for review.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from car_grpc.config import DEFAULT_GATED_METHODS
from car_grpc.serve import Server
from car_grpc.v1 import chats_pb2
from car_grpc.wire.errors import APPROVAL_DENIED
from tests.bounded import stopped
from tests.browser_driver import Browser, ensure_installed
from tests.chat_helpers import accept_chat
from tests.conftest import make_config
from tests.dashboard_helpers import printed_login_urls
from tests.session_client import connect
from tests.ws_helpers import Rpc, rpc

pytestmark = pytest.mark.asyncio(loop_scope="module")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Site:
    server: Server
    browser: Browser
    log: _Records
    ids: list[int] = field(default_factory=lambda: [100])

    @property
    def url(self) -> str:
        assert self.server.dashboard is not None
        return self.server.dashboard.url

    def login_urls(self) -> list[str]:
        return printed_login_urls(self.log.records)

    def token(self) -> str:
        state = self.server.core.parts
        assert state is not None and state.tokens is not None
        return state.tokens.daemon

    async def agent_token(self, agent_id: str) -> str:
        assert self.server.core.parts is not None
        return await self.server.core.parts.agent_tokens.add(agent_id)

    @property
    def ws_url(self) -> str:
        assert self.server.gateway is not None
        return self.server.gateway.url

    def next_id(self) -> int:
        self.ids[0] += 1
        return self.ids[0]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    ensure_installed()
    log = _Records()
    logger = logging.getLogger("car_grpc.dashboard")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    root: Path = tmp_path_factory.mktemp("dashboard")
    config = make_config(root, gated_methods=DEFAULT_GATED_METHODS | {"state.set"})
    browser = await Browser.launch()
    try:
        async with Server(config) as server:
            yield Site(server, browser, log)
    finally:
        await browser.close()
        logger.removeHandler(log)


@pytest_asyncio.fixture(loop_scope="module")
async def page(site: Site) -> AsyncIterator[Browser]:
    """The browser, logged in (through the newest printed link when it is not)."""
    if not any(c["name"] == "car_dashboard" for c in await site.browser.cookies()):
        await site.browser.goto(site.login_urls()[-1])
    yield site.browser
    assert await site.browser.page_errors() == []


async def answer_to(client: Rpc, request_id: int, timeout: float = 15) -> dict[str, Any]:
    """Read frames until the answer to `request_id` (notifications are set aside)."""
    while True:
        frame = await client.recv(timeout)
        if isinstance(frame, dict) and frame.get("id") == request_id:
            return frame
        client.other.append(frame)


async def gated_state_set(site: Site, client: Rpc, key: str) -> int:
    request_id = site.next_id()
    params = {"key": key, "value": "from the test"}
    await client.send({"jsonrpc": "2.0", "id": request_id, "method": "state.set", "params": params})
    return request_id


CARD = 'li.card:has(code:text-is("ws.method:state.set"))'


async def test_login_through_the_printed_link_and_401_without_the_cookie(site: Site) -> None:
    browser = site.browser
    await browser.clear_cookies()
    refused = await browser.goto(site.url)
    assert refused["status"] == 401
    await browser.wait('body:has-text("Log in with the dashboard link printed in the car-grpc")')

    link = site.login_urls()[-1]
    landed = await browser.goto(link)
    assert (landed["status"], landed["url"]) == (200, site.url)
    await browser.wait('#health:has-text("session")')
    [health] = await browser.texts("#health")
    assert health.startswith("Up ") and "store " in health and "approval gate on" in health
    await browser.wait('#live:has-text("Live updates: connected")')
    [cookie] = [c for c in await browser.cookies() if c["name"] == "car_dashboard"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert await browser.evaluate("document.cookie") == ""  # invisible to the page's script
    no_cookie = await browser.evaluate(
        "fetch('/api/status', {credentials: 'omit'}).then(r => r.status)"
    )
    assert no_cookie == 401

    assert site.login_urls()[-1] != link  # spent: the log shows a fresh link
    assert (await browser.goto(link))["status"] == 401
    assert (await browser.goto(site.url))["status"] == 200  # the cookie still works


async def test_deny_fails_the_gated_call_and_approve_lets_the_next_one_run(
    site: Site, page: Browser
) -> None:
    await page.goto(site.url + "#approvals")
    async with rpc(site.ws_url) as client:
        await client.login(site.token())

        denied_id = await gated_state_set(site, client, "first")
        await page.wait(CARD)
        [preview] = await page.texts(f"{CARD} .preview")
        assert json.loads(preview) == {"key": "first", "value": "from the test"}
        await page.screenshot("approvals-pending")
        await page.click(f'{CARD} >> role=button[name="Deny"]')
        denied = await answer_to(client, denied_id)
        assert denied["error"]["code"] == APPROVAL_DENIED, denied
        await page.wait('#history tbody tr:has(.badge-denied:text-is("denied"))')
        await page.wait_count("#pending li.card", 0)

        approved_id = await gated_state_set(site, client, "second")
        await page.wait(CARD)
        await page.click(f'{CARD} >> role=button[name="Approve"]')
        approved = await answer_to(client, approved_id)
        assert "result" in approved, approved
        await page.wait('#history tbody tr:has(.badge-approved:text-is("approved"))')
        assert await client.result("state.get", {"key": "second"}) == "from the test"

        # The buttons are real buttons: the keyboard alone can approve.
        keyboard_id = await gated_state_set(site, client, "third")
        await page.wait(CARD)
        await page.press(f'{CARD} >> role=button[name="Approve"]', "Enter")
        assert "result" in await answer_to(client, keyboard_id)
        await page.wait_count("#history tbody tr", 3)
        await page.wait('#approval-result:has-text("Approved: ws.method:state.set")')
        await page.screenshot("approvals-history")


async def test_turns_appear_live_and_the_trace_resumes_after_a_reconnect(
    site: Site, page: Browser
) -> None:
    async with rpc(site.ws_url) as agent:
        await agent.result(
            "session.auth",
            {"token": await site.agent_token("researcher"), "agent_id": "researcher"},
        )
        await agent.result("server.handshake", {"protocol_version": 3})
        started = await agent.result("runs.start", {"intent": "summarise the incident report"})
        run_id = started["run_id"]

        async def record(*turns: dict[str, Any]) -> None:
            reply = await agent.result(
                "runs.record_turns", {"run_id": run_id, "turns": list(turns)}
            )
            assert reply["ok"], reply

        await record(
            {
                "prompt": "Read the incident report",
                "tool": "fs.read",
                "parameters": {"path": "reports/incident-42.md"},
                "output": "Outage of 14 minutes; cause: expired certificate.",
                "verifier_verdict": "pass",
            }
        )
        await page.goto(site.url + f"#runs/researcher/{run_id}")
        await page.wait_count("#records li.turn", 1)
        await page.wait('#trace-state[data-state="live"]')
        await record(
            {"prompt": "Draft the summary", "output": "A certificate expired; renewals now alert."},
            {"prompt": "Check the draft", "tool": "lint.prose", "policy_rejected": True},
        )
        await page.wait_count("#records li.turn", 3)  # live, without a reload

        # The dashboard goes away and comes back; a turn is recorded in between. The page
        # reconnects by itself and resumes after the last turn it showed.
        dashboard = site.server.dashboard
        assert dashboard is not None
        await stopped(dashboard.stop())
        await record({"prompt": "Publish the summary", "tool": "wiki.publish", "output": "ok"})
        await dashboard.start()
        await page.wait_count("#records li.turn", 4)
        cursors = await page.evaluate(
            "[...document.querySelectorAll('#records li')].map(li => li.dataset.cursor || '-')"
        )
        assert cursors == ["-", "2", "3", "4", "5"]  # started, then each turn exactly once
        await page.wait("#agent-runs tbody tr:has(.badge-in_progress)")

        await agent.result(
            "runs.complete",
            {"run_id": run_id, "outcome": {"status": "success", "summary": "published"}},
        )
        await page.wait("#records li.record.ended")
        await page.wait('#trace-state[data-state="ended"]')
        await page.wait('#agent-runs tbody tr:has(.badge-completed:text-is("completed"))')
        await page.screenshot("runs-trace")


async def test_sessions_attached_agents_and_chats_in_flight(site: Site, page: Browser) -> None:
    async with grpc.aio.insecure_channel(site.server.core.grpc_address) as channel:
        helper = await connect(channel, token=await site.agent_token("helper"), agent_id="helper")
        host = await connect(channel, token=site.token())
        chat = chats_pb2.ChatRequest(agent_id="helper", prompt="hi", session_id="chat-demo")
        await asyncio.gather(host.request("agents_chat", chat), accept_chat(helper))
        await page.goto(site.url + "#sessions")
        await page.wait('#sessions tbody tr:has(.badge-agent) >> text="helper"')
        await page.wait('#agents li:has-text("helper attached since")')
        await page.wait('#chats tbody tr:has(code:text-is("chat-demo")):has(.badge-streaming)')
        await page.wait('#health:has-text("1 chat in flight")')
        await page.screenshot("sessions")
        await helper.close()
        await host.close()
    await page.wait('#no-chats:has-text("No chat is in flight.")')
