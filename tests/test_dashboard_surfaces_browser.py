"""The dashboard's Surfaces view in a real headless Chromium: A2UI surfaces rendered (never
as HTML from the agent), and a click reaching a remote A2A agent (an a2a-sdk server,
tests/a2a_remote_agent.py) as a SendMessage in its task with the `a2uiAction` part and
the bearer credential, which the page never shows. Screenshots under artifacts/dashboard/.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.a2a_remote_agent import BUTTON, QUESTION, SURFACE, remote_agent
from tests.browser_driver import Browser
from tests.test_dashboard_browser import Site, page, site
from tests.ws_helpers import rpc

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["page", "site"]  # the fixtures these tests use

SECRET = "dashboard-route-secret-41b7"
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
HOSTILE = '<img src=x onerror="document.title=1">'


def showcase() -> list[dict[str, Any]]:
    """A local surface with every component the view renders, one it does not, and text
    that would be markup if it were parsed."""
    comps: list[dict[str, Any]] = [
        {"id": "root", "component": "Column",
         "children": ["title", "row", "tabs", "list", "slider"]},
        {"id": "title", "component": "Text", "text": "Showcase", "variant": "h2"},
        {"id": "row", "component": "Row", "children": ["badge", "card", "divider"]},
        {"id": "badge", "component": "Badge", "text": "new"},
        {"id": "card", "component": "Card", "child": "hostile"},
        {"id": "hostile", "component": "Text", "text": HOSTILE},
        {"id": "divider", "component": "Divider"},
        {"id": "tabs", "component": "Tabs", "tabs": [
            {"title": "Form", "child": "form"}, {"title": "Picture", "child": "picture"}]},
        {"id": "form", "component": "Column", "children": ["name", "agree", "size", "send"]},
        {"id": "name", "component": "TextField", "label": "Name", "value": {"path": "/name"}},
        {"id": "agree", "component": "CheckBox", "label": "I agree", "value": {"path": "/agree"}},
        {"id": "size", "component": "Select", "label": "Size",
         "options": [{"label": "Small", "value": "s"}, {"label": "Large", "value": "l"}],
         "value": {"path": "/size"}},
        {"id": "send", "component": "Button", "child": "send_label",
         "action": {"event": {"name": "send", "context": {"name": {"path": "/name"}}}}},
        {"id": "send_label", "component": "Text", "text": "Send"},
        {"id": "picture", "component": "Image", "url": PNG, "description": "a dot"},
        {"id": "list", "component": "List", "children": {"componentId": "item", "path": "/items"}},
        {"id": "item", "component": "Text", "text": {"path": "label"}},
        {"id": "slider", "component": "Slider", "value": 3, "max": 10},
    ]  # fmt: skip
    return [
        {"version": "v0.9", "createSurface": {"surfaceId": "showcase"}},
        {"version": "v0.9", "updateComponents": {"surfaceId": "showcase", "components": comps}},
        {
            "version": "v0.9",
            "updateDataModel": {
                "surfaceId": "showcase",
                "value": {
                    "name": "",
                    "agree": False,
                    "size": ["s"],
                    "items": [{"label": "first"}, {"label": "second"}],
                },
            },
        },
    ]


async def test_surfaces_render_and_a_click_reaches_the_remote_agent(
    site: Site, page: Browser
) -> None:
    async with remote_agent() as agent, rpc(site.ws_url) as client, rpc(site.ws_url) as watcher:
        await client.login(site.token())
        await watcher.login(site.token())
        await watcher.result("a2ui/subscribe", {})
        for message in showcase():
            await client.result("a2ui.apply", message)
        sent = await client.result(
            "a2a.send",
            {
                "endpoint": agent.url,
                "message": "a table, please",
                "blocking": True,
                "routeAuth": {"type": "bearer", "token": SECRET},
            },
        )
        task_id = sent["result"]["task"]["id"]

        await page.goto(site.url + "#surfaces")
        showcase_li = 'li.surface[data-surface-id="showcase"]'
        booking_li = f'li.surface[data-surface-id="{SURFACE}"]'
        await page.wait(booking_li)
        await page.wait(showcase_li)
        # Every component kind is there, the unknown one as a labelled placeholder.
        for kind in ("Text", "Row", "Column", "List", "Card", "Divider", "Button", "TextField",
                     "CheckBox", "Select", "Badge", "Tabs"):  # fmt: skip
            assert await page.count(f'{showcase_li} [data-component="{kind}"]') >= 1, kind
        [slider] = await page.texts(f'{showcase_li} .a2ui-placeholder[data-component="Slider"]')
        assert "Slider component" in slider
        assert await page.texts(f"{showcase_li} .a2ui-list li") == ["first", "second"]
        # The agent's text is text: shown as written, never parsed into an element.
        [hostile] = await page.texts(f'{showcase_li} [data-component-id="hostile"]')
        assert hostile == HOSTILE
        assert await page.count(f'{showcase_li} [data-component-id="hostile"] img') == 0
        assert await page.evaluate("document.title") == "car-grpc dashboard"
        assert "route credential held by the server" in (await page.texts(f"{booking_li} .meta"))[0]
        await page.screenshot("surfaces")

        # Tabs switch locally; the picture is an embedded image.
        await page.click(f'{showcase_li} [role="tab"]:text-is("Picture")')
        await page.wait(f'{showcase_li} img.a2ui-image[alt="a dot"]')
        await page.click(f'{showcase_li} [role="tab"]:text-is("Form")')

        # An input reaches the subscribers as a2ui.action "input"; the button then sends
        # the typed value in its context.
        await page.fill(f'{showcase_li} [data-component-id="name"] input', "Ada")
        heard = await watcher.next_notification(
            "a2ui.event", where={"kind": "a2ui.action"}, timeout=10
        )
        assert heard["result"]["action"]["name"] == "input"
        assert heard["result"]["action"]["context"] == {"path": "/name", "value": "Ada"}
        await page.click(f'{showcase_li} button[data-component-id="send"]')
        heard = await watcher.next_notification(
            "a2ui.event", where={"kind": "a2ui.action"}, timeout=10
        )
        assert heard["result"]["action"]["name"] == "send"
        assert heard["result"]["action"]["context"] == {"name": "Ada"}

        # The click on the remote agent's button: a SendMessage in the same task, with the
        # a2uiAction part and the bearer credential; the page shows the agent's answer.
        await page.click(f'{booking_li} button[data-component-id="{BUTTON}"]')
        await page.wait(
            '#surface-result:has-text("Sent “book” to the agent\'s A2A task (completed)")'
        )
        [(remote_task, _context, action)] = agent.seen.actions
        assert remote_task == task_id
        assert action["name"] == "book" and action["sourceComponentId"] == BUTTON
        assert action["context"] == {"seats": 2}
        assert agent.seen.headers[-1]["authorization"] == f"Bearer {SECRET}"
        await page.wait(f'{booking_li} [data-component-id="{QUESTION}"]:text-is("Booked for 2.")')
        await page.screenshot("surfaces-after-click")
        html = await page.evaluate("document.documentElement.outerHTML")
        api = await page.evaluate("fetch('/api/surfaces').then(r => r.text())")
        assert SECRET not in html and SECRET not in api
