"""A2UI surfaces end to end (docs/protocol.md §7a): a real core and gateway, WebSocket
JSON-RPC clients. Messages are checked against the catalog (a2ui-core) and the limits
before anything is stored; a refused message leaves nothing stored and nothing broadcast;
surfaces survive a restart until they expire; subscribers hear every change and action."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from car_grpc.core import a2ui_catalog
from car_grpc.wire.errors import INVALID_PARAMS
from tests.conftest import make_config
from tests.ws_helpers import Rpc, daemon_token, rpc, running

CATALOG = a2ui_catalog.catalog_id()


def create(surface_id: str, **extra: Any) -> dict[str, Any]:
    return {"version": "v0.9", "createSurface": {"surfaceId": surface_id, **extra}}


def components(surface_id: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "v0.9",
        "updateComponents": {"surfaceId": surface_id, "components": list(items)},
    }


def text(cid: str, value: str) -> dict[str, Any]:
    return {"id": cid, "component": "Text", "text": value}


async def no_event(c: Rpc, wait: float = 0.3) -> None:
    """No a2ui.event arrives within `wait` seconds."""
    with pytest.raises(TimeoutError):
        await c.next_notification("a2ui.event", timeout=wait)


async def test_capabilities_name_the_basic_catalog_and_the_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, a2ui_max_components=7)
    async with running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        caps = await c.result("a2ui.capabilities", {})
    assert caps["version"] == "v0.9"
    assert caps["mimeType"] == "application/json+a2ui"
    assert caps["catalogs"] == [CATALOG]
    for name in ("Text", "Row", "Column", "List", "Card", "Divider", "Button", "TextField",
                 "CheckBox", "ChoicePicker", "Select", "Slider", "Image", "Icon", "Video",
                 "AudioPlayer", "DateTimeInput", "Chart", "File", "FilePicker", "Spacer",
                 "Badge", "Tabs", "Modal"):  # fmt: skip
        assert name in caps["components"], name
    assert len(caps["components"]) == 24
    assert caps["limits"]["maxComponents"] == 7
    assert caps["limits"]["maxSurfaceAgeSecs"] == 24 * 3600


async def test_apply_builds_a_surface_and_subscribers_hear_it(tmp_path: Path) -> None:
    async with (
        running(make_config(tmp_path)) as (core, gateway),
        rpc(gateway.url) as c,
        rpc(gateway.url) as watcher,
    ):
        await c.login(daemon_token(core))
        await watcher.login(daemon_token(core))
        assert await watcher.result("a2ui/subscribe", {}) == {"subscribed": True}

        created = await c.result("a2ui.apply", {"envelope": create("s1")})
        assert created["surfaceId"] == "s1" and created["deleted"] is False
        assert created["surface"]["catalogId"] == CATALOG
        assert created["surface"]["owner"] == {"kind": "local"}
        # The envelope itself as params works the same.
        updated = await c.result(
                "a2ui.apply",
                components("s1", {"id": "root", "component": "Column", "children": ["t"]},
                           text("t", "hello")),
            )  # fmt: skip
        assert [x["id"] for x in updated["surface"]["components"]] == ["root", "t"]
        await c.result(
            "a2ui.apply",
            {
                "envelope": {
                    "version": "v0.9",
                    "updateDataModel": {
                        "surfaceId": "s1",
                        "path": "/form/name",
                        "value": "Ada",
                    },
                }
            },
        )
        # A later update of an id replaces it in place.
        await c.result("a2ui.apply", components("s1", text("t", "bye")))
        got = await c.result("a2ui.get", {"surfaceId": "s1"})
        assert got["components"][1] == text("t", "bye")
        assert got["dataModel"] == {"form": {"name": "Ada"}}
        assert got["hasRouteAuth"] is False
        assert await c.result("a2ui.get", {"surface_id": "s1"}) == got
        assert await c.result("a2ui/replay", {"surfaceId": "s1"}) == got
        assert [s["surfaceId"] for s in await c.result("a2ui.surfaces", {})] == ["s1"]

        kinds = [(await watcher.next_notification("a2ui.event"))["kind"] for _ in range(4)]
        assert kinds == ["a2ui.surface_updated"] * 4

        deleted = await c.result(
            "a2ui.apply", {"version": "v0.9", "deleteSurface": {"surfaceId": "s1"}}
        )
        assert deleted == {"surfaceId": "s1", "deleted": True}
        event = await watcher.next_notification("a2ui.event")
        assert event == {
            "kind": "a2ui.surface_deleted",
            "result": {"surfaceId": "s1", "deleted": True},
        }
        assert await c.result("a2ui.get", {"surfaceId": "s1"}) is None
        assert await c.result("a2ui/replay", {"surfaceId": "s1"}) is None
        assert await watcher.result("a2ui/unsubscribe", {}) == {"subscribed": False}
        assert await watcher.result("a2ui/unsubscribe", {}) == {"subscribed": False}
        await c.result("a2ui.apply", create("s2"))
        await no_event(watcher)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            components("s1", {"id": "x", "component": "Marquee", "text": "hi"}),
            "UnsupportedComponent",
        ),
        (create("s9", catalogId="https://evil.example/catalog.json"), "UnsupportedCatalog"),
        (
            components("s1", {"id": "t", "component": "Text", "text": "x", "html": "<b>x</b>"}),
            "InvalidMessage",
        ),
        (components("s1", *[text(f"t{i}", "x") for i in range(6)]), "LimitExceeded"),
        (components("s1", text("t", "x" * 3000)), "LimitExceeded"),
        (
            {"version": "v0.9", "updateDataModel": {"surfaceId": "nope", "value": 1}},
            "InvalidMessage",
        ),
    ],
    ids=["component", "catalog", "property", "components", "bytes", "unknown-surface"],
)
async def test_a_refused_message_changes_nothing_and_broadcasts_nothing(
    tmp_path: Path, message: dict[str, Any], kind: str
) -> None:
    config = make_config(tmp_path, a2ui_max_components=5, a2ui_max_surface_bytes=2048)
    async with (
        running(config) as (core, gateway),
        rpc(gateway.url) as c,
        rpc(gateway.url) as watcher,
    ):
        await c.login(daemon_token(core))
        await watcher.login(daemon_token(core))
        await c.result("a2ui.apply", create("s1"))
        await c.result("a2ui.apply", components("s1", text("a", "kept")))
        before = await c.result("a2ui.get", {"surfaceId": "s1"})
        await watcher.result("a2ui/subscribe", {})
        error = await c.error("a2ui.apply", {"envelope": message})
        assert error["code"] == INVALID_PARAMS
        assert error["data"]["kind"] == kind, error
        assert await c.result("a2ui.get", {"surfaceId": "s1"}) == before
        assert [s["surfaceId"] for s in await c.result("a2ui.surfaces", {})] == ["s1"]
        await no_event(watcher)


async def test_an_ingest_is_refused_whole(tmp_path: Path) -> None:
    """One bad message in a payload: none of the payload's messages is applied."""
    async with running(make_config(tmp_path)) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        payload = {
            "kind": "message",
            "parts": [
                {"kind": "data", "data": create("good")},
                {"kind": "data", "data": {"a2ui": components("good", text("t", "x"))}},
                {"kind": "data", "data": components("good", {"id": "b", "component": "Blink"})},
            ],
        }
        error = await c.error("a2ui.ingest", {"payload": payload})
        assert error["data"]["kind"] == "UnsupportedComponent"
        assert await c.result("a2ui.surfaces", {}) == []
        payload["parts"] = payload["parts"][:2]
        applied = (await c.result("a2ui.ingest", {"payload": payload}))["applied"]
        assert [a["surfaceId"] for a in applied] == ["good", "good"]
        assert applied[1]["surface"]["components"] == [text("t", "x")]


async def test_surfaces_per_owner_and_in_all_are_bounded(tmp_path: Path) -> None:
    config = make_config(tmp_path, a2ui_max_surfaces_per_owner=2, a2ui_max_surfaces=3)
    async with running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        await c.result("a2ui.apply", create("a"))
        await c.result("a2ui.apply", create("b"))
        error = await c.error("a2ui.apply", create("c"))
        assert error["data"] == {"kind": "LimitExceeded", "limit": "maxSurfacesPerOwner"}
        # Another owner (an A2A task) has its own quota, but the total still holds.
        owner = {"taskId": "t1", "endpoint": "http://127.0.0.1:9/a2a"}
        await c.result("a2ui.ingest", {"payload": create("x"), "owner": owner})
        error = await c.error("a2ui.ingest", {"payload": create("y"), "owner": owner})
        assert error["data"] == {"kind": "LimitExceeded", "limit": "maxSurfaces"}
        # Deleting one frees its place.
        await c.result("a2ui.apply", {"version": "v0.9", "deleteSurface": {"surfaceId": "a"}})
        await c.result("a2ui.apply", create("c"))


async def test_surfaces_survive_a_restart_until_they_expire(tmp_path: Path) -> None:
    config = make_config(tmp_path, a2ui_surface_ttl=3.0, a2ui_reap_interval=3600.0)
    async with running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        await c.result("a2ui.apply", create("keep"))
        await c.result("a2ui.apply", components("keep", text("t", "still here")))
    async with running(config) as (core, gateway), rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        got = await c.result("a2ui.get", {"surfaceId": "keep"})
        assert got["components"] == [text("t", "still here")]
        # Wait for its expiry (the deadline it carries), then a little.
        await asyncio.sleep(max(0.0, got["expiresAt"] / 1000 - time.time()) + 0.05)
        # Expired: no longer served, and reaped (with nothing left to reap afterwards).
        assert await c.result("a2ui.get", {"surfaceId": "keep"}) is None
        assert await c.result("a2ui.reap", {}) == {"removed": ["keep"]}
        assert await c.result("a2ui.reap", {}) == {"removed": []}


async def test_the_reaper_removes_expired_surfaces_by_itself(tmp_path: Path) -> None:
    config = make_config(tmp_path, a2ui_surface_ttl=0.2, a2ui_reap_interval=0.2)
    async with (
        running(config) as (core, gateway),
        rpc(gateway.url) as c,
        rpc(gateway.url) as watcher,
    ):
        await c.login(daemon_token(core))
        await watcher.login(daemon_token(core))
        await watcher.result("a2ui/subscribe", {})
        await c.result("a2ui.apply", create("brief"))
        assert (await watcher.next_notification("a2ui.event"))["kind"] == "a2ui.surface_updated"
        event = await watcher.next_notification("a2ui.event", timeout=5)
        assert event == {
            "kind": "a2ui.surface_deleted",
            "result": {"surfaceId": "brief", "deleted": True},
        }


async def test_an_agent_sees_and_changes_only_its_own_surfaces(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (core, gateway):
        assert core.parts is not None
        token = await core.parts.agent_tokens.add("painter")
        async with rpc(gateway.url) as agent, rpc(gateway.url) as host:
            await agent.login(token, agent_id="painter")
            await host.login(daemon_token(core))
            await agent.result("a2ui/subscribe", {})
            mine = await agent.result("a2ui.apply", create("mine"))
            assert mine["surface"]["owner"] == {"kind": "agent", "agentId": "painter"}
            await host.result("a2ui.apply", create("theirs"))
            assert [s["surfaceId"] for s in await agent.result("a2ui.surfaces", {})] == ["mine"]
            assert await agent.result("a2ui.get", {"surfaceId": "theirs"}) is None
            error = await agent.error("a2ui.apply", components("theirs", text("t", "x")))
            assert "is owned by another client" in error["message"]
            # The host sees both; the agent heard only of its own.
            assert len(await host.result("a2ui.surfaces", {})) == 2
            event = await agent.next_notification("a2ui.event")
            assert event["result"]["surfaceId"] == "mine"
            await no_event(agent)


async def test_an_action_on_a_local_surface_is_broadcast_and_not_routed(tmp_path: Path) -> None:
    async with (
        running(make_config(tmp_path)) as (core, gateway),
        rpc(gateway.url) as c,
        rpc(gateway.url) as watcher,
    ):
        await c.login(daemon_token(core))
        await watcher.login(daemon_token(core))
        await c.result("a2ui.apply", create("form"))
        await watcher.result("a2ui/subscribe", {})
        answer = await c.result(
                "a2ui.action",
                {"name": "submit", "surfaceId": "form", "sourceComponentId": "ok",
                 "timestamp": 1700000000000, "context": {"name": "Ada"}},
            )  # fmt: skip
        action = {"name": "submit", "surfaceId": "form", "sourceComponentId": "ok",
                      "timestamp": 1700000000000, "context": {"name": "Ada"}}  # fmt: skip
        assert answer["event"] == {
            "kind": "a2ui.action",
            "result": {"surfaceId": "form", "action": action, "owner": {"kind": "local"}},
        }
        assert answer["route"] == {"status": "not_routed", "applied": []}
        assert await watcher.next_notification("a2ui.event") == answer["event"]
        error = await c.error("a2ui.action", {"name": "x", "surfaceId": "ghost"})
        assert error["code"] == INVALID_PARAMS
