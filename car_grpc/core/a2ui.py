"""A2UI surfaces, user actions routed to A2A tasks, and outbound A2A (docs/protocol.md §7a).

The server keeps surfaces and relays them; it runs nothing a surface says. A batch of
A2UI messages (one `a2ui.apply`, or everything one `a2ui.ingest` or `a2a.send` answer
holds) is planned whole before anything is written: each message is checked against the
catalog (a2ui_catalog.py), applied to a copy of its surface, and the copy checked against
the limits (components and bytes per surface, surfaces per owner and in all). Any refusal
refuses the batch: nothing is stored, nothing broadcast. Then the surfaces are written
(acknowledged after commit) and every change goes to the `a2ui/subscribe` sessions
(`a2ui.event`) and to the host event log.

Applies are serialized in this core (one lock: each is a read-modify-write of its
surfaces), and a batch is written in one transaction. Surfaces live in the store until
`expires_at` (`a2ui_surface_ttl` after their last change); `a2ui.reap` and a reaper every
`a2ui_reap_interval` seconds remove the expired ones with their credentials.

A surface owned by an A2A task (`owner.kind` "a2a") carries its endpoint and, sealed, the
route credential given with it (route_auth.py). A user action on it is delivered to that
endpoint as a SendMessage in the task and context with the data part
`{"a2uiAction": action}`, within `a2a_send_timeout`; how that went is the action's `route`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from a2a.types import a2a_pb2

from car_grpc.clock import now_ms
from car_grpc.core import a2ui_catalog as catalog
from car_grpc.core.a2a_client import A2aCallFailed, A2aClient, message_from_json, task_state
from car_grpc.core.host import HostEvents
from car_grpc.core.metrics import Metrics
from car_grpc.core.route_auth import (
    RouteAuth,
    RouteSealer,
    check_endpoint,
    is_loopback,
    route_auth_from,
)
from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession, Role
from car_grpc.store.repositories import A2uiStore, SurfaceRow
from car_grpc.v1 import a2ui_pb2, session_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import (
    INVALID_PARAMS,
    field_error,
    invalid_params,
    not_found,
    permission_denied,
    require,
)

log = logging.getLogger(__name__)

Surface = a2ui_pb2.A2uiSurface
Owner = a2ui_pb2.A2uiOwner

MAX_SURFACE_ID = 256
#: How deep `a2ui.ingest` looks into a payload, and how many messages one payload may hold.
MAX_PAYLOAD_DEPTH = 32
MAX_MESSAGES_PER_BATCH = 256
MAX_PEER_LABEL = 256


@dataclass(frozen=True)
class A2uiLimits:
    max_components: int
    max_surface_bytes: int
    max_surfaces_per_owner: int
    max_surfaces: int
    #: Seconds a surface lives after its last change.
    surface_ttl: float
    max_peers: int


@dataclass
class _Route:
    """Who the surfaces of a batch belong to, and the credential to seal with them."""

    owner: Owner
    auth: RouteAuth | None = None


@dataclass
class _Plan:
    """The surfaces a batch changes, as they will be stored (None: deleted)."""

    after: dict[str, SurfaceRow | None] = field(default_factory=dict)
    results: list[a2ui_pb2.A2uiApplyResponse] = field(default_factory=list)


def owner_key(owner: Owner) -> str:
    """Whose quota a surface counts against: the A2A endpoint, the agent, or "local"."""
    if owner.kind == "a2a":
        return f"a2a:{owner.endpoint}"
    if owner.kind == "agent":
        return f"agent:{owner.agent_id}"
    return "local"


def _caller_owner(session: ClientSession) -> Owner:
    if session.role is Role.AGENT and session.agent_id:
        return Owner(kind="agent", agent_id=session.agent_id)
    return Owner(kind="local")


def _visible(session: ClientSession, surface: Surface) -> bool:
    """An attached agent sees only its own surfaces; daemon and host sessions see all."""
    if session.role is not Role.AGENT:
        return True
    return surface.owner.kind == "agent" and surface.owner.agent_id == session.agent_id


def _set_pointer(model: Any, path: str, value: Any, remove: bool) -> Any:
    """`model` with `value` at JSON Pointer `path` (or the key there removed)."""
    if path in ("", "/"):
        return {} if remove else value
    if not path.startswith("/"):
        raise catalog.refusal(
            catalog.INVALID_MESSAGE, f"path is not a JSON Pointer: {path[:100]!r}"
        )
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path[1:].split("/")]
    root = model if isinstance(model, dict | list) else {}
    node: Any = root
    for key in keys[:-1]:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise catalog.refusal(catalog.INVALID_MESSAGE, f"path {path[:100]!r} crosses a value")
        if not isinstance(node.get(key), dict | list):
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list) and (last.isdigit() or last == "-"):
        index = len(node) if last == "-" else int(last)
        if remove:
            if index < len(node):
                node.pop(index)
        elif index < len(node):
            node[index] = value
        elif index == len(node):
            node.append(value)
        else:
            raise catalog.refusal(catalog.INVALID_MESSAGE, f"path {path[:100]!r} is past the list")
    elif isinstance(node, dict):
        if remove:
            node.pop(last, None)
        else:
            node[last] = value
    else:
        raise catalog.refusal(catalog.INVALID_MESSAGE, f"path {path[:100]!r} crosses a value")
    return root


def find_envelopes(payload: Any) -> list[dict[str, Any]]:
    """Every A2UI message in an A2A-shaped payload, in order: a direct envelope, one under
    `"a2ui"`, or one anywhere inside a message, task (its status message and artifacts,
    not its history), artifact or data part."""
    found: list[dict[str, Any]] = []

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_PAYLOAD_DEPTH:
            raise catalog.refusal(catalog.LIMIT_EXCEEDED, "the payload is nested too deeply")
        if catalog.is_envelope(node):
            found.append(node)
            if len(found) > MAX_MESSAGES_PER_BATCH:
                raise catalog.refusal(
                    catalog.LIMIT_EXCEEDED,
                    f"more than {MAX_MESSAGES_PER_BATCH} A2UI messages in one payload",
                    limit="messages",
                )
        elif isinstance(node, dict):
            for key, value in node.items():
                if key != "history":  # a task's past messages: applied when they were said
                    walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1)

    walk(payload, 0)
    return found


def a2a_ids(payload: Any) -> tuple[str | None, str | None]:
    """(taskId, contextId) of an A2A payload: a task, a message, or an answer holding one."""
    if not isinstance(payload, dict):
        return None, None
    for key in ("task", "message", "result"):
        if isinstance(payload.get(key), dict):
            return a2a_ids(payload[key])
    task = payload.get("taskId")
    if task is None and (payload.get("kind") == "task" or "status" in payload):
        task = payload.get("id")
    context = payload.get("contextId")
    return (
        task if isinstance(task, str) and task else None,
        context if isinstance(context, str) and context else None,
    )


def canonical_url(url: str) -> str:
    """A peer URL as the registry keeps it: lowercase scheme and host, no default port,
    no trailing slash, no query or fragment."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (parts.scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), "", ""))


class A2ui:
    """The A2UI surfaces of the core, their subscribers, and outbound A2A."""

    def __init__(
        self,
        store: A2uiStore,
        events: HostEvents,
        metrics: Metrics,
        sealer: RouteSealer,
        client: A2aClient,
        limits: A2uiLimits,
        *,
        reap_interval: float,
    ) -> None:
        self.store = store
        self.events = events
        self.metrics = metrics
        self.sealer = sealer
        self.client = client
        self.limits = limits
        self.reap_interval = reap_interval
        #: Sessions that called a2ui/subscribe, by session id.
        self._subscribers: dict[str, ClientSession] = {}
        #: Sessions whose close hook is registered (it outlives an a2ui/unsubscribe).
        self._hooked: set[str] = set()
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reap what expired while the server was down, then every reap_interval."""
        await self.reap()
        self._reaper = asyncio.create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                await self.reap()
            except Exception:
                log.warning("a2ui: reaping expired surfaces failed", exc_info=True)

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    async def reap(self) -> list[str]:
        async with self._lock:
            removed = await self.store.reap(now_ms())
        for surface_id in removed:
            self._broadcast(
                "a2ui.surface_deleted", {"surfaceId": surface_id, "deleted": True}, None
            )
        return removed

    # ------------------------------------------------------------ reads

    @handles("a2ui_capabilities", inline=True)
    async def capabilities(
        self, session: ClientSession, req: a2ui_pb2.A2uiCapabilitiesRequest
    ) -> a2ui_pb2.A2uiCapabilitiesResponse:
        lim = self.limits
        return a2ui_pb2.A2uiCapabilitiesResponse(
            version=catalog.VERSION,
            mime_type=catalog.MIME_TYPE,
            catalogs=[catalog.catalog_id()],
            components=catalog.component_names(),
            limits=a2ui_pb2.A2uiLimits(
                max_components=lim.max_components,
                max_surface_bytes=lim.max_surface_bytes,
                max_surfaces_per_owner=lim.max_surfaces_per_owner,
                max_surfaces=lim.max_surfaces,
                max_surface_age_secs=int(lim.surface_ttl),
            ),
        )

    @handles("a2ui_surfaces")
    async def surfaces(
        self, session: ClientSession, req: a2ui_pb2.A2uiSurfacesRequest
    ) -> a2ui_pb2.A2uiSurfacesResponse:
        rows = await self.store.live_surfaces(now_ms())
        return a2ui_pb2.A2uiSurfacesResponse(
            surfaces=[r.surface for r in rows if _visible(session, r.surface)]
        )

    @handles("a2ui_get")
    async def get(
        self, session: ClientSession, req: a2ui_pb2.A2uiGetRequest
    ) -> a2ui_pb2.A2uiGetResponse:
        surface_id = req.surface_id or req.surface_id_camel
        require(surface_id, "surfaceId")
        row = await self.store.get_surface(surface_id, now_ms())
        if row is None or not _visible(session, row.surface):
            return a2ui_pb2.A2uiGetResponse()
        return a2ui_pb2.A2uiGetResponse(surface=row.surface)

    @handles("a2ui_replay")
    async def replay(
        self, session: ClientSession, req: a2ui_pb2.A2uiGetRequest
    ) -> a2ui_pb2.A2uiGetResponse:
        return await self.get(session, req)

    @handles("a2ui_reap")
    async def reap_now(
        self, session: ClientSession, req: a2ui_pb2.A2uiReapRequest
    ) -> a2ui_pb2.A2uiReapResponse:
        return a2ui_pb2.A2uiReapResponse(removed=await self.reap())

    # ------------------------------------------------------------ subscriptions

    @handles("a2ui_subscribe", inline=True)
    async def subscribe(
        self, session: ClientSession, req: a2ui_pb2.A2uiSubscribeRequest
    ) -> a2ui_pb2.A2uiSubscribeResponse:
        if session.streaming and session.id not in self._subscribers:
            self._subscribers[session.id] = session
            if session.id not in self._hooked:  # one close hook per session, however often
                self._hooked.add(session.id)  # it subscribes again
                session.on_close(self._forget)
        return a2ui_pb2.A2uiSubscribeResponse(subscribed=session.streaming)

    def _forget(self, session: ClientSession) -> None:
        self._subscribers.pop(session.id, None)
        self._hooked.discard(session.id)

    @handles("a2ui_unsubscribe", inline=True)
    async def unsubscribe(
        self, session: ClientSession, req: a2ui_pb2.A2uiUnsubscribeRequest
    ) -> a2ui_pb2.A2uiSubscribeResponse:
        self._subscribers.pop(session.id, None)
        return a2ui_pb2.A2uiSubscribeResponse(subscribed=False)

    def _broadcast(self, kind: str, result: codec.JSON, surface: Surface | None) -> None:
        """`a2ui.event {kind, result}` to every subscriber that may see `surface`, and a
        host event (without the surface's content). Never waits: a subscriber whose
        queue is full misses the event (counted)."""
        frame = session_pb2.ServerFrame(
            a2ui_event=a2ui_pb2.A2uiEventNotice(kind=kind, result=codec.to_value(result))
        )
        for session in list(self._subscribers.values()):
            if surface is not None and not _visible(session, surface):
                continue
            if session.role is Role.AGENT and surface is None:
                continue
            if not session.try_send(frame):
                self.metrics.queue_drops.inc("a2ui_events")
        agent_id = (
            surface.owner.agent_id if surface is not None and surface.owner.agent_id else None
        )
        surface_id = result.get("surfaceId") if isinstance(result, dict) else None
        payload: dict[str, codec.JSON] = {"surfaceId": surface_id}
        if surface is not None:
            payload["owner"] = surface.owner.kind
        self.events.publish(kind, agent_id=agent_id, payload=payload)

    # ------------------------------------------------------------ applying messages

    @handles("a2ui_apply")
    async def apply(
        self, session: ClientSession, req: a2ui_pb2.A2uiApplyRequest
    ) -> a2ui_pb2.A2uiApplyResponse:
        envelope = codec.struct_to_json(
            req.envelope if req.HasField("envelope") else req.inline_envelope
        )
        if not envelope:
            raise field_error("envelope")
        message = catalog.check_message(envelope)
        results = await self._apply_batch(session, [message], _Route(_caller_owner(session)))
        return results[0]

    @handles("a2ui_ingest")
    async def ingest(
        self, session: ClientSession, req: a2ui_pb2.A2uiIngestRequest
    ) -> a2ui_pb2.A2uiIngestResponse:
        payload = codec.value_to_json(req.payload)
        if payload is None:
            raise field_error("payload")
        task_id, context_id = a2a_ids(payload)
        endpoint = req.endpoint or (req.owner.endpoint if req.HasField("owner") else "")
        auth = route_auth_from(req.route_auth) if req.HasField("route_auth") else None
        if endpoint:
            check_endpoint(
                endpoint,
                allow_untrusted=req.allow_untrusted_endpoint,
                name="endpoint",
                allow_flag="allowUntrustedEndpoint",
            )
        elif auth is not None:
            raise field_error("endpoint", "routeAuth needs the endpoint it is for")
        route = _Route(_caller_owner(session))
        if auth is not None and not req.HasField("owner") and task_id is None:
            raise field_error(
                "routeAuth", "needs the A2A task it is for (a taskId in the payload, or owner)"
            )
        if req.HasField("owner") or task_id is not None:
            owner = Owner(kind="a2a")
            if req.HasField("owner"):
                owner.CopyFrom(req.owner)
                owner.kind = "a2a"
            if task_id and not owner.task_id:
                owner.task_id = task_id
            if context_id and not owner.context_id:
                owner.context_id = context_id
            if endpoint:
                owner.endpoint = endpoint
            route = _Route(owner, auth)
        messages = [catalog.check_message(e) for e in find_envelopes(payload)]
        results = await self._apply_batch(session, messages, route) if messages else []
        return a2ui_pb2.A2uiIngestResponse(applied=results)

    async def _apply_batch(
        self, session: ClientSession | None, messages: list[catalog.A2uiMessage], route: _Route
    ) -> list[a2ui_pb2.A2uiApplyResponse]:
        async with self._lock:
            plan = await self._plan(session, messages, route)
            await self.store.write_surfaces(
                [row for row in plan.after.values() if row is not None],
                [sid for sid, row in plan.after.items() if row is None],
            )
        for result in plan.results:
            row = plan.after.get(result.surface_id)
            kind = "a2ui.surface_deleted" if result.deleted else "a2ui.surface_updated"
            self._broadcast(kind, codec.message_to_json(result), row.surface if row else None)
        return plan.results

    async def _plan(
        self, session: ClientSession | None, messages: list[catalog.A2uiMessage], route: _Route
    ) -> _Plan:
        plan = _Plan()
        now = now_ms()
        expires = now + int(self.limits.surface_ttl * 1000)
        before: dict[str, SurfaceRow | None] = {}
        for message in messages:
            sid = message.surface_id
            if not sid or len(sid) > MAX_SURFACE_ID:
                raise catalog.refusal(
                    catalog.INVALID_MESSAGE, f"surfaceId must be 1..{MAX_SURFACE_ID} characters"
                )
            if sid not in plan.after:
                before[sid] = await self.store.get_surface(sid, now)
                plan.after[sid] = before[sid]
            current = plan.after[sid]
            if (
                current is not None
                and session is not None
                and not _visible(session, current.surface)
            ):
                raise permission_denied(f"surface '{sid}' is owned by another client")
            if message.kind == "deleteSurface":
                plan.after[sid] = None
                plan.results.append(
                    a2ui_pb2.A2uiApplyResponse(surface_id=sid, deleted=current is not None)
                )
                continue
            if message.kind == "createSurface":
                surface = Surface(
                    surface_id=sid,
                    catalog_id=message.body["catalogId"],
                    data_model=codec.to_value({}),
                    created_at=now,
                )
                if "theme" in message.body:
                    surface.theme.CopyFrom(codec.to_value(message.body["theme"]))
            elif current is None:
                raise catalog.refusal(
                    catalog.INVALID_MESSAGE,
                    f"{message.kind} for surface '{sid}', which does not exist"
                    " (createSurface first)",
                )
            else:
                surface = Surface()
                surface.CopyFrom(current.surface)
                self._update(surface, message)
            sealed = self._route_for(surface, current, route)
            surface.owner.CopyFrom(route.owner)
            surface.updated_at, surface.expires_at = now, expires
            surface.has_route_auth = sealed is not None
            self._check_size(surface)
            plan.after[sid] = SurfaceRow(surface, owner_key(route.owner), sealed)
            plan.results.append(a2ui_pb2.A2uiApplyResponse(surface_id=sid, surface=surface))
        await self._check_counts(plan, before, now)
        return plan

    def _route_for(
        self, surface: Surface, current: SurfaceRow | None, route: _Route
    ) -> bytes | None:
        """The sealed credential the surface keeps: the batch's, else the one it had
        when it stays with the same A2A task."""
        if route.auth is not None:
            return self.sealer.seal(route.auth, surface.surface_id)
        if (
            current is not None
            and current.route is not None
            and route.owner.kind == "a2a"
            and current.surface.owner.endpoint == route.owner.endpoint
        ):
            return current.route
        return None

    def _update(self, surface: Surface, message: catalog.A2uiMessage) -> None:
        if message.kind == "updateComponents":
            by_id = {c.fields["id"].string_value: i for i, c in enumerate(surface.components)}
            for component in message.body["components"]:
                struct = codec.to_struct(component)
                if component["id"] in by_id:
                    surface.components[by_id[component["id"]]].CopyFrom(struct)
                else:
                    by_id[component["id"]] = len(surface.components)
                    surface.components.append(struct)
            if len(surface.components) > self.limits.max_components:
                raise catalog.refusal(
                    catalog.LIMIT_EXCEEDED,
                    f"surface '{surface.surface_id}' would have more than "
                    f"{self.limits.max_components} components",
                    limit="maxComponents",
                )
        elif message.kind == "updateDataModel":
            model = copy.deepcopy(codec.value_to_json(surface.data_model))
            path = message.body.get("path") or ""
            remove = "value" not in message.body
            model = _set_pointer(model, path, message.body.get("value"), remove)
            surface.data_model.CopyFrom(codec.to_value(model))

    def _check_size(self, surface: Surface) -> None:
        size = len(json.dumps(codec.message_to_json(surface), separators=(",", ":")))
        if size > self.limits.max_surface_bytes:
            raise catalog.refusal(
                catalog.LIMIT_EXCEEDED,
                f"surface '{surface.surface_id}' would be {size} bytes, more than "
                f"{self.limits.max_surface_bytes}",
                limit="maxSurfaceBytes",
            )

    async def _check_counts(
        self, plan: _Plan, before: dict[str, SurfaceRow | None], now: int
    ) -> None:
        """Surfaces per owner and in all, after the batch."""
        added: dict[str, int] = {}
        total_added = 0
        for sid, row in plan.after.items():
            old = before[sid]
            new_key = row.owner_key if row is not None else None
            old_key = old.owner_key if old is not None else None
            if new_key == old_key:
                continue
            if new_key is not None:
                added[new_key] = added.get(new_key, 0) + 1
                total_added += 1
            if old_key is not None:
                added[old_key] = added.get(old_key, 0) - 1
                total_added -= 1
        for key, more in added.items():
            if more <= 0:
                continue
            owned, total = await self.store.count_surfaces(now, key)
            if owned + more > self.limits.max_surfaces_per_owner:
                raise catalog.refusal(
                    catalog.LIMIT_EXCEEDED,
                    f"more than {self.limits.max_surfaces_per_owner} surfaces for one owner",
                    limit="maxSurfacesPerOwner",
                )
            if total_added > 0 and total + total_added > self.limits.max_surfaces:
                raise catalog.refusal(
                    catalog.LIMIT_EXCEEDED,
                    f"more than {self.limits.max_surfaces} surfaces",
                    limit="maxSurfaces",
                )

    # ------------------------------------------------------------ user actions

    @handles("a2ui_action")
    async def action(
        self, session: ClientSession, req: a2ui_pb2.A2uiActionRequest
    ) -> a2ui_pb2.A2uiActionResponse:
        given = codec.value_to_json(req.action) if req.HasField("action") else None
        action: dict[str, codec.JSON] = dict(given) if isinstance(given, dict) else {}
        if isinstance(given, str):
            action["name"] = given
        if req.HasField("name"):
            action["name"] = req.name
        surface_id = req.surface_id or action.get("surfaceId")
        if not isinstance(action.get("name"), str) or not action["name"]:
            raise field_error("name")
        if not isinstance(surface_id, str) or not surface_id:
            raise field_error("surfaceId")
        action["surfaceId"] = surface_id
        if req.HasField("source_component_id"):
            action["sourceComponentId"] = req.source_component_id
        action["timestamp"] = (
            codec.value_to_json(req.timestamp)
            if req.HasField("timestamp")
            else action.get("timestamp", now_ms())
        )
        if req.HasField("context"):
            action["context"] = codec.struct_to_json(req.context)
        action.setdefault("context", {})
        row = await self.store.get_surface(surface_id, now_ms())
        if row is None:
            raise not_found(INVALID_PARAMS, f"invalid params: unknown surface '{surface_id}'")
        owner = codec.message_to_json(row.surface.owner)
        event: dict[str, codec.JSON] = {
            "kind": "a2ui.action",
            "result": {"surfaceId": surface_id, "action": action, "owner": owner},
        }
        self._broadcast("a2ui.action", event["result"], row.surface)
        route = await self._deliver(row, action)
        return a2ui_pb2.A2uiActionResponse(event=codec.to_struct(event), route=route)

    async def _deliver(self, row: SurfaceRow, action: dict[str, codec.JSON]) -> a2ui_pb2.A2uiRoute:
        owner = row.surface.owner
        if owner.kind != "a2a" or not owner.endpoint:
            return a2ui_pb2.A2uiRoute(status="not_routed")
        route = a2ui_pb2.A2uiRoute(status="failed", endpoint=owner.endpoint)
        if owner.task_id:
            route.task_id = owner.task_id
        auth = None
        if row.route is not None:
            auth = self.sealer.open(row.route, row.surface.surface_id)
            if auth is None:
                route.error = "the route credential cannot be read (the route key changed)"
                return route
        message = a2a_pb2.Message(
            message_id=uuid.uuid4().hex,
            role=a2a_pb2.ROLE_USER,
            parts=[a2a_pb2.Part(data=codec.to_value({"a2uiAction": action}))],
        )
        if owner.task_id:
            message.task_id = owner.task_id
        if owner.context_id:
            message.context_id = owner.context_id
        try:
            answer = await self.client.send(owner.endpoint, message, blocking=True, auth=auth)
        except A2aCallFailed as e:
            route.error = str(e)
            return route
        route.status = "delivered"
        if (state := task_state(answer)) is not None:
            route.task_state = state
        try:
            route.applied.extend(await self._ingest_answer(answer, owner.endpoint, auth, owner))
        except Exception as e:  # the action was delivered; a bad UI in the answer is reported
            route.error = (
                f"the answer's A2UI was refused: {getattr(e, 'message', type(e).__name__)}"
            )
        return route

    async def _ingest_answer(
        self, answer: dict[str, Any], endpoint: str, auth: RouteAuth | None, known: Owner | None
    ) -> list[a2ui_pb2.A2uiApplyResponse]:
        """Applies the A2UI an A2A answer holds, owned by its task at `endpoint`."""
        messages = [catalog.check_message(e) for e in find_envelopes(answer)]
        if not messages:
            return []
        task_id, context_id = a2a_ids(answer)
        owner = Owner(kind="a2a", endpoint=endpoint)
        if known is not None:
            owner.CopyFrom(known)
        if task_id:
            owner.task_id = task_id
        if context_id:
            owner.context_id = context_id
        return await self._apply_batch(None, messages, _Route(owner, auth))

    # ------------------------------------------------------------ outbound A2A

    @handles("a2a_send")
    async def send(
        self, session: ClientSession, req: a2ui_pb2.A2aSendRequest
    ) -> a2ui_pb2.A2aSendResponse:
        endpoint = check_endpoint(
            req.endpoint,
            allow_untrusted=req.allow_untrusted_endpoint,
            name="endpoint",
            allow_flag="allowUntrustedEndpoint",
        )
        if not req.HasField("message"):
            raise field_error("message")
        message = message_from_json(codec.value_to_json(req.message))
        auth = route_auth_from(req.route_auth) if req.HasField("route_auth") else None
        try:
            answer = await self.client.send(endpoint, message, blocking=req.blocking, auth=auth)
        except A2aCallFailed as e:
            raise invalid_params(f"invalid params: a2a.send to {endpoint} failed: {e}") from None
        applied: list[a2ui_pb2.A2uiApplyResponse] = []
        if not req.HasField("ingest_a2ui") or req.ingest_a2ui:
            applied = await self._ingest_answer(answer, endpoint, auth, None)
        return a2ui_pb2.A2aSendResponse(
            result=codec.to_value(answer), a2ui=a2ui_pb2.A2uiIngestResponse(applied=applied)
        )

    @handles("a2a_peers_add")
    async def add_peer(
        self, session: ClientSession, req: a2ui_pb2.A2aPeersAddRequest
    ) -> a2ui_pb2.A2aPeersAddResponse:
        check_endpoint(
            req.url, allow_untrusted=req.allow_untrusted, name="url", allow_flag="allowUntrusted"
        )
        url = canonical_url(req.url)
        if req.HasField("label") and len(req.label) > MAX_PEER_LABEL:
            raise field_error("label", f"longer than {MAX_PEER_LABEL} characters")
        peers = await self.store.peers()
        if any(p.url == url for p in peers):
            raise invalid_params(f"invalid params: peer {url} is already registered")
        if len(peers) >= self.limits.max_peers:
            raise invalid_params(f"invalid params: more than {self.limits.max_peers} peers")
        host = urlsplit(url).hostname or "peer"
        base = re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-") or "peer"
        taken = {p.slug for p in peers}
        slug, n = base, 1
        while slug in taken:
            n += 1
            slug = f"{base}-{n}"
        peer = a2ui_pb2.A2aPeer(slug=slug, url=url)
        if req.HasField("label"):
            peer.label = req.label
        if not await self.store.add_peer(peer):
            raise invalid_params(f"invalid params: peer {url} is already registered")
        return a2ui_pb2.A2aPeersAddResponse(peer=peer)

    @handles("a2a_peers_list")
    async def list_peers(
        self, session: ClientSession, req: a2ui_pb2.A2aPeersListRequest
    ) -> a2ui_pb2.A2aPeersListResponse:
        return a2ui_pb2.A2aPeersListResponse(peers=await self.store.peers())

    @handles("a2a_peers_remove")
    async def remove_peer(
        self, session: ClientSession, req: a2ui_pb2.A2aPeersRemoveRequest
    ) -> a2ui_pb2.A2aPeersRemoveResponse:
        require(req.slug, "slug")
        return a2ui_pb2.A2aPeersRemoveResponse(removed=await self.store.remove_peer(req.slug))


__all__ = ["A2ui", "A2uiLimits", "canonical_url", "find_envelopes", "is_loopback"]
